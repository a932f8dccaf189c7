"""Running weighted means: fold one decoded update in at a time, in float64.

Streaming aggregation (issue 20) holds a round's running sum instead of every update:
peak memory is the sum (twice the adapter's float32 bytes) plus the update being
folded in, whatever the cohort.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from fedpeft.aggregation.base import AggregationResult, ClientUpdate

FOLD_VALUES = 2**18
"""Values folded per add (1 MiB of float32): bounds the float64 copy an update makes."""


class RunningMean:
    """``sum_i w_i x_i / sum_i w_i`` per tensor, accumulated in float64 as updates arrive.

    Float64 sums make the mean independent of arrival order up to float64 rounding,
    far below the final cast to each tensor's own dtype (float32: the same values bit
    for bit unless a sum lands within 1e-9 of a float32 rounding boundary). The names,
    shapes and dtypes are the first update's, as :func:`_math.weighted_mean` takes them.
    """

    def __init__(self) -> None:
        self.flat = torch.zeros(0, dtype=torch.float64)
        self.sums: dict[str, Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.groups: list[tuple[list[str], int, int]] = []
        self.total_weight = 0.0
        self.count = 0

    def _start(self, delta: Mapping[str, Tensor]) -> None:
        """One flat float64 buffer (``sums`` are views of it) and the tensor groups folded at once."""
        self.flat = torch.zeros(sum(t.numel() for t in delta.values()), dtype=torch.float64)
        offset = 0
        group: list[str] = []
        start = 0
        for name, tensor in delta.items():
            self.sums[name] = self.flat[offset : offset + tensor.numel()].view(tensor.shape)
            self.dtypes[name] = tensor.dtype
            if group and offset + tensor.numel() - start > FOLD_VALUES:
                self.groups.append((group, start, offset))
                group, start = [], offset
            group.append(name)
            offset += tensor.numel()
        if group:
            self.groups.append((group, start, offset))

    def add(self, delta: Mapping[str, Tensor], weight: float) -> None:
        """Fold ``weight * delta`` in (``delta``: name -> tensor, the first update's names).

        Raises:
            ValueError: ``weight`` is negative or not finite, or a tensor's shape
                differs from the first update's.
            KeyError: ``delta`` lacks a tensor the first update had.

        """
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weights must be finite and >= 0, got {weight}")
        if not self.sums:
            self._start(delta)
        for name, total in self.sums.items():
            if delta[name].shape != total.shape:
                raise ValueError(
                    f"tensor {name}: shape {tuple(delta[name].shape)}, first update {tuple(total.shape)}"
                )
        for names, start, end in self.groups:
            # A few large adds instead of one per tensor (a LoRA adapter has hundreds of
            # small ones), in bounded pieces so the float64 copy stays small.
            values = torch.cat([delta[name].reshape(-1) for name in names]).to(torch.float64)
            self.flat[start:end].add_(values, alpha=weight)
        self.total_weight += weight
        self.count += 1

    def mean64(self) -> dict[str, Tensor]:
        """The mean in float64 (name -> tensor).

        Raises:
            ValueError: Nothing was added, or the weights sum to zero.

        """
        if not self.count:
            raise ValueError("weighted_mean of no states")
        if not self.total_weight > 0:
            raise ValueError("weights must sum to a positive number")
        return {name: total / self.total_weight for name, total in self.sums.items()}

    def mean(self) -> dict[str, Tensor]:
        """The mean, each tensor cast to the dtype the first update had."""
        return {name: t.to(self.dtypes[name]) for name, t in self.mean64().items()}


class MeanStep:
    """An accumulator that averages the deltas, then hands the mean to a server step.

    For the server optimisers (FedAvgM, FedAdam, FedYogi): they are linear up to their
    one step on the round's mean, so the updates stream and the optimiser state
    changes only in :meth:`finish`.

    Args:
        step: mean delta (name -> tensor) -> the round's result; called once.
        weighted: Weight each update by its example count (else equally).

    """

    def __init__(self, step: Callable[[dict[str, Tensor]], AggregationResult], weighted: bool = True) -> None:
        self.step = step
        self.weighted = weighted
        self.running = RunningMean()

    def add(self, update: ClientUpdate) -> None:
        """Fold one update into the running mean."""
        self.running.add(update.delta, float(update.num_examples) if self.weighted else 1.0)

    def finish(self) -> AggregationResult:
        """Step once on the round's mean."""
        return self.step(self.running.mean())
