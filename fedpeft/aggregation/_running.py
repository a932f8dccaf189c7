"""Running weighted means: fold one decoded update in at a time.

Streaming aggregation (issue 20) holds a round's running sum instead of every update:
peak memory is the sum (the adapter's bytes once more) plus the update being folded
in, whatever the cohort.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from fedpeft.aggregation.base import AggregationResult, ClientUpdate


def sum_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """float32 for float32 and half-precision updates; float64 only when an update has it.

    float32 sums of n updates are within about ``sqrt(n) * 6e-8`` of the exact mean
    relative to its terms (about 2e-6 for a cohort of 1,000), far below the spread of
    the clients' updates themselves; float64 sums would double the memory the issue
    bounds and the bytes every fold reads.
    """
    return torch.float64 if torch.float64 in dtypes else torch.float32


class RunningMean:
    """``sum_i w_i x_i / sum_i w_i`` per tensor, accumulated as updates arrive.

    The sums live in one flat buffer (each tensor's sum a view of it), in
    :func:`sum_dtype`; arrival order changes the mean only by float rounding. The
    names, shapes and dtypes are the first update's, as :func:`_math.weighted_mean`
    takes them.
    """

    def __init__(self) -> None:
        self.flat = torch.zeros(0)
        self.sums: dict[str, Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.total_weight = 0.0
        self.count = 0
        self.divided = False

    def _start(self, delta: Mapping[str, Tensor]) -> None:
        """One flat buffer, the sums as views of it."""
        dtype = sum_dtype([t.dtype for t in delta.values()])
        self.flat = torch.zeros(sum(t.numel() for t in delta.values()), dtype=dtype)
        offset = 0
        for name, tensor in delta.items():
            self.sums[name] = self.flat[offset : offset + tensor.numel()].view(tensor.shape)
            self.dtypes[name] = tensor.dtype
            offset += tensor.numel()

    def add(self, delta: Mapping[str, Tensor], weight: float) -> None:
        """Fold ``weight * delta`` in (``delta``: name -> tensor, the first update's names).

        Raises:
            ValueError: ``weight`` is negative or not finite, or a tensor's shape
                differs from the first update's.
            KeyError: ``delta`` lacks a tensor the first update had.
            RuntimeError: :meth:`mean` was called (the accumulation is over).

        """
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weights must be finite and >= 0, got {weight}")
        if self.divided:
            raise RuntimeError("the mean was taken: this round's accumulation is over")
        if not self.sums:
            self._start(delta)
        for name, total in self.sums.items():
            if delta[name].shape != total.shape:
                raise ValueError(
                    f"tensor {name}: shape {tuple(delta[name].shape)}, first update {tuple(total.shape)}"
                )
        sums = list(self.sums.values())
        values = [delta[name].to(self.flat.dtype) for name in self.sums]  # no copy when dtypes agree
        # One multi-tensor add: a LoRA adapter has hundreds of small tensors.
        torch._foreach_add_(sums, values, alpha=weight)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> dict[str, Tensor]:
        """The mean, each tensor cast to the dtype the first update had.

        Divides the sums in place (the round's result needs no second buffer of
        adapter size), so it ends the accumulation: later calls return the same mean,
        and :meth:`add` refuses.

        Raises:
            ValueError: Nothing was added, or the weights sum to zero.

        """
        if not self.count:
            raise ValueError("weighted_mean of no states")
        if not self.total_weight > 0:
            raise ValueError("weights must sum to a positive number")
        if not self.divided:
            self.flat.div_(self.total_weight)
            self.divided = True
        return {name: t.to(self.dtypes[name]) for name, t in self.sums.items()}


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
