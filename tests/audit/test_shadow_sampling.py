"""Federated shadows sample clients as the run does: Poisson at fraction_train under user-level DP."""

from __future__ import annotations

from pathlib import Path

from fedpeft.audit.shadows import federate_shadow
from fedpeft.config import parse_config
from fedpeft.experiment import Experiment
from tests.conftest import tiny_config


def _shadow_cohorts(tiny_bert_dir: Path, sentiment_files: dict[str, Path], user_level_dp: bool) -> set[int]:
    """Clients trained over 4 rounds (one local step each), for each of 8 shadows."""
    data = tiny_config(tiny_bert_dir, sentiment_files)
    data["federation"] = {
        "rounds": 4,
        "fraction_train": 0.5,
        "min_train_clients": 1,
        "min_available_clients": 1,
    }
    data["train"] = {"steps": 1, "batch_size": 8, "lr": 5e-3}
    data["audit"] = {"membership_examples": 40, "clients": [0, 1], "shadow_models": 2}
    if user_level_dp:
        data["privacy"] = {"client": {"enabled": True, "noise_multiplier": 1.0, "delta": 1e-3}}
    experiment = Experiment(parse_config(data))
    return {federate_shadow(experiment, shadow) for shadow in range(8)}


def test_shadows_under_user_level_dp_draw_cohorts_of_varying_size(
    tiny_bert_dir: Path, sentiment_files: dict[str, Path]
) -> None:
    # Without it: 2 of 3 clients every round, 8 steps per shadow. With it: Binomial(12, 0.5)
    # steps per shadow, the same over eight shadows with a chance below 1e-4.
    assert _shadow_cohorts(tiny_bert_dir, sentiment_files, user_level_dp=False) == {8}
    assert len(_shadow_cohorts(tiny_bert_dir, sentiment_files, user_level_dp=True)) > 1
