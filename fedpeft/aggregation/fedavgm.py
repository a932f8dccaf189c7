"""FedAvg with server momentum over the averaged adapter delta.

Paper: Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification (Hsu, Qi & Brown, 2019).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fedpeft.aggregation._running import MeanStep
from fedpeft.aggregation.base import AGGREGATORS, AggregationResult, ClientUpdate, fold


@AGGREGATORS.register("fedavgm")
class FedAvgM:
    """``v = momentum * v + g``, ``x = x - server_lr * v`` with ``g = -mean delta``.

    Same update as Flower's ``FedAvgM`` (the first round's velocity is ``g`` itself).

    Args:
        server_lr: Server step size.
        momentum: Server momentum in [0, 1).

    """

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        if server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.server_lr = server_lr
        self.momentum = momentum
        self.velocity: dict[str, Tensor] = {}

    def aggregate(
        self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> AggregationResult:
        """Average the deltas, fold them into the velocity and step (via :meth:`accumulator`)."""
        return fold(self.accumulator(global_state, len(updates)), updates)

    def accumulator(self, global_state: Mapping[str, Tensor], cohort: int | None = None) -> MeanStep:
        """Stream the example-weighted mean; step once on it at the end."""
        return MeanStep(lambda mean: self.step_on_mean(global_state, mean))

    def step_on_mean(
        self, global_state: Mapping[str, Tensor], mean_delta: Mapping[str, Tensor]
    ) -> AggregationResult:
        """One server step with the round's mean delta (updates this aggregator's state)."""
        for name, delta in mean_delta.items():
            gradient = -delta.to(torch.float64)
            previous = self.velocity.get(name)
            self.velocity[name] = gradient if previous is None else self.momentum * previous + gradient
        state = {
            name: (x.to(torch.float64) - self.server_lr * self.velocity[name]).to(x.dtype)
            for name, x in global_state.items()
        }
        return AggregationResult(state)

    def state_dict(self) -> dict[str, Any]:
        """The velocity, per tensor."""
        return {"velocity": {k: v.clone() for k, v in self.velocity.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the velocity."""
        self.velocity = {k: v.clone() for k, v in state.get("velocity", {}).items()}
