"""Streaming aggregation: folding updates one at a time equals the batch formulas."""

import random
from collections.abc import Mapping

import pytest
import torch

from fedpeft.aggregation import AGGREGATORS, ClientUpdate, ClippedUpdates
from fedpeft.aggregation._factor_gap import RunningFactorAveragingError, sketch_relative_std
from fedpeft.aggregation._lora import factor_averaging_error
from fedpeft.aggregation._math import clip_update_norm, weighted_mean
from fedpeft.aggregation.base import CollectedUpdates, accumulator_for
from fedpeft.config import ClientPrivacyConfig
from fedpeft.models import apply_delta
from fedpeft.privacy.central import NoisyMean

A, B = "layer.lora_A.default.weight", "layer.lora_B.default.weight"
LINEAR = ["fedavg", "fedavgm", "fedadam", "fedyogi"]
NEEDS_ALL = ["median", "trimmed_mean", "krum", "lora_product"]


def state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        A: scale * torch.randn(2, 6, generator=g),
        B: scale * torch.randn(4, 2, generator=g),
        "head.bias": scale * torch.randn(3, generator=g),
    }


def cohort(n: int = 7) -> list[ClientUpdate]:
    return [ClientUpdate(i, state(100 + i, 0.1), num_examples=3 * i + 1) for i in range(n)]


def streamed(name: str, base: Mapping[str, torch.Tensor], updates: list[ClientUpdate]) -> dict:
    accumulator = AGGREGATORS.build(name, {}, "x").accumulator(base, None)
    assert accumulator is not None
    for update in updates:
        accumulator.add(update)
    return accumulator.finish().state


def test_every_registered_aggregator_says_whether_it_streams() -> None:
    assert set(LINEAR) | set(NEEDS_ALL) == set(AGGREGATORS.names())
    base = state(0)
    for name in NEEDS_ALL:
        aggregator = AGGREGATORS.build(name, {}, "x")
        assert aggregator.accumulator(base, 3) is None
        assert isinstance(accumulator_for(aggregator, base, 3), CollectedUpdates)
    for name in LINEAR:
        assert AGGREGATORS.build(name, {}, "x").accumulator(base, 3) is not None
    assert ClippedUpdates(AGGREGATORS.build("median", {}, "x"), 1.0).accumulator(base) is None


def test_fedavg_streams_the_weighted_and_the_equal_mean() -> None:
    base, updates = state(0), cohort()
    for weighted in (True, False):
        weights = [float(u.num_examples) if weighted else 1.0 for u in updates]
        expected = apply_delta(base, weighted_mean([u.delta for u in updates], weights))
        accumulator = AGGREGATORS.build("fedavg", {"weighted": weighted}, "x").accumulator(base)
        assert accumulator is not None
        for update in updates:
            accumulator.add(update)
        got = accumulator.finish().state
        for key in base:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", LINEAR)
