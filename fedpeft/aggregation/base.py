"""The aggregator interface: decoded deltas in, next global adapter state out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from fedpeft.registry import Registry


@dataclass(frozen=True)
class ClientUpdate:
    """One client's decoded contribution to a round.

    Attributes:
        client_id: The client's partition id (stable across rounds).
        delta: name -> tensor shaped as the adapter weight (new local - global).
        num_examples: Examples the client trained on (the FedAvg weight).

    """

    client_id: int
    delta: Mapping[str, Tensor]
    num_examples: int


@dataclass(frozen=True)
class AggregationResult:
    """The next global adapter state and scalar diagnostics for metrics.json."""

    state: dict[str, Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


class Aggregator(Protocol):
    """Combines one round's updates. May keep server state across rounds."""

    def aggregate(
        self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> AggregationResult:
        """Return the next global state; ``updates`` is non-empty."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Server-side state to checkpoint (empty for stateless aggregators)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


AGGREGATORS: Registry[Aggregator] = Registry("aggregator", "federation.aggregator")
