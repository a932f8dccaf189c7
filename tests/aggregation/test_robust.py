"""Robust aggregators (median, trimmed mean, Krum) and server-side norm clipping."""

import math

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

from fedpeft.aggregation import (
    AGGREGATORS,
    ClientUpdate,
    ClippedUpdates,
    FedAvg,
    Krum,
    Median,
    TrimmedMean,
)
from fedpeft.aggregation._math import clip_update_norm, krum_scores, update_norm
from fedpeft.config import load_config
from fedpeft.errors import ConfigError
from fedpeft.experiment import Experiment


def vector_updates(rows: list[list[float]], counts: list[int] | None = None) -> list[ClientUpdate]:
    counts = counts or [1] * len(rows)
    return [
        ClientUpdate(i, {"w": torch.tensor(row)}, n)
        for i, (row, n) in enumerate(zip(rows, counts, strict=True))
    ]


# --- hand computations -------------------------------------------------------------


def test_median_of_three_and_four_values() -> None:
    base = {"w": torch.tensor([1.0, 1.0])}
    three = vector_updates([[1.0, 5.0], [2.0, -1.0], [10.0, 0.0]])
    torch.testing.assert_close(Median().aggregate(base, three).state["w"], torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(
        Median(server_lr=0.5).aggregate(base, three).state["w"], torch.tensor([2.0, 1.0])
    )
    # Even count: the mean of the two middle values (torch.median would give 2 and -1).
    four = vector_updates([[1.0, 0.0], [3.0, -1.0], [100.0, 7.0], [2.0, -5.0]])
    torch.testing.assert_close(Median().aggregate(base, four).state["w"], torch.tensor([3.5, 0.5]))


def test_median_keeps_low_precision_dtypes() -> None:
    base = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    ups = [ClientUpdate(i, {"w": torch.full((3,), float(i), dtype=torch.bfloat16)}, 1) for i in range(4)]
    result = Median().aggregate(base, ups).state["w"]
    assert result.dtype == torch.bfloat16
    torch.testing.assert_close(result, torch.full((3,), 1.5, dtype=torch.bfloat16))


def test_trimmed_mean_cuts_int_beta_n_from_each_end() -> None:
    base = {"w": torch.tensor([0.0])}
    five = vector_updates([[0.0], [1.0], [2.0], [3.0], [100.0]])
    # int(0.2 * 5) = 1 cut per side: mean(1, 2, 3) = 2.
    result = TrimmedMean(beta=0.2).aggregate(base, five)
    torch.testing.assert_close(result.state["w"], torch.tensor([2.0]))
    assert result.metrics["trimmed_per_side"] == 1
    # int(0.2 * 4) = 0: nothing is cut, the plain (unweighted) mean.
    four = vector_updates([[0.0], [1.0], [2.0], [100.0]], counts=[1, 1, 1, 50])
    torch.testing.assert_close(TrimmedMean(beta=0.2).aggregate(base, four).state["w"], torch.tensor([25.75]))
    # int(0.25 * 4) = 1: mean(1, 2) = 1.5.
    torch.testing.assert_close(TrimmedMean(beta=0.25).aggregate(base, four).state["w"], torch.tensor([1.5]))


def test_trimmed_mean_with_beta_zero_is_unweighted_fedavg() -> None:
    base = {"w": torch.tensor([1.0, -1.0])}
    ups = vector_updates([[1.0, 2.0], [3.0, 5.0], [-4.0, 0.5]], counts=[3, 1, 9])
    torch.testing.assert_close(
        TrimmedMean(beta=0.0).aggregate(base, ups).state["w"],
        FedAvg(weighted=False).aggregate(base, ups).state["w"],
    )


# Five 2-d deltas; the last is far away. Squared distances:
#   d12=1 d13=4 d14=2 d15=200 | d23=5 d24=1 d25=181 | d34=2 d35=164 | d45=162
# With f=1, each score sums the n-f-2 = 2 nearest: s = [3, 2, 6, 3, 326].
KRUM_ROWS = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [10.0, 10.0]]


def test_krum_scores_by_hand() -> None:
    states = [u.delta for u in vector_updates(KRUM_ROWS)]
    assert krum_scores(states, num_malicious=1) == [3.0, 2.0, 6.0, 3.0, 326.0]
    # f=0: 3 nearest each.
    assert krum_scores(states, num_malicious=0) == [7.0, 7.0, 11.0, 5.0, 507.0]


