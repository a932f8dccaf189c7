"""The LoRA factor-averaging error, streamed: exact for small cohorts, sketched beyond.

``||mean(B_i A_i) - mean(B_i) mean(A_i)||_F`` has pairwise terms between clients, so no
running sum of adapter size gives it exactly. :class:`RunningFactorAveragingError`
keeps the clients' factor deltas while they fit a budget (:data:`EXACT_VALUES`) and
computes the exact value in rank space (``_lora.factor_averaging_error``); a cohort
beyond it is sketched instead, in memory of adapter size at most.

The sketch: per layer, the gap is ``M = sum_i p_i dB_i dA_i - dB dA`` (deltas only;
the global factors cancel, as in ``_lora.averaging_gap_factors``). All layers together
are the block-diagonal ``M``; two CountSketches ``S_L`` (m x sum of outs) and ``S_R``
(m x sum of ins) map it to the m x m core ``S_L M S_R^T``, which is linear in the
updates: ``sum_i p_i (S_L dB_i)(dA_i S_R^T)`` minus the sketched means' product, so
each update adds one m x (L r) by (L r) x m product and is dropped. Each coordinate
goes to one of m buckets with a random sign (buckets from a random permutation, each
filled equally, so two coordinates share one with probability at most 1/m).

Paper: Finding Frequent Items in Data Streams (Charikar, Chen & Farach-Colton, 2002)
for the CountSketch; the variance bound below follows the usual argument for it,
applied once per side.

Notes:
    ``X = ||S_L M S_R^T||_F^2`` is unbiased for ``||M||_F^2`` (the signs are
    independent, so cross terms vanish in expectation), and
    ``std(X) <= rho ||M||_F^2`` with ``rho = sqrt(2/m + 2/m + 4/m^2)``: conditioned on
    ``S_R``, the left sketch adds variance at most ``2/m ||M S_R^T||^4``, and the right
    one ``2/m ||M||^4``. The reported norm ``sqrt(X)`` is off by at most
    ``|X - ||M||^2| / ||M||``, so its relative error is at most the squared estimate's
    (about half of it for small errors): with m = 128, ``rho = 0.18``, so the norm is
    within 18% of the exact value with probability >= 3/4 and within 53% with
    probability >= 8/9 (Chebyshev; in practice far closer, since many coordinates
    average). The sketch is fixed by a seed, so the metric is reproducible.

"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedpeft.aggregation._lora import LoraPair, factor_averaging_error, lora_pairs

EXACT_VALUES = 2**25
"""Factor values (all layers, all clients) held for the exact route: 128 MiB of float32.

