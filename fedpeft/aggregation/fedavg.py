"""FedAvg over adapter deltas, weighted by the number of local examples.

Paper: Communication-Efficient Learning of Deep Networks from Decentralized Data
(McMahan et al., 2017).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from fedpeft.aggregation._lora import factor_averaging_error, lora_pairs
from fedpeft.aggregation._math import weighted_mean
from fedpeft.aggregation.base import AGGREGATORS, AggregationResult, ClientUpdate
from fedpeft.models import apply_delta


@AGGREGATORS.register("fedavg")
class FedAvg:
    """``global + server_lr * sum_i n_i delta_i / sum_i n_i``.

    Args:
        server_lr: Step size applied to the averaged delta (1.0 is plain FedAvg).
        weighted: Weight clients by example count (True) or equally (False).

    """

    def __init__(self, server_lr: float = 1.0, weighted: bool = True) -> None:
        if server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr
        self.weighted = weighted

    def aggregate(
        self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> AggregationResult:
        """Average the deltas and step the global state."""
        weights = [float(u.num_examples) if self.weighted else 1.0 for u in updates]
        mean_delta = weighted_mean([u.delta for u in updates], weights)
        metrics = {}
        if lora_pairs(list(global_state)):
            # How far averaging A and B apart is from averaging the clients' B_i A_i.
            metrics["lora_factor_averaging_error"] = factor_averaging_error(
                global_state, [u.delta for u in updates], weights
            )
        return AggregationResult(apply_delta(global_state, mean_delta, self.server_lr), metrics)

    def state_dict(self) -> dict[str, Any]:
        """FedAvg keeps no state between rounds."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""
