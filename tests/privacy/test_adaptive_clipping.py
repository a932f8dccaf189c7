"""Adaptive clipping (Andrew et al. 2021): C follows a quantile of the update norms at no extra epsilon."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedpeft.aggregation import ClientUpdate
from fedpeft.checkpoint import load_checkpoint
from fedpeft.config import ClientPrivacyConfig, parse_config
from fedpeft.errors import ConfigError
from fedpeft.privacy.central import AdaptiveClipping, NoisyMean, update_noise_multiplier
from tests.flower.test_checkpoint_resume import (
    Crash,
    InProcessGrid,
    app_for,
    config_for,
    honest_nodes,
    run,
    server_identity,  # noqa: F401 - an autouse fixture, imported to apply here
)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("count_stddev", [2.0, 5.0, 50.0])
def test_update_and_count_together_are_one_gaussian_of_the_configured_multiplier(
    sigma: float, count_stddev: float
) -> None:
    # Sensitivities C (the clipped sum) and 1/2 (the centred count): in units of their
    # noise the pair moves by sqrt(1/sigma_u^2 + (1/2)^2/sigma_b^2), which must be 1/sigma.
    sigma_u = update_noise_multiplier(sigma, count_stddev)
    assert sigma_u > sigma
    assert math.hypot(1 / sigma_u, 0.5 / count_stddev) == pytest.approx(1 / sigma)


def test_a_count_noise_that_leaves_the_update_no_budget_is_refused() -> None:
    with pytest.raises(ValueError, match=r"clipped_count_stddev = 0.5 .* exceed noise_multiplier / 2 = 0.5"):
        update_noise_multiplier(1.0, 0.5)
    with pytest.raises(ValueError, match="needs noise"):
        update_noise_multiplier(0.0, 1.0)


def norms_round(norms: list[float], adaptive: AdaptiveClipping, config: ClientPrivacyConfig) -> dict:
    """One release over one-coordinate updates of the given norms; its diagnostics."""
    running = NoisyMean(len(norms), config, {"w": torch.zeros(1)}, adaptive)
    for client, norm in enumerate(norms):
        running.add(ClientUpdate(client, {"w": torch.tensor([norm])}, 1))
    return running.finish(torch.Generator().manual_seed(len(norms)))[1]


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_the_clipping_norm_settles_at_the_target_quantile_of_the_norms(quantile: float) -> None:
    norms = [float(n) for n in range(1, 201)]  # the q-quantile is about 200 q
    config = ClientPrivacyConfig(
        enabled=True,
        noise_multiplier=0.01,
        clipping_norm=0.1,
        adaptive_clipping=True,
        target_unclipped_quantile=quantile,
        clipped_count_stddev=0.1,
    )
    adaptive = AdaptiveClipping.of(config, len(norms))
    seen = []
    for _ in range(150):
        diagnostics = norms_round(norms, adaptive, config)
        seen.append(diagnostics["dp_clipping_norm"])
    assert seen[0] == 0.1 and seen[1] > seen[0]  # everything clipped at first: C grows
    assert adaptive.clipping_norm == pytest.approx(200 * quantile, rel=0.1)


def test_the_release_carries_the_raised_update_noise_and_the_round_c() -> None:
    config = ClientPrivacyConfig(
        enabled=True,
        noise_multiplier=1.0,
        clipping_norm=2.0,
        adaptive_clipping=True,
        clipped_count_stddev=1.0,
    )
    adaptive = AdaptiveClipping.of(config, 10)
    diagnostics = norms_round([0.5] * 10, adaptive, config)  # all unclipped: C shrinks after
    assert diagnostics["dp_clipping_norm"] == 2.0
    assert diagnostics["dp_noise_std"] == pytest.approx(update_noise_multiplier(1.0, 1.0) * 2.0 / 10)
    assert adaptive.clipping_norm < 2.0


def test_the_default_count_noise_is_a_twentieth_of_the_expected_cohort() -> None:
    config = ClientPrivacyConfig(enabled=True, noise_multiplier=1.0, adaptive_clipping=True)
    assert AdaptiveClipping.of(config, 100).count_stddev == 5.0
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        AdaptiveClipping.of(config, 10)  # sigma_b 0.5 is no more than sigma / 2


def test_configs_that_cannot_adapt_are_refused_at_load() -> None:
    small_cohort = {
        "partition": {"num_clients": 10},
        "federation": {"fraction_train": 0.5, "min_train_clients": 1},
        "privacy": {"client": {"enabled": True, "delta": 1e-3, "adaptive_clipping": True}},
    }
    with pytest.raises(ConfigError, match=r"privacy.client.adaptive_clipping: .*clipped_count_stddev"):
        parse_config(small_cohort)
    secure = {
        **small_cohort,
        "federation": {
            "fraction_train": 1.0,
            "min_train_clients": 2,
            "secure_aggregation": {"enabled": True},
        },
        "privacy": {
            "client": {"enabled": True, "delta": 1e-3, "adaptive_clipping": True, "clipped_count_stddev": 5.0}
        },
    }
    with pytest.raises(ConfigError, match="adaptive_clipping needs each update's norm on the server"):
        parse_config(secure)


def test_the_clipping_norm_moves_round_to_round_and_survives_a_resume(
    tiny_config_data: dict, tmp_path: Path
) -> None:
    config = config_for(tiny_config_data)
    data = config.to_dict()
    data["privacy"] = {
        "client": {
            "enabled": True,
            "noise_multiplier": 1.0,
            "clipping_norm": 1e-4,  # far below any update: C must grow
            "adaptive_clipping": True,
            "clipped_count_stddev": 1.0,
        }
    }
    config = parse_config(data)
    with pytest.raises(Crash):
        run(config, tmp_path, InProcessGrid(app_for(config), honest_nodes(), crash_on_call=3))
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.completed_round == 2
    assert checkpoint.clipping_norm is not None and checkpoint.clipping_norm != 1e-4
    run(config, tmp_path, InProcessGrid(app_for(config), honest_nodes()), resume=True)

    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    used = [r["aggregation"]["dp_clipping_norm"] for r in rounds]
    assert used[0] == 1e-4 and len(set(used)) == 3
    assert used[2] == pytest.approx(checkpoint.clipping_norm)  # round 3 started from the saved C


def test_the_start_warning_counts_the_raised_update_noise() -> None:
    from fedpeft.privacy.snr import client_level

    data = {
        "partition": {"num_clients": 400},
        "federation": {"fraction_train": 0.25, "min_train_clients": 1},
        "privacy": {"client": {"enabled": True, "delta": 1e-3, "noise_multiplier": 1.0}},
    }
    fixed = client_level(parse_config(data), coordinates=1000)
    data["privacy"]["client"]["adaptive_clipping"] = True
    adaptive = client_level(parse_config(data), coordinates=1000)
    assert adaptive.noise_multiplier == pytest.approx(update_noise_multiplier(1.0, 100 / 20))
    assert adaptive.per_step > fixed.per_step
