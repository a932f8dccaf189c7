"""The audit's per-example epsilon under user-level DP is the replace-one bound, not the client one."""

import math

import dp_accounting
import pytest

from fedpeft.audit.guarantees import example_epsilon, guarantees_section
from fedpeft.config import parse_config
from fedpeft.privacy.ledger import (
    SERVER,
    DpEvent,
    PrivacyLedger,
    calibrate_noise,
    example_epsilon_of_client_dp,
)


def _client_dp_ledger(rounds: int, rate: float, sigma: float) -> PrivacyLedger:
    return PrivacyLedger([DpEvent(r, SERVER, "client", sigma, rate, 1) for r in range(1, rounds + 1)])


def test_at_q_1_one_example_is_the_gaussian_at_half_the_noise_multiplier() -> None:
    # Sensitivity 2C against noise sigma C: the Gaussian with noise multiplier sigma / 2.
    sigma = 1.3
    events = _client_dp_ledger(3, 1.0, sigma).events
    gaussian = dp_accounting.pld.PLDAccountant()
    gaussian.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma / 2), 3))
    assert example_epsilon_of_client_dp(events, 1e-5) == pytest.approx(gaussian.get_epsilon(1e-5), rel=1e-3)


def test_the_reviewed_audit_variant_reports_about_17_6_per_example() -> None:
    # audit-default's client:8 over 3 rounds of every client: the client-level epsilon is
    # about 7.4-8, while one example of a client is protected only at about 17.6.
    sigma = calibrate_noise(8.0, 1e-5, 1.0, 3)
    config = parse_config(
        {
            "partition": {"scheme": "iid", "num_clients": 4},
            "federation": {"rounds": 3},
            "privacy": {"client": {"enabled": True, "noise_multiplier": sigma}},
        }
    )
    section = guarantees_section(config, _client_dp_ledger(3, 1.0, sigma), [100] * 4)
    (unit,) = section["units"]
    assert unit["epsilon_max"] <= 8.0
    reported = example_epsilon(section, [0, 1])
    assert reported == unit["epsilon_example"] == pytest.approx(17.6, abs=0.1)
    assert any("17.6" in note and "per-example" in note for note in section["assumptions"])


def test_subsampling_still_amplifies_the_per_example_bound_and_zero_noise_has_none() -> None:
    sigma = calibrate_noise(4.0, 1e-5, 0.1, 100)
    events = _client_dp_ledger(100, 0.1, sigma).events
    per_example = example_epsilon_of_client_dp(events, 1e-5)
    assert 4.0 < per_example < example_epsilon_of_client_dp(_client_dp_ledger(100, 1.0, sigma).events, 1e-5)
    assert math.isinf(example_epsilon_of_client_dp(_client_dp_ledger(2, 0.5, 0.0).events, 1e-5))
    assert example_epsilon_of_client_dp([], 1e-5) == 0.0
