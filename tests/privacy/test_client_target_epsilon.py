"""User-level DP by target: the noise calibrated when the config is read, and the
server's budget stopping a run before a release would exceed it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedpeft.privacy.ledger as ledger_module
from fedpeft.checkpoint import load_checkpoint
from fedpeft.config import config_from_toml, parse_config
from fedpeft.errors import ConfigError
from fedpeft.experiment import Experiment
from fedpeft.flower.server_app import client_releases_left, run_federation
from fedpeft.privacy.ledger import SERVER, DpEvent, PrivacyLedger, epsilon_of
from tests.flower.test_checkpoint_resume import (
    InProcessGrid,
    app_for,
    honest_nodes,
    server_identity,  # noqa: F401 - autouse fixture
)


def client_dp(tiny_config_data: dict, rounds: int = 4, **client: object) -> dict:
    return {
        **tiny_config_data,
        "train": {"steps": 2, "batch_size": 8, "lr": 5e-3},
        "federation": {
            "rounds": rounds,
            "fraction_train": 1.0,
            "min_train_clients": 2,
            "min_available_clients": 3,
        },
        "privacy": {"client": {"enabled": True, "delta": 1e-2, **client}},
    }


def releases(sigma: float, count: int) -> list[DpEvent]:
    return [DpEvent(r, SERVER, "client", sigma, 1.0, 1) for r in range(1, count + 1)]


def test_the_noise_is_calibrated_to_the_target_over_every_round(
    tiny_config_data: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_config(client_dp(tiny_config_data, target_epsilon=3.0))
    sigma = config.privacy.client.noise_multiplier
    assert epsilon_of(releases(sigma, 4), 1e-2) <= 3.0 < epsilon_of(releases(sigma * 0.99, 4), 1e-2)
    # The resolved config (what clients and resumed runs read) keeps sigma, not recalibrating.
    monkeypatch.setattr(ledger_module, "calibrate_noise", lambda *a, **k: pytest.fail("calibrated again"))
    assert config_from_toml(config.to_toml()).privacy.client == config.privacy.client


def test_a_target_out_of_reach_or_under_secure_aggregation_is_refused(tiny_config_data: dict) -> None:
    with pytest.raises(ConfigError, match=r"privacy.client.target_epsilon: .*out of reach"):
        parse_config(client_dp(tiny_config_data, rounds=50, target_epsilon=1e-3))
    data = client_dp(tiny_config_data, target_epsilon=8.0)
    data["federation"]["secure_aggregation"] = {"enabled": True}
    with pytest.raises(
        ConfigError, match=r"target_epsilon is not offered with federation.secure_aggregation"
    ):
        parse_config(data)


def test_releases_left_counts_what_the_budget_allows(tiny_config_data: dict) -> None:
    target = (epsilon_of(releases(1.0, 2), 1e-2) + epsilon_of(releases(1.0, 3), 1e-2)) / 2
    config = parse_config(client_dp(tiny_config_data, noise_multiplier=1.0, target_epsilon=target))
    ledger = PrivacyLedger()
    assert client_releases_left(ledger, config, 1) == 2  # capped by a round's attempts (retries 1)
    ledger.record(releases(1.0, 1)[0])
    assert client_releases_left(ledger, config, 2) == 1
    ledger.record(DpEvent(2, SERVER, "client", 1.0, 1.0, 1))
    assert client_releases_left(ledger, config, 3) == 0
    no_budget = parse_config(client_dp(tiny_config_data, noise_multiplier=1.0))
    assert client_releases_left(ledger, no_budget, 3) is None


def test_a_run_stops_before_the_release_that_would_exceed_the_budget(
    tiny_config_data: dict, tmp_path: Path
) -> None:
    target = (epsilon_of(releases(1.0, 2), 1e-2) + epsilon_of(releases(1.0, 3), 1e-2)) / 2
    config = parse_config(client_dp(tiny_config_data, noise_multiplier=1.0, target_epsilon=target))
    Experiment._cache.pop(config.fingerprint(), None)
    messages: list[str] = []
    history = run_federation(
        InProcessGrid(app_for(config), honest_nodes()), config, tmp_path, messages.append
    )

    assert [r.round for r in history.rounds] == [1, 2]
    assert history.rounds[-1].privacy["epsilon_client"] <= target
    note = "round 3's noised mean would exceed it, so training stops after round 2 of 4"
    assert any(note in m for m in messages)
    assert any(note in w for w in json.loads((tmp_path / "metrics.json").read_text())["warnings"])
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.finished and checkpoint.completed_round == 2
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
