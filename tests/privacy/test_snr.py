"""The start-time warning for DP noise that drowns the clipped signal."""

import math
from pathlib import Path

import pytest

from fedpeft.config import load_config, parse_config
from fedpeft.experiment import Experiment
from fedpeft.flower.server_app import new_history
from fedpeft.privacy.snr import THRESHOLD, NoiseToSignal, noise_warnings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_the_ratio_is_noise_per_coordinate_over_the_best_case_signal() -> None:
    # sigma C / B = 2 C / 100 per coordinate against C / sqrt(10_000) = C / 100: twice.
    ratio = NoiseToSignal("example", noise_multiplier=2.0, expected_batch=100, coordinates=10_000, steps=4)
    assert ratio.per_step == pytest.approx(2.0)
    # Four aligned steps: signal 4 C / 100, noise 2 C sqrt(4) / 100: equal, at the threshold.
    assert ratio.over_run == pytest.approx(1.0) and THRESHOLD == 1.0 and not ratio.drowned
    assert NoiseToSignal("example", 2.0, 100, 10_000, steps=3).drowned
    assert NoiseToSignal("client", 2.0, 400, 10_000, steps=1).over_run == pytest.approx(0.5)


def test_a_hopeless_config_is_warned_at_start_and_kept_in_metrics(tiny_config_data: dict) -> None:
    data = tiny_config_data
    data["train"] = {"steps": 2, "batch_size": 2, "lr": 5e-3}
    data["privacy"] = {"example": {"enabled": True, "noise_multiplier": 3.0, "delta": 1e-4}}
    experiment = Experiment(parse_config(data))
    said: list[str] = []
    history = new_history(experiment.config, experiment, experiment.initial_state, said.append)
    warnings = [w for w in history.meta["warnings"] if "noise drowns the signal" in w]
    assert len(warnings) == 1 and any(warnings[0] in line for line in said)
    coordinates = sum(t.numel() for t in experiment.initial_state.values())
    per_step = 3.0 * math.sqrt(coordinates) / 2
    assert "privacy.example" in warnings[0] and "3 of 3 clients" in warnings[0]
    assert f"{per_step:.3g} x the largest clipped signal" in warnings[0]
    assert f"{per_step / math.sqrt(4):.3g} x even" in warnings[0]  # 2 rounds x 2 steps
    assert "train.batch_size" in warnings[0] and "freeze_lora_a" in warnings[0]

    # User-level: sigma 1 on the mean of 3 clients' updates of the same adapter.
    data["privacy"] = {"client": {"enabled": True, "noise_multiplier": 1.0, "delta": 1e-4}}
    experiment = Experiment(parse_config(data))
    history = new_history(experiment.config, experiment, experiment.initial_state, said.append)
    (warning,) = [w for w in history.meta["warnings"] if "noise drowns the signal" in w]
    assert "privacy.client" in warning and "expected cohort 3" in warning and "more clients" in warning

    # Noise a large batch makes small enough: no warning.
    data["train"] = {"steps": 2, "batch_size": 10_000, "lr": 5e-3}
    data["privacy"] = {"example": {"enabled": True, "noise_multiplier": 0.5, "delta": 1e-4}}
    experiment = Experiment(parse_config(data))
    sizes = experiment.partitions.sizes()
    assert noise_warnings(experiment.config, coordinates, experiment.privacy_plan, sizes) == []


@pytest.mark.parametrize(
    ("name", "overrides", "warned"),
    [
        # dp-example as shipped (2 silos of 4,000, expected batch 500) learns and is not
        # warned; with the default federation's shape (10 clients, batch 16) it would be.
        ("dp-example.toml", [], None),
        ("dp-example.toml", ["partition.num_clients=10", "train.batch_size=16"], "10 of 10 clients"),
        # dp-client as shipped (an expected cohort of 100, 3,074 coordinates) learns and
        # is not warned; a cohort of 10 (the default federation's clients, all sampled)
        # ended at chance and is warned.
        ("dp-client.toml", [], None),
        (
            "dp-client.toml",
            ["partition.num_clients=10", "federation.fraction_train=1.0", "adapter.r=8"],
            "expected cohort 10",
        ),
        # dp-cross-device (1,000 users, an expected cohort of 100, adaptive clipping; the
        # shipped data, for a checkout without ../shared) is not warned.
        (
            "dp-cross-device.toml",
            ["data.train=builtin:sst2/train.jsonl", "data.test=builtin:sst2/test.jsonl"],
            None,
        ),
    ],
)
def test_the_shipped_dp_configs(name: str, overrides: list[str], warned: str | None) -> None:
    config = load_config(CONFIGS / name, overrides)
    experiment = Experiment(config)
    coordinates = sum(t.numel() for t in experiment.initial_state.values())
    sizes = experiment.partitions.sizes()
    warnings = noise_warnings(config, coordinates, experiment.privacy_plan, sizes)
    assert [warned in w for w in warnings] == ([] if warned is None else [True])
