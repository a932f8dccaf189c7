"""What the server says and records when a run starts."""

from pathlib import Path

import pytest

from fedpeft.config import parse_config
from fedpeft.errors import ConfigError
from fedpeft.experiment import Experiment
from fedpeft.flower.server_app import new_history
from fedpeft.flower.simulation import check_cohort_fits, run_simulation


def test_an_unset_delta_is_said_at_start_and_kept_in_metrics(tiny_config_data: dict) -> None:
    tiny_config_data["privacy"] = {"client": {"enabled": True, "noise_multiplier": 1.0}}
    experiment = Experiment(parse_config(tiny_config_data))
    said: list[str] = []
    history = new_history(experiment.config, experiment, experiment.initial_state, said.append)
    warning = "privacy.client.delta is not set: using 1e-05"
    assert any(warning in line for line in said)
    assert any(warning in w for w in history.meta["warnings"])
    assert any(warning in w for w in history.to_dict()["warnings"])  # metrics.json's top level

    tiny_config_data["privacy"]["client"]["delta"] = 1e-6
    experiment = Experiment(parse_config(tiny_config_data))
    history = new_history(experiment.config, experiment, experiment.initial_state, said.append)
    # The delta warning goes; the noise one stays (sigma 1 on 3 clients drowns the signal).
    assert not any("delta" in w for w in history.meta["warnings"])


def test_a_simulation_that_would_wait_for_missing_clients_stops_before_it_starts(
    tiny_config_data: dict, tmp_path: Path
) -> None:
    # One simulated client and the default min_available_clients of 2: the server would
    # wait an hour (round_timeout) for a second client that never connects.
    tiny_config_data["partition"] = {"scheme": "iid", "num_clients": 1}
    tiny_config_data["federation"] = {"min_train_clients": 1}
    with pytest.raises(
        ConfigError, match=r"federation.min_available_clients = 2 .*partition.num_clients = 1"
    ):
        run_simulation(parse_config(tiny_config_data), tmp_path / "run")
    assert not (tmp_path / "run").exists()

    tiny_config_data["federation"] = {"min_train_clients": 2, "min_available_clients": 1}
    with pytest.raises(
        ConfigError, match=r"federation.min_train_clients = 2 .* set federation.min_train_clients <= 1"
    ):
        check_cohort_fits(parse_config(tiny_config_data))
    tiny_config_data["federation"] = {"min_train_clients": 1, "min_available_clients": 1}
    check_cohort_fits(parse_config(tiny_config_data))  # fits: no error
