"""An empirical lower bound on epsilon from one training run.

Paper: Privacy Auditing with One (1) Training Run (Steinke, Nasr, Jagielski, 2023).

m audit examples are each included in training independently with probability 1/2.
After training the auditor ranks them by a membership score, guesses "included" for the
``k_plus`` highest and "excluded" for the ``k_minus`` lowest and abstains on the rest.
If training is (epsilon, delta)-DP, the number of correct guesses W among the r =
k_plus + k_minus guesses satisfies (the paper's Theorem 3.1 with its delta term)

    P[W >= v] <= P[Binomial(r, p) >= v] + 2 m delta max_{i=1..v} P[v - i <= Binomial(r, p) < v] / i,

with ``p = e^eps / (1 + e^eps)``. The empirical lower bound is the largest epsilon that
this p-value still rejects at the chosen confidence: an (epsilon, delta)-DP algorithm
would produce that many correct guesses with probability below ``1 - confidence``.

Trying several (k_plus, k_minus) pairs on the same scores and keeping the best would
overstate the bound, so :func:`epsilon_lower_bound` spends the confidence over the
pairs it tries (Bonferroni): each pair is tested at ``(1 - confidence) / pairs``.

Notes:
    The bound is a valid statement about the *whole training procedure* only if the
    inclusion draws were independent fair coins the training did not see, and each
    audit example is one unit of the guarantee (an example inserted r times is a
    group of r examples: compare it with the group-privacy epsilon, not the per-example one).

"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import binom


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The probability bound of ``v`` or more correct guesses out of ``r`` under (epsilon, delta)-DP.

    Raises:
        ValueError: Counts out of order (``0 <= v <= r <= m``) or a bad epsilon/delta.

    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    p = 1 / (1 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, p))
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    worst, window = 0.0, 0.0
    for i in range(1, v + 1):
        window += float(binom.pmf(v - i, r, p))
        worst = max(worst, window / i)
    return min(tail + 2 * m * delta * worst, 1.0)


def epsilon_for(m: int, r: int, v: int, delta: float, alpha: float, tolerance: float = 1e-4) -> float:
    """The largest epsilon whose p-value for (m, r, v) is still below ``alpha`` (0 if none)."""
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < alpha:
        low, high = high, 2 * high
        if high > 1e3:
            return math.inf
    while high - low > tolerance:
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) < alpha:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class OneRunAudit:
    """The empirical epsilon lower bound and the guesses that gave it.

    Attributes:
        epsilon: The lower bound (0 when the guesses prove nothing).
        m: Audit examples.
        k_plus, k_minus: Guesses of "included" (highest scores) and "excluded" (lowest).
        correct: Correct guesses among them.
        delta: The delta of the null hypothesis.
        confidence: Overall confidence, after the correction for the pairs tried.
        pairs_tried: (k_plus, k_minus) pairs the confidence was split over.

    """

    epsilon: float
    m: int
    k_plus: int
    k_minus: int
    correct: int
    delta: float
    confidence: float
    pairs_tried: int


def correct_guesses(scores: Sequence[float], included: Sequence[bool], k_plus: int, k_minus: int) -> int:
    """Correct guesses when the ``k_plus`` highest scores say "in" and the ``k_minus`` lowest "out".

    Ties are broken by position (a fixed, data-independent rule).
    """
    if k_plus + k_minus > len(scores):
        raise ValueError(f"k_plus + k_minus = {k_plus + k_minus} guesses for {len(scores)} examples")
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    lowest, highest = order[:k_minus], order[len(order) - k_plus :]
    return sum(1 for i in highest if included[i]) + sum(1 for i in lowest if not included[i])


def default_guess_counts(m: int) -> list[tuple[int, int]]:
    """(k_plus, k_minus) pairs to try: 5 %, 10 %, 20 %, 50 % of m on each side (each at least 1)."""
    pairs = []
    for fraction in (0.05, 0.1, 0.2, 0.5):
        k = max(1, int(fraction * m))
        if 2 * k <= m and (k, k) not in pairs:
            pairs.append((k, k))
    for fraction in (0.05, 0.1, 0.2):
        k = max(1, int(fraction * m))
        if k <= m and (k, 0) not in pairs:
            pairs.append((k, 0))
    return pairs


def epsilon_lower_bound(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None,
) -> OneRunAudit:
    """The best bound over ``guess_counts`` (default :func:`default_guess_counts`), Bonferroni-corrected.

    Raises:
        ValueError: Lengths differ, no examples, or a confidence outside (0, 1).

    """
    if len(scores) != len(included):
        raise ValueError(f"{len(scores)} scores but {len(included)} inclusion flags")
    if not scores:
        raise ValueError("the one-run audit needs at least one audit example")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    m = len(scores)
    pairs = list(guess_counts) if guess_counts is not None else default_guess_counts(m)
    alpha = (1 - confidence) / len(pairs)
    best = OneRunAudit(0.0, m, 0, 0, 0, delta, confidence, len(pairs))
    for k_plus, k_minus in pairs:
        v = correct_guesses(scores, included, k_plus, k_minus)
        epsilon = epsilon_for(m, k_plus + k_minus, v, delta, alpha)
        if epsilon > best.epsilon:
            best = OneRunAudit(epsilon, m, k_plus, k_minus, v, delta, confidence, len(pairs))
    return best
