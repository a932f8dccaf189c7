"""The aggregator interface: decoded deltas in, next global adapter state out.

Two ways in: :meth:`Aggregator.aggregate` takes a round's updates at once;
:meth:`Aggregator.accumulator` starts an :class:`Accumulator` that folds each update in
as the server decodes it (streaming), so a linear rule holds O(adapter) memory however
large the cohort. Rules that need every update together (median, trimmed mean, Krum,
``lora_product``) return no accumulator and say why; :func:`accumulator_for` then
collects the updates for :meth:`~Aggregator.aggregate`.
"""

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


class Accumulator(Protocol):
    """One round of an aggregator, fed one update at a time.

    :meth:`add` must not change the aggregator's state (a round whose aggregate is
    refused leaves it as it was); :meth:`finish` is called once and makes the step.
    """

    def add(self, update: ClientUpdate) -> None:
        """Fold one decoded update in; the caller may drop it afterwards."""
        ...

    def finish(self) -> AggregationResult:
        """The round's result from everything added (at least one update)."""
        ...


class Aggregator(Protocol):
    """Combines one round's updates. May keep server state across rounds."""

    def aggregate(
        self, global_state: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> AggregationResult:
        """Return the next global state; ``updates`` is non-empty."""
        ...

    def accumulator(
        self, global_state: Mapping[str, Tensor], cohort: int | None = None
    ) -> Accumulator | None:
        """A streaming round from ``global_state``, or None if the rule needs every update at once.

        ``cohort``: how many updates the round expects, when known (diagnostics may
        pick an exact or a sketched route by it); more or fewer may arrive.
        """
        ...

    def state_dict(self) -> dict[str, Any]:
        """Server-side state to checkpoint (empty for stateless aggregators)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


AGGREGATORS: Registry[Aggregator] = Registry("aggregator", "federation.aggregator")


def fold(accumulator: Accumulator, updates: Sequence[ClientUpdate]) -> AggregationResult:
    """Add every update in order and finish: ``aggregate`` for rules that stream."""
    for update in updates:
        accumulator.add(update)
    return accumulator.finish()


class CollectedUpdates:
    """The batch path behind the accumulator interface: keeps every update, then aggregates.

    For rules that need every update at once (median, trimmed mean, Krum,
    ``lora_product``): memory grows with the cohort, as it must for them.
    """

    def __init__(self, aggregator: Aggregator, global_state: Mapping[str, Tensor]) -> None:
        self.aggregator = aggregator
        self.global_state = global_state
        self.updates: list[ClientUpdate] = []

    def add(self, update: ClientUpdate) -> None:
        """Keep the update for :meth:`finish`."""
        self.updates.append(update)

    def finish(self) -> AggregationResult:
        """``aggregator.aggregate`` over the updates in the order they were added."""
        return self.aggregator.aggregate(self.global_state, self.updates)


def accumulator_for(
    aggregator: Aggregator, global_state: Mapping[str, Tensor], cohort: int | None = None
) -> Accumulator:
    """The aggregator's own accumulator when it streams, else one that collects the updates."""
    accumulator = aggregator.accumulator(global_state, cohort)
    return accumulator if accumulator is not None else CollectedUpdates(aggregator, global_state)


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
