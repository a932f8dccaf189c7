"""The aggregator interface: decoded deltas in, next global adapter state out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from fedpeft.errors import AggregationError
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
    """The next global adapter state and scalar diagnostics for metrics.json.

    Attributes:
        state: name -> tensor, the next global adapter.
        metrics: Scalar diagnostics of the round.
        warnings: What the rule could not do as configured this round (a trimmed mean
            that cut nothing, Krum with too few clients for its guarantee); the server
            logs each and records it once in metrics.json. Worded without the round, so
            that the same problem is one entry however often it recurs.

    """

    state: dict[str, Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


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


def check_aggregate(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> None:
    """Raise AggregationError unless ``state`` has ``reference``'s names and shapes and is finite.

    Checked before a round's aggregate replaces the global adapter: finite deltas can
    still sum or step to Inf (values near the float32 maximum, a server learning rate
    above 1, an optimizer's moments), and a NaN in the global adapter would poison
    every later round and the checkpoint.

    Args:
        state: name -> tensor, the proposed next global adapter.
        reference: name -> tensor, the current global adapter.

    """
    if set(state) != set(reference):
        missing = sorted(set(reference) - set(state))[:3]
        extra = sorted(set(state) - set(reference))[:3]
        raise AggregationError(
            f"aggregate does not fit the global adapter (missing {missing}, extra {extra})"
        )
    for name, ref in reference.items():
        if state[name].shape != ref.shape:
            raise AggregationError(
                f"aggregate tensor {name}: shape {tuple(state[name].shape)}, expected {tuple(ref.shape)}"
            )
        if not torch.isfinite(state[name]).all():
            raise AggregationError(f"aggregate tensor {name}: contains NaN or Inf")
