"""Krum and Multi-Krum: step with the client deltas closest to their neighbours.

Paper: Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent
(Blanchard, El Mhamdi, Guerraoui & Stainer, 2017).

Notes:
    Each delta is scored by the sum of squared L2 distances (over all tensors together)
    to its ``max(1, n - f - 2)`` nearest other deltas, as Flower's ``aggregate_krum``
    does; the ``m`` lowest-scoring deltas are kept. Krum (``m = 1``) steps with the one
    kept delta, so example counts play no part; Multi-Krum (``m > 1``) averages the kept
    deltas weighted by example count, like Flower's ``Krum`` with
    ``num_clients_to_keep = m``. Krum's guarantee needs ``n > 2f + 2``; with fewer
    clients the rule still runs (as Flower's does) but guarantees nothing, and the
    round carries a warning (logged, and recorded once in metrics.json). Equal scores
    are broken by the lower client id, so the choice does not depend on reply order.

"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from fedpeft.aggregation._math import krum_scores, weighted_mean
from fedpeft.aggregation.base import AGGREGATORS, AggregationResult, ClientUpdate
from fedpeft.models import apply_delta


@AGGREGATORS.register("krum")
class Krum:
    """``global + server_lr * weighted mean of the m best-scored deltas``.

    Args:
        num_malicious: f, the number of poisoned clients to tolerate (sets how many
            neighbours a score sums over).
        num_to_keep: m, the deltas kept: 1 is Krum, more is Multi-Krum. Capped at the
            number of updates in the round.
        server_lr: Step size applied to the kept (averaged) delta.

    """

    def __init__(self, num_malicious: int = 0, num_to_keep: int = 1, server_lr: float = 1.0) -> None:
        if num_malicious < 0:
            raise ValueError(f"num_malicious must be >= 0, got {num_malicious}")
        if num_to_keep < 1:
            raise ValueError(f"num_to_keep must be >= 1, got {num_to_keep}")
        if server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.num_malicious = num_malicious
        self.num_to_keep = num_to_keep
        self.server_lr = server_lr

    def aggregate(
        self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> AggregationResult:
        """Score the deltas, keep the best ``num_to_keep`` and step with their mean."""
        scores = krum_scores([u.delta for u in updates], self.num_malicious)
        ranked = sorted(range(len(updates)), key=lambda i: (scores[i], updates[i].client_id, i))
        kept = [updates[i] for i in ranked[: self.num_to_keep]]
        mean_delta = weighted_mean([u.delta for u in kept], [float(u.num_examples) for u in kept])
        metrics = {"krum_kept": float(len(kept)), "krum_best_score": scores[ranked[0]]}
        warnings: tuple[str, ...] = ()
        needed = 2 * self.num_malicious + 3
        if len(updates) < needed:
            warnings = (
                f"krum: {len(updates)} client(s), fewer than 2 * num_malicious + 3 = {needed}; "
                "the rule runs but tolerates no poisoned client",
            )
        return AggregationResult(apply_delta(global_state, mean_delta, self.server_lr), metrics, warnings)

    def accumulator(self, global_state: Mapping[str, Tensor], cohort: int | None = None) -> None:
        """No streaming: Krum compares every pair of updates."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Krum keeps no state between rounds."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""
