"""A robust rule that cannot do what it is configured for says so, and the aggregate is checked."""

from __future__ import annotations

import pytest
import torch

from fedpeft.aggregation import ClientUpdate, ClippedUpdates, Krum, TrimmedMean
from fedpeft.aggregation.base import check_aggregate
from fedpeft.errors import AggregationError

BASE = {"w": torch.zeros(3)}


def updates(count: int) -> list[ClientUpdate]:
    return [ClientUpdate(i, {"w": torch.full((3,), float(i))}, 1) for i in range(count)]


@pytest.mark.parametrize(("count", "warns"), [(2, True), (4, True), (5, False), (9, False)])
def test_trimmed_mean_that_cuts_nothing_warns(count: int, warns: bool) -> None:
    result = TrimmedMean(beta=0.2).aggregate(BASE, updates(count))
    assert bool(result.warnings) == warns
    if warns:
        assert result.warnings == (
            f"trimmed_mean: beta = 0.2 cuts no value with {count} client(s) (it needs at least 5); "
            "the round is the plain mean",
        )


def test_trimmed_mean_with_beta_zero_is_the_mean_by_choice() -> None:
    assert TrimmedMean(beta=0.0).aggregate(BASE, updates(3)).warnings == ()


@pytest.mark.parametrize(
    ("malicious", "count", "warns"), [(0, 2, True), (0, 3, False), (1, 4, True), (1, 5, False)]
)
def test_krum_with_too_few_clients_for_its_guarantee_warns(malicious: int, count: int, warns: bool) -> None:
    result = Krum(num_malicious=malicious).aggregate(BASE, updates(count))
    assert bool(result.warnings) == warns
    if warns:
        assert f"fewer than 2 * num_malicious + 3 = {2 * malicious + 3}" in result.warnings[0]


def test_clipping_keeps_the_inner_warnings() -> None:
    result = ClippedUpdates(TrimmedMean(beta=0.2), max_update_norm=1.0).aggregate(BASE, updates(3))
    assert len(result.warnings) == 1 and result.warnings[0].startswith("trimmed_mean:")


def test_check_aggregate_names_what_does_not_fit() -> None:
    check_aggregate({"w": torch.ones(3)}, BASE)
    with pytest.raises(AggregationError, match="aggregate tensor w: contains NaN or Inf"):
        check_aggregate({"w": torch.tensor([1.0, float("inf"), 0.0])}, BASE)
    with pytest.raises(AggregationError, match=r"shape \(2,\), expected \(3,\)"):
        check_aggregate({"w": torch.ones(2)}, BASE)
    with pytest.raises(AggregationError, match=r"missing \['w'\], extra \['v'\]"):
        check_aggregate({"v": torch.ones(3)}, BASE)
