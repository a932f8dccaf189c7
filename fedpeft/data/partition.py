"""Split the training set among clients: IID, Dirichlet label skew, or by a column.

The splitting itself is flwr-datasets' partitioners (a maintained, tested
implementation of the schemes the FL literature uses); this module adds the config
mapping, the checks a user needs (more clients than examples, a skew that cannot be
met) and a printable summary.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import datasets
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)

from fedpeft.config import PartitionConfig
from fedpeft.data.loading import LABEL
from fedpeft.errors import DataError


@dataclass(frozen=True)
class Partitions:
    """The training set split into ``num_clients`` disjoint parts."""

    parts: list[datasets.Dataset]

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, client_id: int) -> datasets.Dataset:
        return self.parts[client_id]

    def sizes(self) -> list[int]:
        """Examples per client."""
        return [len(p) for p in self.parts]

    def label_histograms(self) -> list[dict[int, int]]:
        """Per client: label -> count (empty dicts when there are no labels)."""
        return [
            dict(sorted(Counter(p[LABEL]).items())) if LABEL in p.column_names else {} for p in self.parts
        ]

    def summary(self, label_names: list[str] | None = None) -> str:
        """A table of per-client sizes and label histograms, for the console."""
        lines = [f"{'client':>6}  {'examples':>8}  labels"]
        for client_id, (size, histogram) in enumerate(
            zip(self.sizes(), self.label_histograms(), strict=True)
        ):
            labels = "  ".join(f"{label_names[k] if label_names else k}:{v}" for k, v in histogram.items())
            lines.append(f"{client_id:>6}  {size:>8}  {labels}")
        return "\n".join(lines)


def partition_dataset(dataset: datasets.Dataset, config: PartitionConfig, seed: int) -> Partitions:
    """Split ``dataset`` as configured; the same seed gives the same split everywhere."""
    if config.num_clients > len(dataset):
        raise DataError(
            f"partition.num_clients = {config.num_clients} but the training split has only "
            f"{len(dataset)} examples"
        )
    partitioner: Partitioner
    if config.scheme == "iid":
        # IidPartitioner splits in order; shuffle first so that sorted files mix.
        dataset = dataset.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=config.num_clients)
    elif config.scheme == "dirichlet":
        skew_by = config.column or LABEL
        if skew_by not in dataset.column_names:
            raise DataError(
                f"partition.column: column {skew_by!r} not in the training data"
                if config.column
                else "partition.scheme = 'dirichlet' needs labels (set data.label_column) or partition.column"
            )
        partitioner = DirichletPartitioner(
            num_partitions=config.num_clients,
            partition_by=skew_by,
            alpha=config.alpha,
            min_partition_size=config.min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        assert config.column is not None
        if config.column not in dataset.column_names:
            raise DataError(f"partition.column: column {config.column!r} not in the training data")
        partitioner = NaturalIdPartitioner(partition_by=config.column)
    partitioner.dataset = dataset
    try:
        parts = [partitioner.load_partition(i) for i in range(partitioner.num_partitions)]
    except ValueError as err:
        raise DataError(f"partition: cannot split the data as configured: {err}") from None
    if len(parts) != config.num_clients:
        raise DataError(
            f"partition.num_clients = {config.num_clients} but column {config.column!r} "
            f"has {len(parts)} distinct values; set num_clients to {len(parts)}"
        )
    return Partitions(parts)
