"""Pure tensor math shared by aggregators."""

from __future__ import annotations

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
