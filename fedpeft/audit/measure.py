"""Measure a trained global adapter: canary exposure, membership inference, one-run epsilon bounds.

Each function takes the experiment (whose model holds the adapter to audit) and
returns one plain-data section of the report.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from fedpeft.audit.canaries import Canary
from fedpeft.audit.exposure import exposure, extrapolated_exposure
from fedpeft.audit.losses import example_losses
from fedpeft.audit.membership import (
    auc_null_std,
    lira_scores,
    logit_confidence,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)
from fedpeft.audit.one_run import epsilon_lower_bound
from fedpeft.audit.plan import AuditPlan
from fedpeft.audit.shadows import ShadowLosses
from fedpeft.experiment import Experiment

LOW_FPRS = (0.001, 0.01)
"""The false positive rates at which true positive rates are reported (0.1 %, 1 %)."""


def mask_secret(text: str, canaries: Sequence[Canary]) -> str:
    """``text`` with every canary's secret digits replaced by bullets."""
    for canary in canaries:
        if canary.secret in text:
            text = text.replace(canary.secret, " ".join("•" * len(canary.secret.split())))
    return text


def losses_of(
    experiment: Experiment, texts: Sequence[str], labels: Sequence[int | None] | None
) -> list[float]:
    """Per-example losses of the experiment's model as it stands (see :func:`example_losses`)."""
    config = experiment.config
    return example_losses(
        experiment.model.model,
        experiment.model.tokenizer,
        config.model.task,
        texts,
        labels if config.model.task == "sequence-classification" else None,
        config.data.max_length,
        experiment.device,
        config.train.eval_batch_size,
    )


def canary_section(experiment: Experiment, plan: AuditPlan, show_secrets: bool) -> dict[str, Any] | None:
    """Every canary's loss and exposure among the never-inserted references.

    A classifier's references are scored with the canary's own label (the secret is the
    digits; the prefix and label are the context), so each label gets its own ranking.
    """
    if not plan.canaries:
        return None
    canaries = plan.canaries
    is_classifier = experiment.config.model.task == "sequence-classification"
    canary_losses = losses_of(experiment, [c.text for c in canaries], [c.label for c in canaries])
    labels = sorted({c.label for c in canaries}, key=lambda x: -1 if x is None else x)
    reference_losses = {
        label: losses_of(
            experiment, plan.references, [label] * len(plan.references) if is_classifier else None
        )
        for label in labels
    }
    # Negated logit-scaled confidence: near Gaussian, lower means more exposed.
    scaled = {label: [-x for x in logit_confidence(v).tolist()] for label, v in reference_losses.items()}
    items: list[dict[str, Any]] = []
    for canary, loss in zip(canaries, canary_losses, strict=True):
        references = reference_losses[canary.label]
        try:
            canary_score = -float(logit_confidence([loss])[0])
            extrapolated: float | None = extrapolated_exposure(canary_score, scaled[canary.label])
        except ValueError:
            extrapolated = None
        items.append(
            {
                "text": canary.text if show_secrets else mask_secret(canary.text, canaries),
                "label": canary.label,
                "included": canary.included,
                "loss": loss,
                "exposure": exposure(loss, references),
                "extrapolated_exposure": extrapolated,
            }
        )
    inside = [i["exposure"] for i in items if i["included"]]
    outside = [i["exposure"] for i in items if not i["included"]]
    return {
        "count": len(canaries),
        "included": len(inside),
        "repetitions": plan.repetitions,
        "references": len(plan.references),
        "max_exposure": math.log2(len(plan.references) + 1),
        "mean_exposure_included": statistics.fmean(inside) if inside else None,
        "mean_exposure_excluded": statistics.fmean(outside) if outside else None,
        "max_exposure_included": max(inside) if inside else None,
        "secrets_shown": show_secrets,
        "items": items,
    }