def test_krum_picks_from_the_honest_cluster() -> None:
    base = {"w": torch.tensor([0.0, 0.0])}
    result = Krum(num_malicious=1).aggregate(base, vector_updates(KRUM_ROWS))
    torch.testing.assert_close(result.state["w"], torch.tensor([1.0, 0.0]))
    assert result.metrics == {"krum_kept": 1.0, "krum_best_score": 2.0}
    # Multi-Krum keeps the 3 best (clients 1, 0, 3) and weights them by example count:
    # (1*[1,0] + 1*[0,0] + 2*[1,1]) / 4.
    ups = vector_updates(KRUM_ROWS, counts=[1, 1, 1, 2, 1000])
    multi = Krum(num_malicious=1, num_to_keep=3, server_lr=2.0).aggregate(base, ups)
    torch.testing.assert_close(multi.state["w"], 2.0 * torch.tensor([0.75, 0.5]))


def test_krum_breaks_ties_by_client_id_not_reply_order() -> None:
    base = {"w": torch.tensor([0.0])}
    a = ClientUpdate(5, {"w": torch.tensor([1.0])}, 1)
    b = ClientUpdate(3, {"w": torch.tensor([-1.0])}, 1)
    for order in ([a, b], [b, a]):  # two clients always tie
        torch.testing.assert_close(Krum().aggregate(base, order).state["w"], torch.tensor([-1.0]))


def test_krum_keeps_at_most_all_updates() -> None:
    base = {"w": torch.tensor([0.0, 0.0])}
    ups = vector_updates(KRUM_ROWS[:2], counts=[1, 3])
    result = Krum(num_to_keep=10).aggregate(base, ups)
    torch.testing.assert_close(result.state["w"], torch.tensor([0.75, 0.0]))
    assert result.metrics["krum_kept"] == 2


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("median", {"server_lr": 0.0}, "server_lr"),
        ("trimmed_mean", {"beta": 0.5}, "beta"),
        ("trimmed_mean", {"beta": -0.1}, "beta"),
        ("krum", {"num_malicious": -1}, "num_malicious"),
        ("krum", {"num_to_keep": 0}, "num_to_keep"),
        ("krum", {"server_lr": -1.0}, "server_lr"),
    ],
)
def test_bad_options_fail_at_build(name: str, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AGGREGATORS.build(name, options, "federation.aggregator_options")


# --- equality with Flower's numpy references ------------------------------------------


def random_deltas(n: int, seed: int) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    rng = np.random.default_rng(seed)
    deltas = [
        {"a": torch.from_numpy(rng.normal(size=(4, 3))), "b": torch.from_numpy(rng.normal(size=5))}
        for _ in range(n)
    ]
    counts = [int(c) for c in rng.integers(1, 100, size=n)]
    return deltas, counts


def flower_results(deltas: list[dict[str, torch.Tensor]], counts: list[int]) -> list[tuple[list, int]]:
    return [([d[k].numpy() for k in ("a", "b")], n) for d, n in zip(deltas, counts, strict=True)]


def assert_steps_match(
    ours: dict[str, torch.Tensor], base: dict[str, torch.Tensor], theirs: list, server_lr: float
) -> None:
    for key, expected in zip(("a", "b"), theirs, strict=True):
        np.testing.assert_allclose(
            ours[key].numpy(), base[key].numpy() + server_lr * expected, rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("n", [1, 2, 5, 6, 9])
def test_median_matches_flower(n: int) -> None:
    deltas, counts = random_deltas(n, seed=n)
    base = {"a": torch.ones(4, 3, dtype=torch.float64), "b": torch.zeros(5, dtype=torch.float64)}
    ups = [ClientUpdate(i, d, c) for i, (d, c) in enumerate(zip(deltas, counts, strict=True))]
    ours = Median(server_lr=0.5).aggregate(base, ups).state
    assert_steps_match(ours, base, aggregate_median(flower_results(deltas, counts)), 0.5)


@pytest.mark.parametrize("n", [3, 5, 8, 10])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.3, 0.49])
def test_trimmed_mean_matches_flower(n: int, beta: float) -> None:
    deltas, counts = random_deltas(n, seed=10 * n)
    base = {"a": torch.ones(4, 3, dtype=torch.float64), "b": torch.zeros(5, dtype=torch.float64)}
    ups = [ClientUpdate(i, d, c) for i, (d, c) in enumerate(zip(deltas, counts, strict=True))]
    ours = TrimmedMean(beta=beta).aggregate(base, ups).state
    assert_steps_match(ours, base, aggregate_trimmed_avg(flower_results(deltas, counts), beta), 1.0)


