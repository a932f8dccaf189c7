"""Product-space LoRA aggregation: average the updates ``B_i A_i``, refactor to rank r.

FedAvg averages A and B separately, which is not the average of the low-rank updates
the clients made. This aggregator averages the products exactly and refactors the mean
to rank r with a truncated SVD (the best rank-r approximation), reporting the norm it
drops. The mean of r-rank products can have rank up to (number of clients) x r; what
the truncation drops is the price of keeping the adapter's rank.

Paper: FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations (Wang et al., 2024) motivates exact product aggregation; the SVD refactor
is the standard Eckart-Young projection.

The mean product is never formed: its SVD comes from QRs of the stacked client factors
and the SVD of a small core (``_lora.refactor_product_rank_r``), so a round costs
``O(k^2 r^2 d)`` per layer, not ``O(k r d^2)`` plus a d x d SVD.

Notes:
    The refactored factors replace the global A and B, so every client starts the next
    round from the same (exact up to truncation) update; non-LoRA trainable tensors
    (e.g. a classification head) are averaged as in FedAvg.

"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from fedpeft.aggregation._lora import lora_pairs, mean_product_factors, refactor_product_rank_r
from fedpeft.aggregation._math import weighted_mean
from fedpeft.aggregation.base import AGGREGATORS, AggregationResult, ClientUpdate
from fedpeft.errors import ConfigError
from fedpeft.models import apply_delta


@AGGREGATORS.register("lora_product")
class LoraProduct:
    """Exact average of ``B_i A_i`` per LoRA layer, refactored to the adapter's rank."""

    def aggregate(
        self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> AggregationResult:
        """Refactor every LoRA pair; FedAvg every other tensor."""
        weights = [float(u.num_examples) for u in updates]
        pairs = lora_pairs(list(global_state))
        if not pairs:
            raise ConfigError(
                "federation.aggregator: lora_product needs trainable LoRA A and B tensors "
                "(with adapter.freeze_lora_a, plain fedavg is already exact)"
            )
        state = apply_delta(global_state, weighted_mean([u.delta for u in updates], weights))
        dropped_squared = 0.0
        for pair in pairs:
            product = mean_product_factors(global_state, [u.delta for u in updates], weights, pair)
            refactored = refactor_product_rank_r(product, rank=global_state[pair.a].shape[0])
            state[pair.b] = refactored.b.to(global_state[pair.b].dtype)
            state[pair.a] = refactored.a.to(global_state[pair.a].dtype)
            dropped_squared += refactored.dropped**2
        return AggregationResult(state, {"svd_dropped_norm": dropped_squared**0.5})

    def accumulator(self, global_state: Mapping[str, Tensor], cohort: int | None = None) -> None:
        """No streaming: the exact product average keeps every client's factors."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Stateless."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""
