"""What the server says and records when a run starts."""

from fedpeft.config import parse_config
from fedpeft.experiment import Experiment
from fedpeft.flower.server_app import new_history


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