@pytest.mark.parametrize(
    ("n", "num_malicious", "num_to_keep"),
    [(2, 0, 1), (5, 0, 1), (7, 2, 1), (7, 1, 3), (10, 3, 4), (6, 5, 2), (4, 0, 4)],
)
def test_krum_matches_flower(n: int, num_malicious: int, num_to_keep: int) -> None:
    deltas, counts = random_deltas(n, seed=100 + n)
    base = {"a": torch.ones(4, 3, dtype=torch.float64), "b": torch.zeros(5, dtype=torch.float64)}
    ups = [ClientUpdate(i, d, c) for i, (d, c) in enumerate(zip(deltas, counts, strict=True))]
    ours = Krum(num_malicious=num_malicious, num_to_keep=num_to_keep, server_lr=0.7).aggregate(base, ups)
    results = flower_results(deltas, counts)
    # Flower's to_keep=0 is Krum (returns the best vector), >0 is Multi-Krum's weighted mean.
    theirs = aggregate_krum(results, num_malicious, 0 if num_to_keep == 1 else num_to_keep)
    assert_steps_match(ours.state, base, theirs, 0.7)
    if num_to_keep == 1:  # Multi-Krum with one kept is Krum too
        assert_steps_match(ours.state, base, aggregate_krum(results, num_malicious, 1), 0.7)


