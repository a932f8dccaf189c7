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
    ids = [uid for part in parts.parts for uid in part["uid"]]
    assert len(ids) == len(set(ids)) == 400
    assert sum(parts.sizes()) == 400


def test_deterministic_under_seed() -> None:
    data = labelled(300)
    config = PartitionConfig(scheme="dirichlet", num_clients=5, alpha=0.3)
    first = [p["uid"] for p in partition_dataset(data, config, seed=1).parts]
    again = [p["uid"] for p in partition_dataset(data, config, seed=1).parts]
    other = [p["uid"] for p in partition_dataset(data, config, seed=2).parts]
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
    for part in parts.parts:
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
