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
    """One side's CountSketch for a batch of layers of one rank, applied to their stacked rows.

    Each layer's n coordinates are permuted at random, padded to a multiple of m and
    folded: coordinate j goes to bucket ``position(j) mod m`` with a random sign. The
    layers' rows are stacked (``[X_1; ...; X_L; 0]``, the zero row for the padding), so
    one gather, one sign flip and one scatter of m-row chunks sketch them all: 8 bytes
    kept per coordinate (an int32 source row and a float32 sign).
    """

    def __init__(self, sizes: list[int], buckets: int, generator: torch.Generator) -> None:
        self.buckets = buckets
        self.layers = len(sizes)
        sources, chunk_layers = [], []
        offset, zero_row = 0, sum(sizes)
        for layer, size in enumerate(sizes):
            padded = -(-size // buckets) * buckets
            order = torch.randperm(padded, generator=generator)
            sources.append(torch.where(order < size, order + offset, zero_row))
            chunk_layers.append(torch.full((padded // buckets,), layer))
            offset += size
        self.sources = torch.cat(sources).to(torch.int32)
        # float32: a same-dtype multiply is several times faster than one by int8 signs.
        self.signs = (torch.randint(0, 2, (len(self.sources),), generator=generator) * 2 - 1).to(
            torch.float32
        )
        self.chunk_layers = torch.cat(chunk_layers)

    def fold(self, rows: Tensor) -> Tensor:
        """``rows`` (sum of n + 1 x r, the last row zero) -> ``[S_1 X_1 ... S_L X_L]``, m x L r float64."""
        rank = rows.shape[1]
        mixed = (rows.index_select(0, self.sources) * self.signs.to(rows.dtype)[:, None]).to(torch.float64)
        per_layer = torch.zeros(self.layers, self.buckets * rank, dtype=torch.float64)
        per_layer.index_add_(0, self.chunk_layers, mixed.view(-1, self.buckets * rank))
        return per_layer.view(self.layers, self.buckets, rank).transpose(0, 1).reshape(self.buckets, -1)


_BATCH_VALUES = 2**18
"""Factor values sketched per batch of layers: bounds the copies an update makes."""


class FactorGapSketch:
    """The m x m sketch ``S_L (sum_i w_i blockdiag(dB_i dA_i)) S_R^T`` of a stream of updates.

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
        self.shapes = {name: global_state[name].shape for p in pairs for name in (p.a, p.b)}
        self.batches: list[tuple[list[LoraPair], _CountSketchSide, _CountSketchSide]] = []
        batch: list[LoraPair] = []
        for pair in sorted(pairs, key=lambda p: global_state[p.a].shape[0]):  # by rank
            rank = global_state[pair.a].shape[0]
            values = global_state[pair.a].numel() + global_state[pair.b].numel()
            if batch and (
                global_state[batch[0].a].shape[0] != rank
                or sum(self._values(p) for p in batch) + values > _BATCH_VALUES
            ):
                self._close(batch, generator)
                batch = []
            batch.append(pair)
        self._close(batch, generator)
        self.core = torch.zeros(size, size, dtype=torch.float64)

    def _values(self, pair: LoraPair) -> int:
        """Factor values of one pair."""
        return self.shapes[pair.a].numel() + self.shapes[pair.b].numel()

    def _close(self, batch: list[LoraPair], generator: torch.Generator) -> None:
        """Draw the two sides' sketches of one batch of layers."""
        left = _CountSketchSide([self.shapes[p.b][0] for p in batch], self.size, generator)
        right = _CountSketchSide([self.shapes[p.a][1] for p in batch], self.size, generator)
        self.batches.append((batch, left, right))

    def _factor(self, delta: Mapping[str, Tensor], name: str) -> Tensor:
        """``delta[name]``, or zeros when the update leaves that factor unchanged."""
        found = delta.get(name)
        return found if found is not None else torch.zeros(self.shapes[name])

    def _sides(self, delta: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``[S_L dB_1 ... S_L dB_L]`` and ``[S_R dA_1^T ... S_R dA_L^T]`` (each m x L r), float64."""
        lefts, rights = [], []
        for pairs, left, right in self.batches:
            b = [self._factor(delta, p.b) for p in pairs]
            a = [self._factor(delta, p.a).T for p in pairs]
            lefts.append(left.fold(torch.cat([*b, b[0].new_zeros(1, b[0].shape[1])])))
            rights.append(right.fold(torch.cat([*a, a[0].new_zeros(1, a[0].shape[1])])))
        return torch.cat(lefts, dim=1), torch.cat(rights, dim=1)

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
            mean: name -> the weighted mean delta (same weights as :meth:`add`), float64;
                the sketch needs it, the exact route recomputes it.

        """
        if self.sketch is None:
            return GapEstimate(factor_averaging_error(self.global_state, self.held, self.weights), 0.0)
        squared = self.sketch.squared_norm(float(sum(self.weights)), mean)
        return GapEstimate(math.sqrt(max(squared, 0.0)), sketch_relative_std(self.sketch_size))
