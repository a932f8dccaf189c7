"""Pure tensor math shared by aggregators."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def weighted_mean(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Per-tensor ``sum_i w_i x_i / sum_i w_i``, accumulated in float64.

    Float64 accumulation makes the result independent of client order up to the final
    rounding, which the order-invariance contract relies on.
    """
    if not states:
        raise ValueError("weighted_mean of no states")
    if len(states) != len(weights):
        raise ValueError("one weight per state is required")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    names = list(states[0])
    result = {}
    for name in names:
        acc = torch.zeros(states[0][name].shape, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += state[name].to(torch.float64) * (weight / total)
        result[name] = acc.to(states[0][name].dtype)
    return result


def update_norm(delta: Mapping[str, Tensor]) -> float:
    """L2 norm of an update over all its tensors together, accumulated in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for tensor in delta.values():
        total += (tensor.to(torch.float64) ** 2).sum()
    return float(total.sqrt())


def clip_update_norm(delta: Mapping[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """``delta * min(1, max_norm / ||delta||)`` with the norm over all tensors together.

    An update already within ``max_norm`` (including the zero update) is returned
    unscaled, so the result never divides by zero. Scaling is done in float64 and cast
    back, so each tensor keeps its dtype; since rounding to a narrow dtype (bfloat16
    keeps 8 bits) can push the norm of the stored values above ``max_norm`` (1.0006
    for 1.0 in bfloat16), the scale then shrinks by a growing margin until the rounded
    result is within it. The bound ``update_norm(result) <= max_norm`` is what DP's
    sensitivity rests on, so it holds exactly, in every dtype.

    Raises:
        ValueError: ``max_norm`` is not positive, or the update is not finite (its norm
            is NaN or infinite, which no scale could bound).

    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = update_norm(delta)
    if not math.isfinite(norm):
        raise ValueError(f"cannot clip an update with non-finite norm {norm}")
    if norm <= max_norm:
        return {name: tensor.clone() for name, tensor in delta.items()}
    scale = max_norm / norm
    margin = max((torch.finfo(t.dtype).eps for t in delta.values() if t.is_floating_point()), default=0.0)
    margin = max(margin, 2.0**-52)
    while True:
        clipped = {name: (t.to(torch.float64) * scale).to(t.dtype) for name, t in delta.items()}
        if update_norm(clipped) <= max_norm:
            return clipped
        # Shrinks to 0 within ~60 passes at worst, and the zero update is within any bound.
        scale = scale * (1 - margin) if margin < 0.5 else 0.0
        margin *= 2


def _stacked(states: Sequence[Mapping[str, Tensor]], name: str) -> Tensor:
    """``states[i][name]`` stacked along a new first axis, in float64: (n, *shape)."""
    return torch.stack([state[name].to(torch.float64) for state in states])


def coordinate_median(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Per-coordinate median over the states, each tensor in its own dtype.

    For an even count the two middle values are averaged, as ``numpy.median`` does
    (``torch.median`` would return the lower one).
    """
    if not states:
        raise ValueError("coordinate_median of no states")
    count = len(states)
    result = {}
    for name, first in states[0].items():
        ordered = _stacked(states, name).sort(dim=0).values
        middle = ordered[count // 2]
        if count % 2 == 0:
            middle = (ordered[count // 2 - 1] + middle) / 2
        result[name] = middle.to(first.dtype)
    return result


def trimmed_count(count: int, beta: float) -> int:
    """Values cut from *each* end: ``int(beta * count)``, as Flower's ``_trim_mean`` (scipy)."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    return int(beta * count)


def coordinate_trimmed_mean(states: Sequence[Mapping[str, Tensor]], beta: float) -> dict[str, Tensor]:
    """Per-coordinate mean after dropping the ``int(beta * n)`` lowest and highest values.

    Args:
        states: n states with the same names and shapes.
        beta: Fraction cut from each end, in [0, 0.5) (so at least one value is kept).

    """
    if not states:
        raise ValueError("coordinate_trimmed_mean of no states")
    count = len(states)
    cut = trimmed_count(count, beta)
    result = {}
    for name, first in states[0].items():
        ordered = _stacked(states, name).sort(dim=0).values
        result[name] = ordered[cut : count - cut].mean(dim=0).to(first.dtype)
    return result


def pairwise_squared_distances(states: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """``D[i, j] = ||x_i - x_j||^2`` over all tensors together, in float64: (n, n).

    Computed from differences, not from the Gram matrix, so that near-identical states
    get distances near zero instead of cancellation noise.
    """
    if not states:
        raise ValueError("pairwise_squared_distances of no states")
    count = len(states)
    distances = torch.zeros(count, count, dtype=torch.float64)
    for name in states[0]:
        flat = _stacked(states, name).reshape(count, -1)
        for i in range(count):
            distances[i] += ((flat - flat[i]) ** 2).sum(dim=1)
    return distances


def krum_scores(states: Sequence[Mapping[str, Tensor]], num_malicious: int) -> list[float]:
    """Krum's score of each state: the sum of squared distances to its closest neighbours.

    The number of neighbours is ``max(1, n - num_malicious - 2)`` as in Flower's
    ``aggregate_krum`` (Krum's ``n - f - 2``, at least one), capped at ``n - 1``.
    """
    if num_malicious < 0:
        raise ValueError(f"num_malicious must be >= 0, got {num_malicious}")
    distances = pairwise_squared_distances(states)
    count = len(states)
    neighbours = min(max(1, count - num_malicious - 2), count - 1)
    scores = []
    for i in range(count):
        others = torch.cat([distances[i, :i], distances[i, i + 1 :]])
        scores.append(float(others.sort().values[:neighbours].sum()))
    return scores
