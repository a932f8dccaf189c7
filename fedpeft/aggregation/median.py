"""Coordinate-wise median of the client deltas (FedMedian).

Paper: Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates
(Yin, Chen, Ramchandran & Bartlett, 2018).

Notes:
    Each coordinate of the step is the median of the clients' values, so fewer than
    half of the clients cannot move it outside the range of the honest values. The
    example counts are ignored (as in Flower's ``FedMedian``): a poisoned client could
    claim any count. The median is not the mean even for honest clients, so with
    non-IID data it converges to a different point than FedAvg.

"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from fedpeft.aggregation._math import coordinate_median
from fedpeft.aggregation.base import AGGREGATORS, AggregationResult, ClientUpdate
from fedpeft.models import apply_delta


@AGGREGATORS.register("median")
class Median:
    """``global + server_lr * median_i delta_i``, per coordinate.

    For an even number of clients the two middle values are averaged, as
    ``numpy.median`` and Flower's ``aggregate_median`` do.

    Args:
        server_lr: Step size applied to the median delta (1.0 is plain FedMedian).

    """

    def __init__(self, server_lr: float = 1.0) -> None:
        if server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr

    def aggregate(
        self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> AggregationResult:
        """Take the coordinate-wise median of the deltas and step the global state."""
        median_delta = coordinate_median([u.delta for u in updates])
        return AggregationResult(apply_delta(global_state, median_delta, self.server_lr))

    def accumulator(self, global_state: Mapping[str, Tensor], cohort: int | None = None) -> None:
        """No streaming: the coordinate-wise median needs every update at once."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The median keeps no state between rounds."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""