A cohort whose factors fit is computed exactly (a 1 M-parameter LLM-shaped adapter up to
32 clients, a MiniLM adapter of 74 k LoRA values up to 450); a larger one is sketched."""

SKETCH_SIZE = 128
"""Buckets m per side of the sketch: an m x m float64 core (128 KiB) and
``rho = sqrt(4/m + 4/m^2) = 0.18``."""


def sketch_relative_std(size: int) -> float:
    """The bound ``rho`` on the relative standard deviation of the squared estimate."""
    return math.sqrt(4 / size + 4 / size**2)


@dataclass(frozen=True)
class GapEstimate:
    """The factor-averaging error and how it was obtained.

    Attributes:
        value: ``sqrt(sum over layers ||mean(B_i A_i) - mean(B_i) mean(A_i)||_F^2)``.
        relative_std: 0 for the exact value; for a sketch, the bound ``rho`` on the
            relative standard deviation of the squared estimate (see the module notes).

    """

    value: float
    relative_std: float


class _CountSketchSide:
    """One side's CountSketch of one layer: each of n coordinates to one of m signed buckets.

    Buckets come from a random permutation (position mod m), so every bucket holds
    ``n / m`` coordinates, rounded, and two coordinates share one with probability at
    most 1/m. The map is kept as an m x n CSR matrix (one signed 1 per column; int32
    indices: 8 bytes a coordinate), so sketching a factor is one sparse-dense product in
    the factor's own precision, with no permuted copy of it.
    """

    def __init__(self, size: int, buckets: int, generator: torch.Generator) -> None:
        bucket = torch.randperm(size, generator=generator) % buckets
        signs = (torch.randint(0, 2, (size,), generator=generator) * 2 - 1).to(torch.float32)
        order = torch.argsort(bucket, stable=True)
        row_starts = torch.zeros(buckets + 1, dtype=torch.int64)
        row_starts[1:] = torch.cumsum(torch.bincount(bucket, minlength=buckets), 0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.matrix = torch.sparse_csr_tensor(
                row_starts.to(torch.int32),
                order.to(torch.int32),
                signs[order],
                (buckets, size),
                check_invariants=False,  # valid by construction; checking costs a pass
            )

    def __call__(self, factor: Tensor) -> Tensor:
        """``S X`` for X (n x r, possibly a transposed view): m x r, float32 or float64."""
        if factor.dtype not in (torch.float32, torch.float64):
            factor = factor.float()  # CPU sparse products have no half-precision kernels
        matrix = self.matrix if factor.dtype == self.matrix.dtype else self.matrix.to(factor.dtype)
        return matrix @ factor


class FactorGapSketch:
    """The m x m sketch ``S_L (sum_i w_i blockdiag(dB_i dA_i)) S_R^T`` of a stream of updates.

    Each update costs two sparse-dense products per LoRA pair (its B's rows and its A's
    columns into m buckets, in the update's own precision) and one m x (sum of ranks)
    product into the float64 core.

    Args:
        global_state: The round's global adapter (names and shapes).
        pairs: The LoRA pairs of ``global_state``.
        size: Buckets m per side.
        seed: Fixes the sketch (every round and run draws the same one).

    """

    def __init__(
        self, global_state: Mapping[str, Tensor], pairs: list[LoraPair], size: int, seed: int
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.size = size
        self.pairs = pairs
        self.shapes = {name: global_state[name].shape for p in pairs for name in (p.a, p.b)}
        self.sides = [
            (
                _CountSketchSide(self.shapes[p.b][0], size, generator),
                _CountSketchSide(self.shapes[p.a][1], size, generator),
            )
            for p in pairs
        ]
        self.core = torch.zeros(size, size, dtype=torch.float64)

    def _factor(self, delta: Mapping[str, Tensor], name: str) -> Tensor:
        """``delta[name]``, or zeros when the update leaves that factor unchanged."""
        found = delta.get(name)
        return found if found is not None else torch.zeros(self.shapes[name])

    def _sides(self, delta: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``[S_L dB_1 ... S_L dB_L]`` and ``[S_R dA_1^T ... S_R dA_L^T]`` (each m x L r), float64."""
        lefts, rights = [], []
        for pair, (left, right) in zip(self.pairs, self.sides, strict=True):
            lefts.append(left(self._factor(delta, pair.b)))
            rights.append(right(self._factor(delta, pair.a).T))
        return torch.cat(lefts, dim=1).to(torch.float64), torch.cat(rights, dim=1).to(torch.float64)

    def add(self, delta: Mapping[str, Tensor], weight: float) -> None:
        """Fold ``weight * blockdiag(dB dA)`` of one update into the core (absent factors are 0)."""
        left, right = self._sides(delta)
        self.core.addmm_(left, right.T, alpha=weight)

    def squared_norm(self, total_weight: float, mean: Mapping[str, Tensor]) -> float:
        """The estimate of ``||M||_F^2`` given the weights' sum and the mean factor deltas."""
        left, right = self._sides(mean)
        return float(torch.linalg.matrix_norm(self.core / total_weight - left @ right.T) ** 2)


class RunningFactorAveragingError:
    """The factor-averaging error of a round, fed one update at a time.

    Exact while every update's factors fit ``exact_values`` (decided from ``cohort``
    when given, so a large round is sketched from its first update and never holds
    them); otherwise, or once more updates arrive than fit, the :class:`FactorGapSketch`.

    Args:
        global_state: The round's global adapter; must hold at least one LoRA pair.
        cohort: Updates the round expects, when known.
        exact_values: Factor values the exact route may hold.
        sketch_size: Buckets m per side of the sketch.
        seed: Fixes the sketch.

    """

    def __init__(
        self,
        global_state: Mapping[str, Tensor],
        cohort: int | None = None,
        exact_values: int = EXACT_VALUES,
        sketch_size: int = SKETCH_SIZE,
        seed: int = 0,
    ) -> None:
        self.global_state = global_state
        self.pairs = lora_pairs(list(global_state))
        if not self.pairs:
            raise ValueError("the factor-averaging error needs at least one LoRA pair")
        self.per_update = sum(global_state[p.a].numel() + global_state[p.b].numel() for p in self.pairs)
        self.exact_values = exact_values
        self.sketch_size = sketch_size
        self.seed = seed
        self.held: list[dict[str, Tensor]] = []
        self.weights: list[float] = []
        self.sketch: FactorGapSketch | None = None
        if cohort is not None and cohort * self.per_update > exact_values:
            self._start_sketch()

    def _start_sketch(self) -> None:
        """Switch to the sketch, folding in (and dropping) the factors held so far."""
        self.sketch = FactorGapSketch(self.global_state, self.pairs, self.sketch_size, self.seed)
        for delta, weight in zip(self.held, self.weights, strict=True):
            self.sketch.add(delta, weight)
        self.held = []

    def add(self, delta: Mapping[str, Tensor], weight: float) -> None:
        """Fold one update's factor deltas in (other tensors are not kept)."""
        if self.sketch is None and (len(self.held) + 1) * self.per_update > self.exact_values:
            self._start_sketch()
        self.weights.append(weight)
        if self.sketch is not None:
            self.sketch.add(delta, weight)
            return
        self.held.append({name: delta[name] for p in self.pairs for name in (p.a, p.b) if name in delta})

    def finish(self, mean: Mapping[str, Tensor]) -> GapEstimate:
        """The error, exact or sketched.

        Args:
            mean: name -> the weighted mean delta (same weights as :meth:`add`);
                the sketch needs it, the exact route recomputes it.

        """
        if self.sketch is None:
            return GapEstimate(factor_averaging_error(self.global_state, self.held, self.weights), 0.0)
        squared = self.sketch.squared_norm(float(sum(self.weights)), mean)
        return GapEstimate(math.sqrt(max(squared, 0.0)), sketch_relative_std(self.sketch_size))
