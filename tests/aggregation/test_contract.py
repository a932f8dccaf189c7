"""Contract matrix: every registered aggregator, the same properties."""

import pytest
import torch

from fedpeft.aggregation import AGGREGATORS, ClientUpdate

NAMES = AGGREGATORS.names()

# Robust rules that ignore example counts on purpose: a poisoned client could claim any
# count. They skip "weights respected" and must pass "counts ignored" instead.
UNWEIGHTED = {
    "median": "the coordinate-wise median ignores example counts",
    "trimmed_mean": "the coordinate-wise trimmed mean ignores example counts",
    "krum": "Krum keeps one update chosen by distance; counts only weight Multi-Krum's mean",
}


A, B = "layer.lora_A.default.weight", "layer.lora_B.default.weight"


def random_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One LoRA pair (rank 2, 6 -> 4) and a head bias, as peft names them."""
    g = torch.Generator().manual_seed(seed)
    return {
        A: torch.randn(2, 6, generator=g).to(dtype),
        B: torch.randn(4, 2, generator=g).to(dtype),
        "head.bias": torch.randn(3, generator=g).to(dtype),
    }


def updates(n: int = 4) -> list[ClientUpdate]:
    return [
        ClientUpdate(client_id=i, delta=random_state(100 + i), num_examples=10 * (i + 1)) for i in range(n)
    ]


@pytest.mark.parametrize("name", NAMES)
def test_order_invariance(name: str) -> None:
    """To float32 rounding: the streaming rules sum in float32 (values here are about 1)."""
    base = random_state(0)
    forward = AGGREGATORS.build(name, {}, "x").aggregate(base, updates()).state
    backward = AGGREGATORS.build(name, {}, "x").aggregate(base, updates()[::-1]).state
    for key in base:
        torch.testing.assert_close(forward[key], backward[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_identical_updates_act_as_one(name: str) -> None:
    """Many clients sending the same delta == one client sending it (for any weights)."""
    base = random_state(0)
    delta = random_state(7)
    same = [ClientUpdate(client_id=i, delta=delta, num_examples=i + 1) for i in range(3)]
    many = AGGREGATORS.build(name, {}, "x").aggregate(base, same).state
    one = AGGREGATORS.build(name, {}, "x").aggregate(base, same[:1]).state
    for key in base:
        torch.testing.assert_close(many[key], one[key])


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "median", "trimmed_mean", "krum"])
def test_averaging_aggregators_apply_an_identical_update(name: str) -> None:
    base = random_state(0)
    delta = random_state(7)
    same = [ClientUpdate(client_id=i, delta=delta, num_examples=i + 1) for i in range(3)]
    result = AGGREGATORS.build(name, {}, "x").aggregate(base, same).state
    for key in base:
        torch.testing.assert_close(result[key], base[key] + delta[key])


@pytest.mark.parametrize("name", NAMES)
def test_keys_shapes_and_dtypes_kept(name: str) -> None:
    base = random_state(0, torch.float64)
    ups = [
        ClientUpdate(u.client_id, {k: v.double() for k, v in u.delta.items()}, u.num_examples)
        for u in updates()
    ]
    result = AGGREGATORS.build(name, {}, "x").aggregate(base, ups).state
    assert list(result) == list(base)
    for key in base:
        assert result[key].shape == base[key].shape and result[key].dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_respected(name: str) -> None:
    """The step follows the client with more examples, and flips when weights swap."""
    if name in UNWEIGHTED:
        pytest.skip(UNWEIGHTED[name])
    base = {k: torch.zeros_like(v) for k, v in random_state(0).items()}
    for heavy_sign in (1.0, -1.0):
        heavy_delta = {k: heavy_sign * torch.ones_like(v) for k, v in base.items()}
        heavy = ClientUpdate(0, heavy_delta, num_examples=1000)
        light = ClientUpdate(1, {k: -v for k, v in heavy_delta.items()}, num_examples=1)
        result = AGGREGATORS.build(name, {}, "x").aggregate(base, [heavy, light]).state
        assert (result["head.bias"] * heavy_sign > 0).all()


@pytest.mark.parametrize("name", sorted(UNWEIGHTED))
def test_unweighted_rules_ignore_example_counts(name: str) -> None:
    base = random_state(0)
    reweighted = [ClientUpdate(u.client_id, u.delta, 1000 if i == 0 else 1) for i, u in enumerate(updates())]
    original = AGGREGATORS.build(name, {}, "x").aggregate(base, updates()).state
    changed = AGGREGATORS.build(name, {}, "x").aggregate(base, reweighted).state
    for key in base:
        torch.testing.assert_close(original[key], changed[key], rtol=0, atol=0)


def test_unweighted_names_are_registered() -> None:
    assert set(UNWEIGHTED) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips(name: str) -> None:
    first = AGGREGATORS.build(name, {}, "x")
    first.aggregate(random_state(0), updates())
    second = AGGREGATORS.build(name, {}, "x")
    second.load_state_dict(first.state_dict())
    assert second.state_dict().keys() == first.state_dict().keys()
