"""The clients' Skellam noise shares under secure aggregation, and their place in the ledger."""

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from scipy.special import logsumexp
from scipy.stats import chisquare, skellam

from fedpeft.privacy.distributed import (
    SkellamShare,
    clamp_probability,
    delta_with_clamps,
    quantise_stochastic,
    skellam_noise,
    skellam_rdp,
)
from fedpeft.privacy.ledger import (
    RDP_ORDERS,
    SERVER,
    DpEvent,
    PrivacyLedger,
    epsilon_of,
    example_epsilon_of_client_dp,
    skellam_event,
)


def test_stochastic_rounding_is_unbiased_and_within_one_step() -> None:
    values = np.array([0.3, -1.7, 2.5, 1e-3, -4e-4, 7.0])
    scale, draws = 3.0, 20_000
    rounded = quantise_stochastic(np.tile(values, (draws, 1)), scale, np.random.default_rng(0))
    assert rounded.dtype == np.int64
    target = values * scale
    assert np.all(np.abs(rounded - target) < 1)
    fraction = target - np.floor(target)
    tolerance = 5 * np.sqrt(fraction * (1 - fraction) / draws) + 1e-12
    # Rounding to nearest would miss 0.9 by 0.1, 40 tolerances; stochastic rounding is unbiased.
    assert np.all(np.abs(rounded.mean(axis=0) - target) <= tolerance)
    assert np.all(rounded[:, -1] == 21)  # on the grid already: no randomness


def test_skellam_noise_has_mean_zero_and_the_given_variance() -> None:
    variance, draws = 7.3, 400_000
    noise = skellam_noise(draws, variance, np.random.default_rng(1))
    assert noise.dtype == np.int64
    assert abs(noise.mean()) < 5 * math.sqrt(variance / draws)
    # Var of the sample variance: var^2 (2 + excess kurtosis 1 / var) / n.
    assert abs(noise.var() - variance) < 5 * variance * math.sqrt((2 + 1 / variance) / draws)
    assert not skellam_noise((3, 4), 0.0, np.random.default_rng(1)).any()
    with pytest.raises(ValueError, match="variance"):
        skellam_noise(3, -1.0, np.random.default_rng(1))


def test_shares_of_a_cohort_sum_to_one_full_skellam() -> None:
    total, cohort, draws = 12.0, 8, 200_000
    rng = np.random.default_rng(2)
    summed = sum(skellam_noise(draws, total / cohort, rng) for _ in range(cohort))
    assert isinstance(summed, np.ndarray)
    support = np.arange(-12, 13)
    observed = np.array([(summed < -12).sum(), *[(summed == k).sum() for k in support], (summed > 12).sum()])
    pmf = skellam.pmf(support, total / 2, total / 2)
    tail = skellam.cdf(-13, total / 2, total / 2)
    expected = draws * np.array([tail, *pmf, tail])
    assert chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3
    assert abs(summed.var() - total) < 5 * total * math.sqrt(2.1 / draws)


def test_share_properties_follow_from_clipping_grid_and_dimension() -> None:
    noise = SkellamShare(clipping_norm=0.5, noise_multiplier=1.2, scale=64.0, dim=100)
    assert noise.l2_sensitivity == 0.5 * 64 + 10
    assert noise.l1_sensitivity == pytest.approx(0.5 * 64 * 10 + 100)
    assert noise.variance == pytest.approx((1.2 * 42) ** 2)
    assert noise.share_variance(7) * 7 == pytest.approx(noise.variance)
    good: dict[str, Any] = {"clipping_norm": 1.0, "noise_multiplier": 1.0, "scale": 1.0, "dim": 1}
    for key, bad in (("clipping_norm", 0.0), ("noise_multiplier", -1.0), ("scale", math.inf), ("dim", 0)):
        with pytest.raises(ValueError, match=key):
            SkellamShare(**{**good, key: bad})


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3), min_size=20, max_size=20),
    st.floats(0.01, 10.0),
    st.sampled_from([1.0, 7.0, 256.0]),
    st.integers(0, 2**32),
)
def test_clipped_rounded_update_respects_the_l2_bound(
    values: list[float], clipping_norm: float, scale: float, seed: int
) -> None:
    noise = SkellamShare(clipping_norm=clipping_norm, noise_multiplier=0.0, scale=scale, dim=20)
    vector = np.array(values)
    share = noise.client_share(vector, cohort=5, rng=np.random.default_rng(seed))
    assert float(np.linalg.norm(share)) <= noise.l2_sensitivity
    assert float(np.abs(share).sum()) <= noise.l1_sensitivity
    norm = float(np.linalg.norm(vector))
    clipped = vector * min(1.0, clipping_norm / norm) if norm > 0 else vector
    assert np.all(np.abs(share - clipped * scale) < 1)


