import math
from collections import Counter

import datasets
import pytest

from fedpeft.config import PartitionConfig
from fedpeft.data import partition_dataset
from fedpeft.errors import DataError


def labelled(n: int, classes: int = 4) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(n)], "label": [i % classes for i in range(n)], "uid": list(range(n))}
    )


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_disjoint_and_complete(scheme: str) -> None:
    data = labelled(400)
    parts = partition_dataset(data, PartitionConfig(scheme=scheme, num_clients=7, alpha=0.5), seed=3)
    ids = [uid for part in parts for uid in part["uid"]]
    assert len(ids) == len(set(ids)) == 400
    assert sum(parts.sizes()) == 400


def test_deterministic_under_seed() -> None:
    data = labelled(300)
    config = PartitionConfig(scheme="dirichlet", num_clients=5, alpha=0.3)
    first = [p["uid"] for p in partition_dataset(data, config, seed=1)]
    again = [p["uid"] for p in partition_dataset(data, config, seed=1)]
    other = [p["uid"] for p in partition_dataset(data, config, seed=2)]
    assert first == again and first != other


def mean_label_entropy(parts) -> float:
    entropies = []
    for histogram in parts.label_histograms():
        total = sum(histogram.values())
        entropies.append(-sum(c / total * math.log(c / total) for c in histogram.values() if c))
    return sum(entropies) / len(entropies)


def test_smaller_alpha_means_more_label_skew() -> None:
    data = labelled(2000)
    entropy = {
        alpha: sum(
            mean_label_entropy(partition_dataset(data, PartitionConfig(num_clients=10, alpha=alpha), seed=s))
            for s in range(3)
        )
        for alpha in (0.1, 1.0, 100.0)
    }
    assert entropy[0.1] < entropy[1.0] < entropy[100.0]
    assert entropy[100.0] / 3 > 0.9 * math.log(4)  # near uniform labels per client


def test_iid_is_balanced() -> None:
    parts = partition_dataset(labelled(100), PartitionConfig(scheme="iid", num_clients=4), seed=0)
    assert parts.sizes() == [25, 25, 25, 25]


def test_partition_by_column() -> None:
    data = datasets.Dataset.from_dict({"text": list("abcdef"), "label": [0] * 6, "user": [1, 1, 2, 3, 3, 3]})
    parts = partition_dataset(data, PartitionConfig(scheme="column", column="user", num_clients=3), seed=0)
    assert sorted(parts.sizes()) == [1, 2, 3]
    for part in parts:
        assert len(set(part["user"])) == 1
    with pytest.raises(DataError, match="3 distinct values"):
        partition_dataset(data, PartitionConfig(scheme="column", column="user", num_clients=4), seed=0)


def test_more_clients_than_examples_is_refused() -> None:
    with pytest.raises(DataError, match="only 5 examples"):
        partition_dataset(labelled(5), PartitionConfig(num_clients=6), seed=0)


def test_summary_shows_sizes_and_histograms() -> None:
    parts = partition_dataset(labelled(40, classes=2), PartitionConfig(scheme="iid", num_clients=2), seed=0)
    text = parts.summary(["neg", "pos"])
    assert "neg:" in text and "pos:" in text and "20" in text
    assert Counter(parts.label_histograms()[0]) + Counter(parts.label_histograms()[1]) == Counter(
        {0: 20, 1: 20}
    )


# flwr-datasets is the reference: a split here must be its split, row for row, so that
# runs measured before fedpeft computed the indices itself keep their clients' data.
def flower_parts(data: datasets.Dataset, config: PartitionConfig, seed: int) -> list[list[int]]:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if config.scheme == "iid":
        data = data.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=config.num_clients)
    elif config.scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=config.num_clients,
            partition_by=config.column or "label",
            alpha=config.alpha,
            min_partition_size=config.min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        partitioner = NaturalIdPartitioner(partition_by=config.column)
    partitioner.dataset = data
    return [partitioner.load_partition(i)["uid"] for i in range(partitioner.num_partitions)]


@pytest.mark.parametrize(
    ("config", "seed"),
    [
        (PartitionConfig(scheme="iid", num_clients=7), 3),
        (PartitionConfig(scheme="iid", num_clients=10), 0),
        (PartitionConfig(scheme="dirichlet", num_clients=5, alpha=1.0), 0),
        (PartitionConfig(scheme="dirichlet", num_clients=9, alpha=0.1), 4),  # redraws for min_partition_size
        (PartitionConfig(scheme="dirichlet", num_clients=6, alpha=0.5, column="topic"), 1),
        (PartitionConfig(scheme="column", num_clients=13, column="user"), 0),
    ],
)
def test_the_split_is_flower_datasets_split(config: PartitionConfig, seed: int) -> None:
    data = labelled(500).add_column("topic", [f"t{i % 3}" for i in range(500)])
    data = data.add_column("user", [f"u{(i * 7) % 13}" for i in range(500)])
    ours = [part["uid"] for part in partition_dataset(data, config, seed)]
    assert ours == flower_parts(data, config, seed)


def test_ten_thousand_clients_partition_in_well_under_a_second_of_work() -> None:
    import time

    data = labelled(60_000, classes=2)
    started = time.process_time()
    iid = partition_dataset(data, PartitionConfig(scheme="iid", num_clients=10_000), seed=0)
    skewed = partition_dataset(
        data,
        PartitionConfig(scheme="dirichlet", num_clients=10_000, alpha=100.0, min_partition_size=1),
        seed=0,
    )
    sizes = iid.sizes(), skewed.sizes()
    cpu = time.process_time() - started
    assert sum(sizes[0]) == sum(sizes[1]) == 60_000 and set(sizes[0]) == {6}
    assert min(sizes[1]) >= 1
    # flwr-datasets' selecting every part took 31 s for 10,000 Dirichlet parts here; the
    # bound is loose so that a loaded CI machine passes, tight enough to catch that.
    assert cpu < 5, f"{cpu:.1f} s of CPU"
    assert iid[9_999]["uid"] == iid.indices[9_999].tolist()


def test_appended_rows_join_one_client_only() -> None:
    parts = partition_dataset(labelled(40, classes=2), PartitionConfig(scheme="iid", num_clients=2), seed=0)
    more = parts.with_rows({1: [{"text": "canary", "label": 1}, {"text": "member", "label": 0}]})
    assert more.sizes() == [20, 22] and parts.sizes() == [20, 20]
    assert more[1]["text"][-2:] == ["canary", "member"] and more[1].column_names == ["text", "label"]
    before = parts.label_histograms()[1]
    assert more.label_histograms() == [parts.label_histograms()[0], {0: before[0] + 1, 1: before[1] + 1}]
