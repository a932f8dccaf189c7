"""Membership inference: the loss attack, LiRA, and ROC metrics computed from scores.

Paper: Membership Inference Attacks From First Principles (Carlini, Chien, Nasr, Song,
Terzis, Tramer, 2022) for LiRA; Privacy Risk in Machine Learning: Analyzing the
Connection to Overfitting (Yeom, Giacomelli, Fredrikson, Jha, 2018) for the loss attack.

Every score here is "higher means more likely a member".

* Loss attack: ``-loss`` of the target model on the example.
* LiRA: each example's *logit-scaled confidence* ``phi = log(p / (1 - p))`` with
  ``p = exp(-loss)`` (for a classifier, the probability of the true label; for a causal
  LM the geometric-mean token probability) is compared with Gaussians fitted to the
  same example's ``phi`` under shadow models that did (IN) and did not (OUT) train on
  it. *Online*: the log likelihood ratio ``log N(phi; mu_in, s_in) - log N(phi; mu_out,
  s_out)``. *Offline*: how far ``phi`` sits above the OUT Gaussian, ``(phi - mu_out) /
  s_out``. With few shadows the per-example variances are unreliable, so, as the paper
  recommends for small shadow counts, one variance is pooled over all examples (per
  side); an example without an IN (OUT) shadow uses the mean over examples.

Notes:
    By default each shadow reruns the federation (see :mod:`fedpeft.audit.shadows`), so
    its IN/OUT Gaussians describe the same kind of model as the target: a FedAvg
    average, not one client's. The cheaper ``local`` shadows memorise more strongly than
    the average; the ratio is then miscalibrated in scale but keeps much of its
    per-example ordering, which is what ROC metrics measure.

"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import hypergeom


@dataclass(frozen=True)
class RocCurve:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1)."""

    fpr: list[float]
    tpr: list[float]


def roc_curve(scores: Sequence[float], is_member: Sequence[bool]) -> RocCurve:
    """The ROC curve of ``scores`` (higher: member) against the truth.

    Tied scores move the curve diagonally (both rates at once), as in scikit-learn.

    Raises:
        ValueError: Lengths differ, or one class is empty.

    """
    if len(scores) != len(is_member):
        raise ValueError(f"{len(scores)} scores but {len(is_member)} labels")
    positives = sum(1 for m in is_member if m)
    negatives = len(is_member) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("ROC needs at least one member and one non-member")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    fpr, tpr = [0.0], [0.0]
    tp = fp = 0
    for rank, i in enumerate(order):
        if is_member[i]:
            tp += 1
        else:
            fp += 1
        last_of_tie = rank + 1 == len(order) or scores[order[rank + 1]] != scores[i]
        if last_of_tie:
            fpr.append(fp / negatives)
            tpr.append(tp / positives)
    return RocCurve(fpr, tpr)


def roc_auc(scores: Sequence[float], is_member: Sequence[bool]) -> float:
    """Area under the ROC curve: P(member score > non-member score) + P(tie) / 2."""
    curve = roc_curve(scores, is_member)
    return sum(
        (curve.fpr[i + 1] - curve.fpr[i]) * (curve.tpr[i + 1] + curve.tpr[i]) / 2
        for i in range(len(curve.fpr) - 1)
    )


def auc_null_std(members: int, non_members: int) -> float:
    """Standard deviation of the AUC of a scorer that knows nothing (Mann-Whitney under the null).

    ``sqrt((n1 + n2 + 1) / (12 n1 n2))``: an AUC within about two of these of 0.5 is chance.
    """
    if members < 1 or non_members < 1:
        raise ValueError("AUC needs at least one member and one non-member")
    return math.sqrt((members + non_members + 1) / (12 * members * non_members))


def tpr_at_fpr(scores: Sequence[float], is_member: Sequence[bool], max_fpr: float) -> float:
    """The highest true positive rate of a threshold whose false positive rate is <= ``max_fpr``.

    With n non-members the smallest non-zero FPR is 1/n: at ``max_fpr`` below that only
    thresholds with no false positive count (the low-FPR regime LiRA argues for).
    """
    curve = roc_curve(scores, is_member)
    return max(t for f, t in zip(curve.fpr, curve.tpr, strict=True) if f <= max_fpr + 1e-12)


