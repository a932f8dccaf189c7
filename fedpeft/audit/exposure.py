"""Exposure of a canary: how far up its loss ranks among candidates never inserted.

Paper: The Secret Sharer: Evaluating and Testing Unintended Memorization in Neural
Networks (Carlini, Liu, Erlingsson, Kos, Song, 2019).

``exposure = log2 |R| - log2 rank``, where ``rank`` is the canary's 1-based position
when every candidate secret of the randomness space R is sorted by the model's loss
(lowest first). fedpeft ranks among a sample of never-inserted references, so here
R = the references plus the canary itself and exposure lies in
``[0, log2(len(references) + 1)]``; the expected exposure of a canary the model has not
memorised is about ``log2 e = 1.44`` bits. Ties count against the canary (rank is one
plus the number of references whose loss is lower *or equal*), so a model that gives
every candidate the same loss shows exposure 0, never a memorisation it does not have.

The *extrapolated* exposure (the paper's section 4.3) fits a distribution to the
references' scores and reads the canary's tail probability from it: ``-log2 P(S <=
score)``. It can exceed the sampled maximum. The paper fits a skew-normal to
log-perplexities; fedpeft fits a normal distribution to whatever score it is given,
and the audit gives it the negated logit-scaled confidence ``-log(p / (1 - p))`` with
``p = exp(-loss)``, which is close to Gaussian where raw losses are not (Carlini et
al., 2022, Membership Inference Attacks From First Principles). An estimate, not a
measurement.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def canary_rank(canary_loss: float, reference_losses: Sequence[float]) -> int:
    """1 + the number of references whose loss is at most the canary's."""
    return 1 + sum(1 for loss in reference_losses if loss <= canary_loss)


def exposure(canary_loss: float, reference_losses: Sequence[float]) -> float:
    """``log2(len(references) + 1) - log2(rank)`` (see the module docstring).

    Raises:
        ValueError: No references, or a loss that is not a number.

    """
    if not reference_losses:
        raise ValueError("exposure needs at least one reference loss")
    if math.isnan(canary_loss) or any(math.isnan(x) for x in reference_losses):
        raise ValueError("exposure: a loss is NaN")
    return math.log2(len(reference_losses) + 1) - math.log2(canary_rank(canary_loss, reference_losses))


def extrapolated_exposure(canary_loss: float, reference_losses: Sequence[float]) -> float:
    """``-log2 Phi((score - mu) / sigma)`` under a normal fit to the references' scores.

    Lower scores are more exposed, as with losses; see the module docstring for the
    score the audit passes.

    Raises:
        ValueError: Fewer than two references, or references that all share one loss.

    """
    if len(reference_losses) < 2:
        raise ValueError("extrapolated exposure needs at least two reference losses")
    mu = statistics.fmean(reference_losses)
    sigma = statistics.stdev(reference_losses)
    if sigma == 0:
        raise ValueError("extrapolated exposure: every reference has the same loss")
    z = (canary_loss - mu) / sigma
    # log of the normal CDF, stable far in the lower tail: Phi(z) = erfc(-z / sqrt 2) / 2.
    tail = 0.5 * math.erfc(-z / math.sqrt(2))
    if tail > 0:
        return -math.log2(tail)
    # Mills ratio asymptote for z << 0: log Phi(z) ~ -z^2/2 - log(-z sqrt(2 pi)).
    return (z * z / 2 + math.log(-z * math.sqrt(2 * math.pi))) / math.log(2)