def test_a_zero_update_sends_pure_noise_of_its_share() -> None:
    noise = SkellamShare(clipping_norm=1.0, noise_multiplier=1.0, scale=100.0, dim=50_000)
    cohort = 4
    share = noise.client_share(np.zeros(50_000), cohort, np.random.default_rng(3))
    expected = noise.share_variance(cohort)
    assert abs(share.var() - expected) < 5 * expected * math.sqrt(2.1 / share.size)
    with pytest.raises(ValueError, match="shape"):
        noise.client_share(np.zeros(3), cohort, np.random.default_rng(3))


def _exact_skellam_rdp(order: int, variance: float, shift: list[int]) -> float:
    """D_order(Sk + shift || Sk) of the product distribution, summed over the pmf."""
    total = 0.0
    for step in shift:
        width = int(30 * math.sqrt(variance)) + 30 + abs(step)
        k = np.arange(-width, width + 1)
        shifted = skellam.logpmf(k - step, variance / 2, variance / 2)
        plain = skellam.logpmf(k, variance / 2, variance / 2)
        keep = np.isfinite(shifted) & np.isfinite(plain)
        total += float(logsumexp(order * shifted[keep] + (1 - order) * plain[keep])) / (order - 1)
    return total


@pytest.mark.parametrize("variance", [2.0, 10.0, 100.0])
@pytest.mark.parametrize("shift", [[1], [3], [2, -1, 1], [5, 5]])
def test_skellam_rdp_bounds_the_exact_renyi_divergence(variance: float, shift: list[int]) -> None:
    orders = [2, 5, 16, 32]
    l2, l1 = math.sqrt(sum(s * s for s in shift)), float(sum(abs(s) for s in shift))
    bound = skellam_rdp(orders, variance, l2, l1)
    exact = np.array([_exact_skellam_rdp(order, variance, shift) for order in orders])
    assert np.all(exact <= bound * (1 + 1e-9))
    # Not vacuous: within a factor 2 once the noise is wider than the shift.
    if variance >= 10 * l2**2:
        assert np.all(bound <= 2 * exact)