def tpr_p_value(tpr: float, members: int, non_members: int, max_fpr: float) -> float:
    """Chance of a TPR at least ``tpr`` at ``max_fpr`` from a scorer that knows nothing.

    With ``f = floor(max_fpr x non_members)`` false positives allowed, the best threshold
    finds ``k`` members when ``k`` of them outrank the ``(f + 1)``-th non-member. Under
    the null every ranking of the scores is equally likely, so that is at least ``k``
    members among the first ``k + f`` scores: a hypergeometric tail. It is wide: with
    195 members and 205 non-members, 6 members (3.1 %) at 1 % FPR happen by chance in
    13 % of runs.
    """
    if members < 1 or non_members < 1:
        raise ValueError("a TPR needs at least one member and one non-member")
    found = round(tpr * members)
    if found == 0:
        return 1.0
    allowed = math.floor(max_fpr * non_members + 1e-9)
    return float(hypergeom(members + non_members, members, found + allowed).sf(found - 1))


def logit_confidence(losses: Sequence[float] | np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` for ``p = exp(-loss)``: ``-loss - log(-expm1(-loss))``, stable at both ends."""
    loss = np.maximum(np.asarray(losses, dtype=np.float64), 1e-12)
    return -loss - np.log(-np.expm1(-loss))


@dataclass(frozen=True)
class LiraScores:
    """Per-example LiRA scores (higher: member)."""

    online: list[float]
    offline: list[float]


def lira_scores(
    target_losses: Sequence[float],
    shadow_losses: Sequence[Sequence[float]],
    shadow_included: Sequence[Sequence[bool]],
    min_std: float = 1e-3,
) -> LiraScores:
    """LiRA scores of each example from the target's and the shadows' losses.

    Args:
        target_losses: Loss of the target model per example, shape (n,).
        shadow_losses: Loss of each shadow per example, shape (shadows, n).
        shadow_included: Whether each shadow trained on each example, shape (shadows, n).
        min_std: Floor of the pooled standard deviations.

    Raises:
        ValueError: Shapes disagree, or no shadow was trained at all.

    """
    target = logit_confidence(target_losses)
    phi = logit_confidence(np.asarray(shadow_losses, dtype=np.float64))
    inside = np.asarray(shadow_included, dtype=bool)
    if phi.ndim != 2 or phi.shape != inside.shape or phi.shape[1] != target.shape[0]:
        raise ValueError(
            f"shapes: target {target.shape}, shadow losses {phi.shape}, shadow membership {inside.shape}"
        )
    if phi.shape[0] == 0:
        raise ValueError("LiRA needs at least one shadow model")
    mu_in = _masked_means(phi, inside)
    mu_out = _masked_means(phi, ~inside)
    std_in = max(_pooled_std(phi, inside, mu_in), min_std)
    std_out = max(_pooled_std(phi, ~inside, mu_out), min_std)
    online = _log_normal(target, mu_in, std_in) - _log_normal(target, mu_out, std_out)
    offline = (target - mu_out) / std_out
    return LiraScores(online=[float(x) for x in online], offline=[float(x) for x in offline])


def _masked_means(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    counts = mask.sum(axis=0)
    sums = np.where(mask, values, 0.0).sum(axis=0)
    fallback = float(values[mask].mean()) if mask.any() else float(values.mean())
    return np.where(counts > 0, sums / np.maximum(counts, 1), fallback)


def _pooled_std(values: np.ndarray, mask: np.ndarray, means: np.ndarray) -> float:
    residuals = (values - means[None, :])[mask]
    return float(np.sqrt(np.mean(residuals**2))) if residuals.size else 0.0


def _log_normal(x: np.ndarray, mu: np.ndarray, std: float) -> np.ndarray:
    return -0.5 * ((x - mu) / std) ** 2 - math.log(std)
