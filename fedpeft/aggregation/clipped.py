"""Server-side norm clipping of each decoded update, in front of any aggregator.

Paper: Can You Really Backdoor Federated Learning? (Sun, Kairouz, Suresh & McMahan,
2019) shows that bounding each update's norm blunts boosted (scaled-up) poisoned
updates.

Notes:
    Each update is scaled to L2 norm at most ``max_update_norm`` over all its tensors
    together, then the inner aggregator sees the clipped updates. This bounds how far
    one client can move an average, but is not differential privacy: there is no noise
    (that is ``privacy.client``, which clips and averages before any aggregator).

"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import Tensor

from fedpeft.aggregation._math import clip_update_norm, update_norm
from fedpeft.aggregation.base import Accumulator, AggregationResult, Aggregator, ClientUpdate, fold


class ClippedUpdates:
    """Clip every update's norm to ``max_update_norm``, then delegate to ``inner``.

    Adds ``clipped_updates`` (how many updates were scaled down) and
    ``update_norm_median`` (of the norms before clipping) to the inner metrics.
    Clipping is per update, so it streams whenever the inner aggregator does (the
    median of the norms keeps one float per update, not the updates).

    Args:
        inner: The aggregator that combines the clipped updates.
        max_update_norm: Largest L2 norm an update keeps, over all its tensors.

    """

    def __init__(self, inner: Aggregator, max_update_norm: float) -> None:
        if not max_update_norm > 0:
            raise ValueError(f"max_update_norm must be > 0, got {max_update_norm}")
        self.inner = inner
        self.max_update_norm = max_update_norm

    def aggregate(
        self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> AggregationResult:
        """Clip each update, aggregate with the inner aggregator, add clipping metrics.

        Raises:
            ValueError: An update holds NaN or Inf (no scale bounds it; the codecs
                already reject such payloads, so this is a guard).

        """
        streaming = self.accumulator(global_state, len(updates))
        if streaming is not None:
            return fold(streaming, updates)
        norms = [_finite_norm(u) for u in updates]
        clipped = [self._clipped(u, norm) for u, norm in zip(updates, norms, strict=True)]
        return self._with_metrics(self.inner.aggregate(global_state, clipped), norms)

    def accumulator(
        self, global_state: Mapping[str, Tensor], cohort: int | None = None
    ) -> ClippingRound | None:
        """Clip each update as it arrives into the inner round; None if the inner rule does not stream."""
        inner = self.inner.accumulator(global_state, cohort)
        return ClippingRound(self, inner) if inner is not None else None

    def _clipped(self, update: ClientUpdate, norm: float) -> ClientUpdate:
        """The update scaled to ``max_update_norm`` if its ``norm`` exceeds it, else itself."""
        if norm > self.max_update_norm:
            return replace(update, delta=clip_update_norm(update.delta, self.max_update_norm))
        return update

    def _with_metrics(self, result: AggregationResult, norms: Sequence[float]) -> AggregationResult:
        """The inner result with the clipping metrics added."""
        metrics = {
            **result.metrics,
            "clipped_updates": float(sum(norm > self.max_update_norm for norm in norms)),
            "update_norm_median": statistics.median(norms),
        }
        return AggregationResult(result.state, metrics, result.warnings)

    def state_dict(self) -> dict[str, Any]:
        """The inner aggregator's state (clipping itself keeps none)."""
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the inner aggregator's state."""
        self.inner.load_state_dict(state)


def _finite_norm(update: ClientUpdate) -> float:
    """The update's L2 norm; raises ValueError naming the client if it is not finite."""
    norm = update_norm(update.delta)
    if not math.isfinite(norm):
        raise ValueError(f"update of client {update.client_id} is not finite (norm {norm})")
    return norm


class ClippingRound:
    """A streamed round of :class:`ClippedUpdates`: clip, fold into the inner round, keep the norm."""

    def __init__(self, clipped: ClippedUpdates, inner: Accumulator) -> None:
        self.clipped = clipped
        self.inner = inner
        self.norms: list[float] = []

    def add(self, update: ClientUpdate) -> None:
        """Clip one update and fold it into the inner round.

        Raises:
            ValueError: The update holds NaN or Inf.

        """
        norm = _finite_norm(update)
        self.inner.add(self.clipped._clipped(update, norm))
        self.norms.append(norm)

    def finish(self) -> AggregationResult:
        """The inner round's result with the clipping metrics."""
        return self.clipped._with_metrics(self.inner.finish(), self.norms)