def test_skellam_rdp_approaches_the_gaussian_from_above_as_the_grid_refines() -> None:
    sigma, dim = 1.0, 100
    gaps = []
    for l2 in (10.0, 100.0, 1e3, 1e4):
        rdp = skellam_rdp(RDP_ORDERS, (sigma * l2) ** 2, l2, math.sqrt(dim) * l2)
        gaussian = np.asarray(
            rdp_analysis.compute_rdp(q=1.0, noise_multiplier=sigma, steps=1, orders=RDP_ORDERS)
        )
        assert np.all(rdp >= gaussian)
        gaps.append(float(np.max(rdp / gaussian - 1)))
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-3
    assert gaps[0] > 1e-3  # a coarse grid costs visibly more
    assert np.all(np.isinf(skellam_rdp([2, 3], 0.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="integers"):
        skellam_rdp([1.5], 1.0, 1.0, 1.0)


def _fine_grid(noise_multiplier: float = 1.0) -> SkellamShare:
    return SkellamShare(clipping_norm=1.0, noise_multiplier=noise_multiplier, scale=2.0**12, dim=1000)


def test_one_skellam_round_spends_slightly_more_than_the_gaussian() -> None:
    event = skellam_event(1, _fine_grid(), cohort=10, survivors=10)
    assert (event.party, event.unit, event.sample_rate, event.steps) == (SERVER, "client", 1.0, 1)
    assert event.noise_multiplier == pytest.approx(1.0)
    gaussian = epsilon_of([DpEvent(1, SERVER, "client", 1.0, 1.0, 1)], 1e-5)
    spent = epsilon_of([event], 1e-5)
    assert gaussian < spent < gaussian * (1 + 1e-3)


def test_fewer_survivors_leave_less_noise_and_spend_more() -> None:
    noise = _fine_grid()
    all_in = epsilon_of([skellam_event(1, noise, 10, 10)], 1e-5)
    half = skellam_event(1, noise, 10, 5)
    assert half.variance == pytest.approx(noise.variance / 2)
    assert half.noise_multiplier == pytest.approx(math.sqrt(0.5))
    assert epsilon_of([half], 1e-5) > all_in
    with pytest.raises(ValueError, match="survivors"):
        skellam_event(1, noise, 10, 11)


def test_skellam_and_gaussian_events_compose_as_rdp() -> None:
    noise = _fine_grid()
    events = [skellam_event(r, noise, 8, 8) for r in (1, 2, 3)]
    gaussian = [DpEvent(r, SERVER, "client", 1.0, 1.0, 1) for r in (1, 2, 3)]
    opacus = RDPAccountant()
    opacus.history = [(1.0, 1.0, 3)]
    reference = opacus.get_epsilon(1e-5, alphas=list(RDP_ORDERS))
    assert reference < epsilon_of(events, 1e-5) < reference * (1 + 1e-3)
    mixed = epsilon_of([*events[:2], gaussian[2]], 1e-5)
    assert reference < mixed < epsilon_of(events, 1e-5)


def test_old_ledger_json_loads_unchanged() -> None:
    old = (
        '[{"round": 1, "party": "0", "unit": "example", "noise_multiplier": 1.1, "sample_rate": 0.02, '
        '"steps": 300}, {"round": 1, "party": "server", "unit": "client", "noise_multiplier": 0.8, '
        '"sample_rate": 0.5, "steps": 1}]'
    )
    ledger = PrivacyLedger.from_json(old)
    assert ledger.events == [
        DpEvent(1, "0", "example", 1.1, 0.02, 300),
        DpEvent(1, SERVER, "client", 0.8, 0.5, 1),
    ]
    assert all(e.mechanism == "gaussian" for e in ledger.events)
    opacus = RDPAccountant()
    opacus.history = [(1.1, 0.02, 300)]
    assert ledger.epsilon(1e-5, "0") == pytest.approx(
        opacus.get_epsilon(1e-5, alphas=list(RDP_ORDERS)), abs=1e-9
    )
    assert json.loads(ledger.to_json()) == json.loads(old)  # Gaussian events keep their old keys


def test_skellam_events_round_trip_through_json() -> None:
    ledger = PrivacyLedger([DpEvent(1, "0", "example", 1.1, 0.02, 300), skellam_event(2, _fine_grid(), 6, 5)])
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again == ledger
    assert again.epsilon(1e-5, SERVER) == ledger.epsilon(1e-5, SERVER) > 0


def test_skellam_events_are_refused_where_no_accountant_knows_them() -> None:
    event = skellam_event(1, _fine_grid(), 4, 4)
    with pytest.raises(ValueError, match=r"prv.*rdp"):
        epsilon_of([event], 1e-5, "prv")
    with pytest.raises(ValueError, match="Skellam"):
        PrivacyLedger([event]).to_dp_accounting()
    with pytest.raises(ValueError, match="sample_rate 1"):
        DpEvent(1, SERVER, "client", 1.0, 0.5, 1, "skellam", 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        DpEvent(1, SERVER, "client", 2.0, 1.0, 1, "skellam", 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="skellam events only"):
        DpEvent(1, SERVER, "client", 1.0, 1.0, 1, variance=1.0)


def test_one_example_under_skellam_is_the_doubled_shift() -> None:
    noise = _fine_grid(noise_multiplier=2.0)
    events = [skellam_event(r, noise, 8, 8) for r in (1, 2)]
    half_sigma = epsilon_of([DpEvent(1, SERVER, "client", 1.0, 1.0, 2)], 1e-5)
    per_example = example_epsilon_of_client_dp(events, 1e-5)
    assert half_sigma < per_example < half_sigma * (1 + 1e-3)
    assert per_example > epsilon_of(events, 1e-5)
    with_gaussian = example_epsilon_of_client_dp([events[0], DpEvent(2, SERVER, "client", 2.0, 1.0, 1)], 1e-5)
    assert half_sigma < with_gaussian < per_example
    with pytest.raises(NotImplementedError, match="subsampled"):
        example_epsilon_of_client_dp([events[0], DpEvent(2, SERVER, "client", 2.0, 0.5, 1)], 1e-5)


def test_clamping_is_negligible_for_a_wide_range_and_certain_for_none() -> None:
    noise = SkellamShare(clipping_norm=1.0, noise_multiplier=1.0, scale=256.0, dim=10_000)
    wide = 2.0 ** math.ceil(math.log2(1.0 * (1 + 10 * 1.0)))  # the config's default R
    assert clamp_probability(noise, 10, wide) < 1e-12
    assert clamp_probability(noise, 10, 1e-3) == 1.0
    assert clamp_probability(noise, 10, 1.5) > clamp_probability(noise, 10, 3.0)


def test_clamp_probability_bounds_the_simulated_clamp_rate() -> None:
    noise = SkellamShare(clipping_norm=1.0, noise_multiplier=0.5, scale=4.0, dim=5)
    cohort, clipping_range, rounds = 2, 1.0 + 5 / 4.0, 20_000
    bound = clamp_probability(noise, cohort, clipping_range)
    assert 0.05 < bound < 1
    rng = np.random.default_rng(4)
    clamped = 0
    for _ in range(rounds):
        shares = [noise.client_share(rng.normal(size=5) * 10, cohort, rng) for _ in range(cohort)]
        clamped += any(np.any(np.abs(s) > clipping_range * noise.scale) for s in shares)
    assert clamped / rounds <= bound
    assert clamped > 0  # the event this bounds does happen at this range


def test_clamps_cost_delta_through_the_total_variation() -> None:
    assert delta_with_clamps(1e-5, 2.0, 0.0) == 1e-5
    assert delta_with_clamps(1e-5, 2.0, 1e-9) == pytest.approx(1e-5 + (1 + math.e**2) * 1e-9)
    assert delta_with_clamps(1e-5, 800.0, 1e-30) == 1.0