# --- poisoning ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"), [("median", {}), ("trimmed_mean", {}), ("krum", {"num_malicious": 1})]
)
def test_one_poisoned_update_does_not_move_robust_rules(name: str, options: dict) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(3, 4), "b": torch.zeros(2)}
    honest = [
        ClientUpdate(i, {k: 1.0 + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, 10)
        for i in range(4)
    ]
    poison = ClientUpdate(4, {k: torch.full_like(v, 1e6) for k, v in base.items()}, 10)
    honest_mean = FedAvg().aggregate(base, honest).state
    for ups in ([*honest, poison], [poison, *honest]):
        robust = AGGREGATORS.build(name, options, "x").aggregate(base, ups).state
        poisoned_fedavg = FedAvg().aggregate(base, ups).state
        for key in base:
            assert (robust[key] - honest_mean[key]).abs().max() < 0.05
            assert (poisoned_fedavg[key] - honest_mean[key]).abs().min() > 1e5


# --- norm clipping -----------------------------------------------------------------


def test_clip_update_norm_bounds_large_updates_and_keeps_small_ones() -> None:
    big = {
        "x": torch.tensor([6.0, 0.0], dtype=torch.float64),
        "y": torch.tensor([[0.0, 8.0]], dtype=torch.float64),
    }
    assert update_norm(big) == 10.0
    clipped = clip_update_norm(big, 1.0)
    assert update_norm(clipped) == pytest.approx(1.0, rel=1e-15)
    torch.testing.assert_close(clipped["x"], torch.tensor([0.6, 0.0], dtype=torch.float64))
    torch.testing.assert_close(clipped["y"], torch.tensor([[0.0, 0.8]], dtype=torch.float64))
    small = {"x": torch.tensor([0.3, -0.4])}
    kept = clip_update_norm(small, 1.0)
    assert torch.equal(kept["x"], small["x"]) and kept["x"] is not small["x"]
    half = {"x": torch.tensor([1.0], dtype=torch.float16)}
    assert clip_update_norm(half, 0.5)["x"].dtype == torch.float16


def test_clip_update_norm_is_nan_free() -> None:
    zero = {"x": torch.zeros(3), "y": torch.zeros(2, 2)}
    assert all(torch.equal(t, torch.zeros_like(t)) for t in clip_update_norm(zero, 1e-12).values())
    tiny = {"x": torch.full((4,), 1e-30)}
    assert torch.isfinite(clip_update_norm(tiny, 1e-35)["x"]).all()
    huge = {"x": torch.full((4,), 3e38)}  # the float32 norm would overflow; float64 does not
    out = clip_update_norm(huge, 1.0)["x"]
    assert torch.isfinite(out).all() and update_norm({"x": out}) == pytest.approx(1.0, rel=1e-6)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="non-finite"):
            clip_update_norm({"x": torch.tensor([1.0, bad])}, 1.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_update_norm(zero, 0.0)


def test_clipped_wrapper_clips_only_large_updates_and_reports_them() -> None:
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    ups = [
        ClientUpdate(0, {"w": torch.tensor([6.0, 8.0], dtype=torch.float64)}, 1),  # norm 10
        ClientUpdate(1, {"w": torch.tensor([0.3, 0.4], dtype=torch.float64)}, 1),  # norm 0.5
        ClientUpdate(2, {"w": torch.tensor([0.0, 0.0], dtype=torch.float64)}, 2),  # norm 0
    ]
    result = ClippedUpdates(FedAvg(), max_update_norm=1.0).aggregate(base, ups)
    # FedAvg of [0.6, 0.8], [0.3, 0.4], 2 x [0, 0].
    torch.testing.assert_close(result.state["w"], torch.tensor([0.225, 0.3], dtype=torch.float64))
    assert result.metrics["clipped_updates"] == 1.0
    assert result.metrics["update_norm_median"] == pytest.approx(0.5)
    assert "lora_factor_averaging_error" not in result.metrics
    assert torch.equal(ups[0].delta["w"], torch.tensor([6.0, 8.0], dtype=torch.float64))  # not in place


def test_clipped_wrapper_rejects_non_finite_updates() -> None:
    base = {"w": torch.zeros(2)}
    ups = [ClientUpdate(7, {"w": torch.tensor([1.0, math.nan])}, 1)]
    with pytest.raises(ValueError, match="client 7"):
        ClippedUpdates(FedAvg(), max_update_norm=1.0).aggregate(base, ups)


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_clipping_with_a_large_bound_changes_nothing(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    a, b = "layer.lora_A.default.weight", "layer.lora_B.default.weight"
    base = {
        a: torch.randn(2, 6, generator=g),
        b: torch.randn(4, 2, generator=g),
        "head.bias": torch.randn(3, generator=g),
    }
    ups = [
        ClientUpdate(i, {k: torch.randn(v.shape, generator=g) for k, v in base.items()}, i + 1)
        for i in range(5)
    ]
    plain = AGGREGATORS.build(name, {}, "x")
    wrapped = ClippedUpdates(AGGREGATORS.build(name, {}, "x"), max_update_norm=1e6)
    for _ in range(2):  # a second round exercises stateful aggregators' state
        expected, got = plain.aggregate(base, ups), wrapped.aggregate(base, ups)
        for key in base:
            torch.testing.assert_close(got.state[key], expected.state[key], rtol=0, atol=0)
        assert got.metrics["clipped_updates"] == 0.0
    assert wrapped.state_dict().keys() == plain.state_dict().keys()


def test_clipping_bounds_a_boosted_update_under_fedavg() -> None:
    base = {"w": torch.zeros(3)}
    honest = [ClientUpdate(i, {"w": torch.full((3,), 0.1)}, 1) for i in range(4)]
    boosted = ClientUpdate(4, {"w": torch.full((3,), 1e6)}, 1)
    state = ClippedUpdates(FedAvg(), max_update_norm=1.0).aggregate(base, [*honest, boosted]).state
    # The boosted update can move the mean by at most max_update_norm / 5.
    assert update_norm({"w": state["w"] - 0.1 * 4 / 5}) <= 1.0 / 5 + 1e-6


def test_experiment_wraps_the_aggregator_when_max_update_norm_is_set() -> None:
    plain = Experiment(load_config(None, ["federation.aggregator='median'"])).new_aggregator()
    assert isinstance(plain, Median)
    config = load_config(None, ["federation.aggregator='median'", "federation.max_update_norm=2.5"])
    wrapped = Experiment(config).new_aggregator()
    assert isinstance(wrapped, ClippedUpdates) and isinstance(wrapped.inner, Median)
    assert wrapped.max_update_norm == 2.5
    with pytest.raises(ConfigError, match=r"federation\.max_update_norm"):
        load_config(None, ["federation.max_update_norm=0"])
