"""FedAvg over adapter deltas, weighted by the number of local examples; streams.

Paper: Communication-Efficient Learning of Deep Networks from Decentralized Data
(McMahan et al., 2017).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from fedpeft.aggregation._factor_gap import RunningFactorAveragingError
from fedpeft.aggregation._lora import lora_pairs
from fedpeft.aggregation._running import RunningMean
from fedpeft.aggregation.base import AGGREGATORS, AggregationResult, ClientUpdate, fold
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
        """Average the deltas and step the global state (via :meth:`accumulator`)."""
        return fold(self.accumulator(global_state, len(updates)), updates)

    def accumulator(self, global_state: Mapping[str, Tensor], cohort: int | None = None) -> FedAvgRound:
        """A round that folds each update into running sums as it arrives."""
        return FedAvgRound(self, global_state, cohort)

    def state_dict(self) -> dict[str, Any]:
        """FedAvg keeps no state between rounds."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


class FedAvgRound:
    """One FedAvg round, streamed: the running mean and, with LoRA, the factor-averaging error.

    Reports ``lora_factor_averaging_error`` (how far averaging A and B apart is from
    averaging the clients' ``B_i A_i``) and ``lora_factor_averaging_error_relative_std``:
    0 where the error is exact (cohorts whose factors fit
    ``_factor_gap.EXACT_VALUES``), else the bound on the sketch's relative error.
    """

    def __init__(self, fedavg: FedAvg, global_state: Mapping[str, Tensor], cohort: int | None) -> None:
        self.fedavg = fedavg
        self.global_state = global_state
        self.running = RunningMean()
        self.gap = (
            RunningFactorAveragingError(global_state, cohort) if lora_pairs(list(global_state)) else None
        )

    def add(self, update: ClientUpdate) -> None:
        """Fold one update into the mean (and the error's exact factors or sketch)."""
        weight = float(update.num_examples) if self.fedavg.weighted else 1.0
        self.running.add(update.delta, weight)
        if self.gap is not None:
            self.gap.add(update.delta, weight)

    def finish(self) -> AggregationResult:
        """Step the global state by the mean, with the round's diagnostics."""
        mean = self.running.mean()
        metrics = {}
        if self.gap is not None:
            estimate = self.gap.finish(mean)
            metrics["lora_factor_averaging_error"] = estimate.value
            metrics["lora_factor_averaging_error_relative_std"] = estimate.relative_std
        return AggregationResult(apply_delta(self.global_state, mean, self.fedavg.server_lr), metrics)
