"""Where the audit's planted examples go: held out of the training split, half put back.

The plan is a pure function of the config and the seed, so every client process, the
server and the auditor compute the same one and nothing has to travel.

1. ``audit.membership_examples`` rows are drawn from the training split and removed
   from it before partitioning; each is *included* with probability 1/2.
2. The rest is partitioned as configured.
3. The included rows, and ``canary_repetitions`` copies of each included canary, are
   appended to the partitions of ``audit.clients`` (round robin).

Excluded rows never reach any client: they are the non-members of membership inference,
drawn from the same distribution as the members, which is what makes an AUC of 0.5
mean "no leak" (a held-out *test* split would differ in length and source).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import datasets

from fedpeft.audit.canaries import Canary, make_canaries
from fedpeft.config import AuditConfig, PartitionConfig
from fedpeft.data.loading import LABEL, TEXT
from fedpeft.data.partition import Partitions, partition_dataset
from fedpeft.errors import ConfigError


@dataclass(frozen=True)
class AuditExample:
    """A planted natural example (the membership targets)."""

    text: str
    label: int | None
    included: bool


@dataclass(frozen=True)
class AuditPlan:
    """The planted examples and canaries of a run, and the training split without them.

    Attributes:
        remaining: The training split with every membership example removed.
        examples: Held-out natural examples, each included or not.
        canaries: Secret canaries, each included or not.
        references: Texts of never-inserted secrets of the canaries' format.
        clients: Clients whose data receives the included ones.
        repetitions: Copies of each included canary.

    """

    remaining: datasets.Dataset
    examples: tuple[AuditExample, ...]
    canaries: tuple[Canary, ...]
    references: tuple[str, ...]
    clients: tuple[int, ...]
    repetitions: int

    @classmethod
    def build(
        cls, audit: AuditConfig, train: datasets.Dataset, seed: int, num_labels: int | None
    ) -> AuditPlan:
        """Draw the plan for ``train`` under ``seed``.

        Raises:
            ConfigError: The training split cannot spare ``membership_examples`` rows.

        """
        if audit.membership_examples >= len(train):
            raise ConfigError(
                f"audit.membership_examples = {audit.membership_examples} but the training split has "
                f"only {len(train)} rows"
            )
        rng = random.Random(f"audit-examples:{seed}")
        held = sorted(rng.sample(range(len(train)), audit.membership_examples))
        held_set = set(held)
        has_labels = LABEL in train.column_names
        rows = train.select(held)
        examples = tuple(
            AuditExample(
                text=rows[i][TEXT],
                label=int(rows[i][LABEL]) if has_labels else None,
                included=rng.random() < 0.5,
            )
            for i in range(len(rows))
        )
        remaining = train.select([i for i in range(len(train)) if i not in held_set])
        canaries, references = make_canaries(
            audit.canaries,
            audit.canary_digits,
            audit.canary_prefix,
            num_labels if has_labels else None,
            seed,
            audit.references if audit.canaries else 0,
        )
        return cls(
            remaining=remaining,
            examples=examples,
            canaries=tuple(canaries),
            references=tuple(references),
            clients=tuple(audit.clients),
            repetitions=audit.canary_repetitions,
        )

    def with_membership(self, included: Sequence[bool]) -> AuditPlan:
        """The same plan with other membership examples included (a LiRA shadow's half)."""
        if len(included) != len(self.examples):
            raise ValueError(f"{len(included)} inclusion flags for {len(self.examples)} membership examples")
        examples = tuple(replace(e, included=bool(i)) for e, i in zip(self.examples, included, strict=True))
        return replace(self, examples=examples)

    def base_partitions(self, config: PartitionConfig, seed: int) -> Partitions:
        """The partitions of :attr:`remaining`, before anything is inserted."""
        return partition_dataset(self.remaining, config, seed)

    def inserted_rows(self, client_id: int) -> list[dict[str, object]]:
        """The rows appended to ``client_id``'s data (empty for other clients)."""
        if client_id not in self.clients:
            return []
        rows: list[tuple[str, int | None]] = [(e.text, e.label) for e in self.examples if e.included]
        for canary in self.canaries:
            if canary.included:
                rows.extend([(canary.text, canary.label)] * self.repetitions)
        share = self.clients.index(client_id)
        mine = rows[share :: len(self.clients)]
        return [{TEXT: text, LABEL: label} if label is not None else {TEXT: text} for text, label in mine]

    def partitions(self, config: PartitionConfig, seed: int) -> Partitions:
        """The partitions every client trains on: base partitions plus inserted rows."""
        base = self.base_partitions(config, seed)
        return base.with_rows({client_id: self.inserted_rows(client_id) for client_id in self.clients})
