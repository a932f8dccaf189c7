"""FedAdam: Adam on the server, with the averaged adapter delta as the pseudo-gradient.

Paper: Adaptive Federated Optimization (Reddi et al., 2021).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fedpeft.aggregation._running import MeanStep
from fedpeft.aggregation.base import AGGREGATORS, AggregationResult, ClientUpdate, fold


@AGGREGATORS.register("fedadam")
class FedAdam:
    """``m = b1 m + (1-b1) d``, ``v = b2 v + (1-b2) d^2``, ``x += eta_t m / (sqrt(v) + tau)``.

    ``eta_t`` carries Adam's bias correction. The exponent is ``t + 1`` for the t-th
    aggregation, as in Flower's ``FedAdam``, so that both give the same trajectory on
    the same inputs.

    Args:
        eta: Server learning rate.
        beta_1: First-moment decay.
        beta_2: Second-moment decay.
        tau: Adaptivity floor (Adam's epsilon).

    """

    def __init__(
        self, eta: float = 1e-1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3
    ) -> None:
        if eta <= 0 or tau <= 0 or not 0 <= beta_1 < 1 or not 0 <= beta_2 < 1:
            raise ValueError("need eta > 0, tau > 0 and betas in [0, 1)")
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self.step = 0
        self.m: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}

    def aggregate(
        self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> AggregationResult:
        """Update the moments with the averaged delta and take one Adam step (via :meth:`accumulator`)."""
        return fold(self.accumulator(global_state, len(updates)), updates)

    def accumulator(self, global_state: Mapping[str, Tensor], cohort: int | None = None) -> MeanStep:
        """Stream the example-weighted mean; step once on it at the end."""
        return MeanStep(lambda mean: self.step_on_mean(global_state, mean))

    def step_on_mean(
        self, global_state: Mapping[str, Tensor], mean_delta: Mapping[str, Tensor]
    ) -> AggregationResult:
        """One server step with the round's mean delta (updates this aggregator's state)."""
        self.step += 1
        eta_t = (
            self.eta * math.sqrt(1 - self.beta_2 ** (self.step + 1)) / (1 - self.beta_1 ** (self.step + 1))
        )
        state = {}
        for name, x in global_state.items():
            delta = mean_delta[name].to(torch.float64)
            m = self.m.get(name, torch.zeros_like(delta))
            v = self.v.get(name, torch.zeros_like(delta))
            self.m[name] = self.beta_1 * m + (1 - self.beta_1) * delta
            self.v[name] = self.beta_2 * v + (1 - self.beta_2) * delta**2
            step = eta_t * self.m[name] / (self.v[name].sqrt() + self.tau)
            state[name] = (x.to(torch.float64) + step).to(x.dtype)
        return AggregationResult(state)

    def state_dict(self) -> dict[str, Any]:
        """Step count and both moments."""
        return {"step": self.step, "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore step count and moments."""
        self.step = int(state.get("step", 0))
        self.m = dict(state.get("m", {}))
        self.v = dict(state.get("v", {}))
