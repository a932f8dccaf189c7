"""The ledger's epsilon against Opacus' and dp-accounting's accountants."""

import math

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import PRVAccountant, RDPAccountant

from fedpeft.privacy import DpEvent, PrivacyLedger, calibrate_noise, epsilon_of
from fedpeft.privacy.ledger import RDP_ORDERS

CASES = [(0.02, 1.1, 300, 1e-5), (0.064, 0.8, 30, 1e-5), (1.0, 2.0, 10, 1e-6), (0.001, 5.0, 10_000, 1e-5)]


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), CASES)
def test_rdp_epsilon_equals_opacus_and_dp_accounting(
    q: float, sigma: float, steps: int, delta: float
) -> None:
    ledger = PrivacyLedger([DpEvent(1, "0", "example", sigma, q, steps)])
    ours = ledger.epsilon(delta)
    opacus = RDPAccountant()
    opacus.history = [(sigma, q, steps)]
    assert ours == pytest.approx(opacus.get_epsilon(delta, alphas=list(RDP_ORDERS)), abs=1e-6)
    google = RdpAccountant(orders=list(RDP_ORDERS))
    google.compose(ledger.to_dp_accounting())
    assert ours == pytest.approx(google.get_epsilon(delta), abs=1e-6)


def test_composition_over_rounds_matches_both_libraries_and_is_monotone() -> None:
    ledger = PrivacyLedger()
    previous = 0.0
    for round_ in range(1, 6):
        ledger.record(DpEvent(round_, "3", "example", 0.9 + 0.1 * round_, 0.05, 20))
        now = ledger.epsilon(1e-5)
        assert now > previous
        previous = now
    opacus = RDPAccountant()
    opacus.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.events]
    assert previous == pytest.approx(opacus.get_epsilon(1e-5, alphas=list(RDP_ORDERS)), abs=1e-6)
    google = RdpAccountant(orders=list(RDP_ORDERS))
    google.compose(ledger.to_dp_accounting())
    assert previous == pytest.approx(google.get_epsilon(1e-5), abs=1e-6)


def test_a_long_ledger_computes_each_distinct_mechanism_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forty rounds of one client's events: one RDP curve, not forty (nor forty per round).

    Epsilon is recomputed every round by the client and the server; before the curve
    was shared, the accounting's cost grew with the square of the rounds.
    """
    from opacus.accountants.analysis import rdp as rdp_analysis

    from fedpeft.privacy import ledger as ledger_module

    ledger_module._gaussian_rdp_per_step.cache_clear()
    computed = []
    original = rdp_analysis.compute_rdp

    def counting(**kwargs):
        computed.append((kwargs["q"], kwargs["noise_multiplier"]))
        return original(**kwargs)

    monkeypatch.setattr(rdp_analysis, "compute_rdp", counting)
    ledger = PrivacyLedger()
    for round_ in range(1, 41):
        ledger.record(DpEvent(round_, "0", "example", 0.888, 0.12, 1))
        spent = ledger.epsilon(1e-5)
    ledger.record(DpEvent(41, "0", "example", 0.5, 0.12, 2))
    ledger.epsilon(1e-5)
    assert computed == [(0.12, 0.888), (0.12, 0.5)]
    opacus = RDPAccountant()
    opacus.history = [(0.888, 0.12, 40)]
    assert spent == pytest.approx(opacus.get_epsilon(1e-5, alphas=list(RDP_ORDERS)), abs=1e-9)


def test_prv_accountant_is_opacus_prv() -> None:
    ledger = PrivacyLedger(
        [DpEvent(1, "0", "example", 1.1, 0.02, 300), DpEvent(2, "0", "example", 1.1, 0.02, 300)]
    )
    opacus = PRVAccountant()
    opacus.history = [(1.1, 0.02, 300), (1.1, 0.02, 300)]
    assert ledger.epsilon(1e-5, accountant="prv") == pytest.approx(opacus.get_epsilon(1e-5), abs=1e-6)
    # PRV is tighter than the RDP bound.
    assert ledger.epsilon(1e-5, accountant="prv") < ledger.epsilon(1e-5)


def test_parties_and_units_are_accounted_separately() -> None:
    ledger = PrivacyLedger(
        [
            DpEvent(1, "0", "example", 1.0, 0.1, 10),
            DpEvent(1, "1", "example", 1.0, 0.1, 40),
            DpEvent(1, "server", "client", 1.0, 0.5, 1),
        ]
    )
    assert ledger.parties("example") == ["0", "1"]
    assert ledger.epsilon(1e-5, "1", "example") > ledger.epsilon(1e-5, "0", "example") > 0
    assert ledger.epsilon(1e-5, "server", "client") == pytest.approx(
        epsilon_of([DpEvent(1, "server", "client", 1.0, 0.5, 1)], 1e-5)
    )
    assert ledger.epsilon(1e-5, "nobody") == 0.0


def test_json_round_trip_and_dp_accounting_event_shape() -> None:
    ledger = PrivacyLedger([DpEvent(2, "7", "example", 1.3, 0.01, 50)])
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again == ledger
    event = again.to_dp_accounting()
    assert isinstance(event, dp_accounting.ComposedDpEvent)
    inner = event.events[0]
    assert isinstance(inner, dp_accounting.SelfComposedDpEvent) and inner.count == 50


def test_zero_noise_is_infinite_epsilon() -> None:
    assert math.isinf(epsilon_of([DpEvent(1, "0", "example", 0.0, 0.1, 1)], 1e-5))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_is_the_smallest_that_meets_the_target(accountant: str) -> None:
    sigma = calibrate_noise(3.0, 1e-5, 0.05, 200, accountant)  # type: ignore[arg-type]
    spent = epsilon_of([DpEvent(0, "0", "example", sigma, 0.05, 200)], 1e-5, accountant)  # type: ignore[arg-type]
    assert spent <= 3.0
    less = epsilon_of([DpEvent(0, "0", "example", sigma * 0.99, 0.05, 200)], 1e-5, accountant)  # type: ignore[arg-type]
    assert less > 3.0


def test_impossible_target_names_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"target_epsilon 0\.01 .* out of reach"):
        calibrate_noise(0.01, 1e-5, 1.0, 100_000)


def test_bad_events_are_refused() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        DpEvent(1, "0", "example", 1.0, 1.5, 1)
