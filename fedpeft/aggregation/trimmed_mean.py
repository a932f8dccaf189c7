"""Coordinate-wise trimmed mean of the client deltas (FedTrimmedAvg).

Paper: Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates
(Yin, Chen, Ramchandran & Bartlett, 2018).

Notes:
    Per coordinate, the ``int(beta * n)`` lowest and the ``int(beta * n)`` highest
    client values are dropped and the rest averaged with equal weights, as Flower's
    ``FedTrimmedAvg`` (``aggregate_trimmed_avg``, after scipy's ``trim_mean``) does.
    ``int`` rounds down: with ``beta = 0.2`` nothing is cut below 5 clients, and the
    rule is then the unweighted mean. It tolerates up to ``int(beta * n)`` poisoned
    clients per coordinate. Example counts are ignored. A round in which ``beta > 0``
    cuts nothing carries a warning (logged, and recorded once in metrics.json).

"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from fedpeft.aggregation._math import coordinate_trimmed_mean, trimmed_count
from fedpeft.aggregation.base import AGGREGATORS, AggregationResult, ClientUpdate
from fedpeft.models import apply_delta


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean:
    """``global + server_lr * trimmed_mean_i delta_i``, per coordinate.

    Args:
        beta: Fraction of the clients cut from each end, in [0, 0.5).
        server_lr: Step size applied to the trimmed-mean delta.

    """

    def __init__(self, beta: float = 0.2, server_lr: float = 1.0) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta}")
        if server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.beta = beta
        self.server_lr = server_lr

    def aggregate(
        self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> AggregationResult:
        """Average the deltas after cutting the extremes per coordinate, and step."""
        mean_delta = coordinate_trimmed_mean([u.delta for u in updates], self.beta)
        cut = trimmed_count(len(updates), self.beta)
        metrics = {"trimmed_per_side": float(cut)}
        warnings: tuple[str, ...] = ()
        if cut == 0 and self.beta > 0:
            # Said out loud: the configured robust rule silently being the plain mean
            # is what an operator counting on it would least expect.
            warnings = (
                f"trimmed_mean: beta = {self.beta:g} cuts no value with {len(updates)} client(s) "
                f"(it needs at least {math.ceil(1 / self.beta)}); the round is the plain mean",
            )
        return AggregationResult(apply_delta(global_state, mean_delta, self.server_lr), metrics, warnings)

    def accumulator(self, global_state: Mapping[str, Tensor], cohort: int | None = None) -> None:
        """No streaming: the coordinate-wise trimmed mean sorts every update per coordinate."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The trimmed mean keeps no state between rounds."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""