def test_streaming_equals_batch_over_rounds_in_any_arrival_order(name: str) -> None:
    """Two rounds (so optimiser state matters), arrivals shuffled: same state to float tolerance."""
    base = state(0)
    batch = AGGREGATORS.build(name, {}, "x")
    stream = AGGREGATORS.build(name, {}, "x")
    rng = random.Random(0)
    batch_state, stream_state = dict(base), dict(base)
    for _ in range(2):
        updates = cohort()
        batch_state = batch.aggregate(batch_state, updates).state
        shuffled = updates[:]
        rng.shuffle(shuffled)
        accumulator = stream.accumulator(stream_state, len(shuffled))
        assert accumulator is not None
        for update in shuffled:
            accumulator.add(update)
        stream_state = accumulator.finish().state
    for key in base:
        torch.testing.assert_close(stream_state[key], batch_state[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", LINEAR)
def test_streamed_weights_are_respected(name: str) -> None:
    base = {k: torch.zeros_like(v) for k, v in state(0).items()}
    for heavy_sign in (1.0, -1.0):
        heavy = ClientUpdate(0, {k: heavy_sign * torch.ones_like(v) for k, v in base.items()}, 1000)
        light = ClientUpdate(1, {k: -heavy_sign * torch.ones_like(v) for k, v in base.items()}, 1)
        result = streamed(name, base, [light, heavy])
        assert (result["head.bias"] * heavy_sign > 0).all()


def test_adding_leaves_the_optimiser_state_alone_until_finish() -> None:
    aggregator = AGGREGATORS.build("fedadam", {}, "x")
    accumulator = aggregator.accumulator(state(0))
    assert accumulator is not None
    for update in cohort():
        accumulator.add(update)
    assert aggregator.state_dict()["step"] == 0 and not aggregator.state_dict()["m"]
    accumulator.finish()
    assert aggregator.state_dict()["step"] == 1


def test_clipping_streams_over_a_linear_rule_as_the_batch_path_does() -> None:
    base = state(0)
    updates = [ClientUpdate(i, state(200 + i, 1.0 + i), i + 1) for i in range(5)]
    clipped = [ClientUpdate(u.client_id, clip_update_norm(u.delta, 2.0), u.num_examples) for u in updates]
    expected = AGGREGATORS.build("fedavg", {}, "x").aggregate(base, clipped)
    accumulator = ClippedUpdates(AGGREGATORS.build("fedavg", {}, "x"), 2.0).accumulator(base)
    assert accumulator is not None
    for update in updates[::-1]:
        accumulator.add(update)
    result = accumulator.finish()
    for key in base:
        torch.testing.assert_close(result.state[key], expected.state[key], rtol=0, atol=1e-6)
    assert result.metrics["clipped_updates"] == sum(
        float(sum(t.double().pow(2).sum() for t in u.delta.values()) ** 0.5 > 2.0) for u in updates
    )


def test_the_dp_clipped_sum_streams_to_the_batch_formula_in_any_order() -> None:
    updates = [ClientUpdate(i, state(300 + i, 0.3 * (i + 1)), 1) for i in range(6)]
    config = ClientPrivacyConfig(enabled=True, clipping_norm=1.0, noise_multiplier=0.0)
    expected = {
        name: sum(clip_update_norm(u.delta, 1.0)[name].double() for u in updates) / 4.0
        for name in updates[0].delta
    }
    for order in (updates, updates[::-1]):
        running = NoisyMean(4.0, config, state(0))
        for update in order:
            running.add(update)
        mean, diagnostics = running.finish()
        for name, value in expected.items():
            torch.testing.assert_close(mean.delta[name], value.float(), rtol=0, atol=1e-7)
        assert diagnostics["dp_clients"] == 6.0


def lora_cohort(
    count: int, d_out: int, d_in: int, pairs: int, seed: int
) -> tuple[dict, list[dict], list[float]]:
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    for p in range(pairs):
        base[f"l{p}.lora_A.default.weight"] = torch.randn(4, d_in, generator=g)
        base[f"l{p}.lora_B.default.weight"] = torch.randn(d_out, 4, generator=g)
    deltas = [{k: 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(count)]
    weights = [float(1 + i % 5) for i in range(count)]
    return base, deltas, weights


def gap(base: dict, deltas: list[dict], weights: list[float], **options: int) -> tuple[float, float]:
    running = RunningFactorAveragingError(base, **options)
    for delta, weight in zip(deltas, weights, strict=True):
        running.add(delta, weight)
    mean = {
        k: sum(w * d[k].double() for d, w in zip(deltas, weights, strict=True)) / sum(weights) for k in base
    }
    estimate = running.finish(mean)
    return estimate.value, estimate.relative_std


def test_the_error_is_exact_within_the_budget() -> None:
    base, deltas, weights = lora_cohort(6, 12, 10, 2, seed=0)
    value, relative_std = gap(base, deltas, weights)
    assert relative_std == 0.0
    assert value == pytest.approx(factor_averaging_error(base, deltas, weights), rel=1e-12)


def test_a_cohort_beyond_the_budget_is_sketched_from_the_start_or_on_overflow() -> None:
    base, deltas, weights = lora_cohort(6, 12, 10, 2, seed=0)
    per_update = sum(t.numel() for t in base.values())
    for cohort_hint in (6, None):
        _, relative_std = gap(base, deltas, weights, cohort=cohort_hint, exact_values=3 * per_update)
        assert relative_std == pytest.approx(sketch_relative_std(128))


def test_the_sketch_is_unbiased_and_within_its_bound() -> None:
    """Over sketch seeds: each estimate within rho of the exact squared norm, their mean within rho/4."""
    base, deltas, weights = lora_cohort(40, 96, 80, 3, seed=1)
    exact = factor_averaging_error(base, deltas, weights) ** 2
    estimates = []
    for seed in range(12):
        value, rho = gap(base, deltas, weights, exact_values=0, sketch_size=32, seed=seed)
        estimates.append(value**2)
        assert abs(value**2 - exact) <= rho * exact
    assert abs(sum(estimates) / len(estimates) - exact) <= rho / 4 * exact
    # The sketch says something: two clearly different cohorts stay apart.
    assert len({round(e, 12) for e in estimates}) > 1


def test_half_precision_updates_are_sketched_as_their_float32_values() -> None:
    """Decoded bfloat16/float16 updates: the sketch equals the one of their float32 values."""
    base, deltas, weights = lora_cohort(5, 16, 12, 2, seed=3)
    for dtype in (torch.bfloat16, torch.float16):
        low = [{k: v.to(dtype) for k, v in d.items()} for d in deltas]
        widened = [{k: v.float() for k, v in d.items()} for d in low]
        assert gap(base, low, weights, exact_values=0) == pytest.approx(
            gap(base, widened, weights, exact_values=0), rel=1e-6
        )


def test_a_shared_a_factor_sketches_to_zero() -> None:
    """FFA-LoRA: no client changes A, so the gap is exactly zero, sketched or not."""
    base, deltas, weights = lora_cohort(10, 16, 12, 2, seed=2)
    for delta in deltas:
        for name in delta:
            if ".lora_A." in name:
                delta[name] = torch.zeros_like(delta[name])
    value, rho = gap(base, deltas, weights, exact_values=0)
    assert rho > 0 and value < 1e-12