def _attack_metrics(name: str, scores: Sequence[float], members: Sequence[bool]) -> dict[str, Any]:
    curve = roc_curve(scores, members)
    return {
        "name": name,
        "auc": roc_auc(scores, members),
        "tpr_at_fpr": {f"{fpr:g}": tpr_at_fpr(scores, members, fpr) for fpr in LOW_FPRS},
        "roc": {"fpr": curve.fpr, "tpr": curve.tpr},
    }


def membership_section(
    plan: AuditPlan, target_losses: Sequence[float], shadows: ShadowLosses | None
) -> dict[str, Any] | None:
    """Loss-attack and LiRA metrics on the membership examples (needs both members and not)."""
    members = [e.included for e in plan.examples]
    if not any(members) or all(members):
        return None
    attacks = [_attack_metrics("loss", [-x for x in target_losses], members)]
    scores: dict[str, list[float]] = {"loss": [-x for x in target_losses]}
    if shadows is not None and shadows.losses:
        lira = lira_scores(target_losses, shadows.losses, shadows.included)
        attacks.append(_attack_metrics("lira_online", lira.online, members))
        attacks.append(_attack_metrics("lira_offline", lira.offline, members))
        scores["lira_online"] = lira.online
    return {
        "members": sum(members),
        "non_members": len(members) - sum(members),
        "auc_null_std": auc_null_std(sum(members), len(members) - sum(members)),
        "shadow_models": 0 if shadows is None else len(shadows.losses),
        "shadow_steps": None if shadows is None else shadows.steps,
        "shadow_training": None if shadows is None else shadows.training,
        "attacks": attacks,
        "scores": scores,
        "included": members,
    }


def one_run_section(
    membership: dict[str, Any] | None,
    canaries: dict[str, Any] | None,
    reported_epsilon: float | None,
    delta: float,
    confidence: float,
) -> list[dict[str, Any]]:
    """Empirical epsilon lower bounds beside the reported epsilon, one per audit source.

    Membership examples are single examples, comparable with the per-example epsilon.
    Canaries inserted r > 1 times are groups of r: their reported bound is group
    privacy's r x epsilon at delta r e^((r-1) epsilon) delta, and none when that delta
    reaches 1.
    """
    results = []
    if membership is not None:
        score_name = "lira_online" if "lira_online" in membership["scores"] else "loss"
        bound = epsilon_lower_bound(
            membership["scores"][score_name], membership["included"], delta, confidence
        )
        results.append(_bound_entry("membership examples", score_name, bound, reported_epsilon, delta, 1))
    if canaries is not None and 0 < canaries["included"] < canaries["count"]:
        reps = canaries["repetitions"]
        group_delta = delta
        group_epsilon = reported_epsilon
        if reported_epsilon is not None and reps > 1:
            group_epsilon = reps * reported_epsilon
            group_delta = reps * math.exp(min((reps - 1) * reported_epsilon, 700)) * delta
            if group_delta >= 1:
                group_epsilon, group_delta = None, delta
        # Exposure, not the raw loss: it ranks each canary among references of its own
        # label, so a model's bias towards one class does not pass for memorisation.
        scores = [item["exposure"] for item in canaries["items"]]
        included = [item["included"] for item in canaries["items"]]
        bound = epsilon_lower_bound(scores, included, min(group_delta, 1.0), confidence)
        results.append(_bound_entry("canaries", "exposure", bound, group_epsilon, group_delta, reps))
    return results


def _bound_entry(
    source: str, score: str, bound: Any, reported: float | None, delta: float, repetitions: int
) -> dict[str, Any]:
    violated = reported is not None and bound.epsilon > reported
    return {
        "source": source,
        "score": score,
        "repetitions": repetitions,
        "epsilon_lower_bound": bound.epsilon if math.isfinite(bound.epsilon) else None,
        "reported_epsilon": reported,
        "delta": delta,
        "m": bound.m,
        "k_plus": bound.k_plus,
        "k_minus": bound.k_minus,
        "correct": bound.correct,
        "confidence": bound.confidence,
        "pairs_tried": bound.pairs_tried,
        "violation": violated,
    }
