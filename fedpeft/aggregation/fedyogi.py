"""FedYogi: Yogi's sign-controlled second moment on the server.

Paper: Adaptive Federated Optimization (Reddi et al., 2021).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fedpeft.aggregation._running import MeanStep
from fedpeft.aggregation.base import AGGREGATORS, AggregationResult, ClientUpdate, fold


@AGGREGATORS.register("fedyogi")
class FedYogi:
    """``v = v - (1-b2) d^2 sign(v - d^2)``; otherwise as FedAdam, without bias correction.

    Matches Flower's ``FedYogi`` on the same inputs.

    Args:
        eta: Server learning rate.
        beta_1: First-moment decay.
        beta_2: Second-moment decay.
        tau: Adaptivity floor.

    """

    def __init__(
        self, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3
    ) -> None:
        if eta <= 0 or tau <= 0 or not 0 <= beta_1 < 1 or not 0 <= beta_2 < 1:
            raise ValueError("need eta > 0, tau > 0 and betas in [0, 1)")
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self.m: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}

    def aggregate(
        self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> AggregationResult:
        """Update the moments with the averaged delta and take one Yogi step (via :meth:`accumulator`)."""
        return fold(self.accumulator(global_state, len(updates)), updates)

    def accumulator(self, global_state: Mapping[str, Tensor], cohort: int | None = None) -> MeanStep:
        """Stream the example-weighted mean; step once on it at the end."""
        return MeanStep(lambda mean: self.step_on_mean(global_state, mean))

    def step_on_mean(
        self, global_state: Mapping[str, Tensor], mean_delta: Mapping[str, Tensor]
    ) -> AggregationResult:
        """One server step with the round's mean delta (updates this aggregator's state)."""
        state = {}
        for name, x in global_state.items():
            delta = mean_delta[name].to(torch.float64)
            m = self.m.get(name, torch.zeros_like(delta))
            v = self.v.get(name, torch.zeros_like(delta))
            squared = delta**2
            self.m[name] = self.beta_1 * m + (1 - self.beta_1) * delta
            self.v[name] = v - (1 - self.beta_2) * squared * torch.sign(v - squared)
            step = self.eta * self.m[name] / (self.v[name].sqrt() + self.tau)
            state[name] = (x.to(torch.float64) + step).to(x.dtype)
        return AggregationResult(state)

    def state_dict(self) -> dict[str, Any]:
        """Both moments."""
        return {"m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore both moments."""
        self.m = dict(state.get("m", {}))
        self.v = dict(state.get("v", {}))
