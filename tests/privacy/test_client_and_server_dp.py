"""The privacy plan, the per-client budget across rounds, and server-side user-level DP."""

from pathlib import Path

import pytest
import torch

from fedpeft.aggregation import ClientUpdate
from fedpeft.aggregation._math import clip_update_norm as clip_update
from fedpeft.aggregation._math import update_norm
from fedpeft.client import run_client_round
from fedpeft.config import ClientPrivacyConfig, parse_config
from fedpeft.errors import ConfigError, PrivacyBudgetExhausted
from fedpeft.experiment import Experiment
from fedpeft.privacy import PrivacyLedger
from fedpeft.privacy.central import noisy_mean
from tests.conftest import tiny_config


def dp_config(tiny_bert_dir: Path, sentiment_files: dict[str, Path], **example: object) -> dict:
    data = tiny_config(tiny_bert_dir, sentiment_files)
    data["train"] = {"steps": 3, "batch_size": 8, "lr": 5e-3}
    data["privacy"] = {"example": {"enabled": True, **example}}
    return data


def test_impossible_target_fails_at_start_naming_it(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    data = dp_config(tiny_bert_dir, sentiment_files, target_epsilon=0.01)
    data["data"]["max_train_examples"] = 9  # 3 examples per client: sample rate 1
    data["federation"]["rounds"] = 50
    experiment = Experiment(parse_config(data))
    with pytest.raises(
        ConfigError, match=r"privacy.example.target_epsilon: client 0 \(3 examples\).*out of reach"
    ):
        _ = experiment.privacy_plan


def test_calibrated_plan_spends_at_most_the_target_over_all_rounds(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    experiment = Experiment(parse_config(dp_config(tiny_bert_dir, sentiment_files, target_epsilon=4.0)))
    sigma = experiment.privacy_plan[0]
    ledger = PrivacyLedger()
    global_state = dict(experiment.initial_state)
    epsilons = []
    for round_ in (1, 2):  # federation.rounds = 2: the whole plan
        result = run_client_round(experiment, 0, global_state, round_, {}, ledger)
        assert result.privacy is not None and result.privacy.noise_multiplier == sigma
        epsilons.append(result.epsilon)
    assert 0 < epsilons[0] < epsilons[1] <= 4.0
    assert epsilons[1] > 3.9  # calibration leaves almost nothing unspent


def test_a_client_over_budget_refuses_to_train(tiny_bert_dir: Path, sentiment_files: dict[str, Path]) -> None:
    data = dp_config(tiny_bert_dir, sentiment_files, noise_multiplier=0.7, target_epsilon=6.0)
    data["federation"]["rounds"] = 10
    experiment = Experiment(parse_config(data))
    ledger = PrivacyLedger()
    global_state = dict(experiment.initial_state)
    with pytest.raises(PrivacyBudgetExhausted, match=r"client 0: privacy budget spent \(epsilon .* of 6.0"):
        for round_ in range(1, 11):
            run_client_round(experiment, 0, global_state, round_, {}, ledger)
    assert 0 < len(ledger.events) < 10
    assert ledger.epsilon(1e-5) <= 6.0


def test_clipping_bounds_every_update() -> None:
    delta = {"a": torch.full((3,), 2.0), "b": torch.full((4,), 2.0)}
    clipped = clip_update(delta, 1.0)
    assert update_norm(clipped) == pytest.approx(1.0)
    small = {"a": torch.full((2,), 0.1)}
    assert torch.equal(clip_update(small, 1.0)["a"], small["a"])


def test_noiseless_dp_fedavg_is_the_equal_weight_mean_of_clipped_updates_over_the_expected_cohort() -> None:
    updates = [
        ClientUpdate(0, {"w": torch.tensor([3.0, 4.0])}, num_examples=100),  # norm 5 -> clipped to 1
        ClientUpdate(1, {"w": torch.tensor([0.3, 0.4])}, num_examples=1),
    ]
    config = ClientPrivacyConfig(enabled=True, clipping_norm=1.0, noise_multiplier=0.0)
    mean, diagnostics = noisy_mean(updates, expected_clients=4, config=config)
    torch.testing.assert_close(mean.delta["w"], (torch.tensor([0.6, 0.8]) + torch.tensor([0.3, 0.4])) / 4)
    assert diagnostics["dp_clipped_fraction"] == 0.5


def test_server_noise_has_the_calibrated_std() -> None:
    updates = [ClientUpdate(i, {"w": torch.zeros(20_000)}, 1) for i in range(5)]
    config = ClientPrivacyConfig(enabled=True, clipping_norm=0.5, noise_multiplier=2.0)
    mean, diagnostics = noisy_mean(updates, 10, config, torch.Generator().manual_seed(0))
    assert diagnostics["dp_noise_std"] == pytest.approx(0.1)
    assert float(mean.delta["w"].std()) == pytest.approx(0.1, rel=0.03)
    # Poisson sampling may draw more clients than expected: the denominator stays q N.
    more, _ = noisy_mean(updates, 2.5, config)
    assert more.delta["w"].shape == (20_000,)
    with pytest.raises(ValueError, match="expected_clients"):
        noisy_mean(updates, 0, config)
