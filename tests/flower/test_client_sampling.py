"""Client sampling: Poisson from OS randomness under user-level DP, and accounted as done.

The amplification the ledger credits (q = fraction_train per release) holds only if
who takes part is secret and drawn independently per client, and the noised mean
divides by the expected cohort q N whatever came back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedpeft.aggregation.fedavg import FedAvg
from fedpeft.checkpoint import load_checkpoint
from fedpeft.client import run_client_round
from fedpeft.codecs.dense import Dense
from fedpeft.config import ClientPrivacyConfig, FederationConfig
from fedpeft.experiment import Experiment
from fedpeft.flower.strategy import AdapterStrategy
from fedpeft.privacy.ledger import SERVER, PrivacyLedger
from tests.flower.test_checkpoint_resume import (
    InProcessGrid,
    app_for,
    config_for,
    honest_nodes,
    run,
    server_identity,  # noqa: F401 - an autouse fixture, imported to apply here
)


class ConnectedNodes:
    """The part of Flower's Grid that sampling reads: ``count`` connected nodes."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.count + 1))


def strategy(fraction: float, user_level_dp: bool, seed: int = 7, min_train: int = 1) -> AdapterStrategy:
    federation = FederationConfig(
        fraction_train=fraction, min_train_clients=min_train, min_available_clients=1
    )
    central = ClientPrivacyConfig(enabled=user_level_dp)
    return AdapterStrategy(federation, Dense(), FedAvg(), seed, central)


def cohorts(s: AdapterStrategy, nodes: int, rounds: int) -> list[list[int]]:
    return [s.sample_nodes(r, ConnectedNodes(nodes)) for r in range(1, rounds + 1)]  # type: ignore[arg-type]


def test_under_user_level_dp_the_cohort_is_not_a_function_of_the_run_seed() -> None:
    # Same run seed, same rounds: seeded sampling (the reviewed bug) gives equal cohorts.
    assert cohorts(strategy(0.3, True), 40, 10) != cohorts(strategy(0.3, True), 40, 10)


def test_without_user_level_dp_sampling_stays_seeded_and_fixed_size() -> None:
    first, second = cohorts(strategy(0.3, False), 40, 10), cohorts(strategy(0.3, False), 40, 10)
    assert first == second and {len(c) for c in first} == {12}


def test_poisson_sampling_includes_each_node_at_rate_q() -> None:
    q, nodes, rounds = 0.1, 200, 200
    drawn = cohorts(strategy(q, True), nodes, rounds)
    total = sum(len(c) for c in drawn)
    trials = nodes * rounds
    # Binomial(40000, 0.1): five standard deviations either side (a 6e-7 chance to fail).
    assert abs(total - q * trials) < 5 * math.sqrt(trials * q * (1 - q))
    # Independent draws: cohort sizes vary round to round (a fixed-size sample would not).
    assert len({len(c) for c in drawn}) > 5
    # Every node is drawn independently: none is favoured or left out systematically.
    per_node = [sum(n in c for c in drawn) for n in range(1, nodes + 1)]
    assert max(per_node) < q * rounds + 6 * math.sqrt(rounds * q * (1 - q))


def test_the_server_waits_for_an_expected_cohort_of_min_train_clients() -> None:
    s = strategy(0.1, True, min_train=3)
    s.federation = s.federation.model_copy(update={"round_timeout": 0.5})
    with pytest.raises(TimeoutError, match="min_train_clients = 3"):
        s.sample_nodes(1, ConnectedNodes(29))  # type: ignore[arg-type]
    s.sample_nodes(1, ConnectedNodes(30))  # type: ignore[arg-type]
    assert s.expected_clients == pytest.approx(3.0)


def _dp_config(tiny_config_data: dict, fraction: float, min_train: int):
    data = {
        **tiny_config_data,
        "privacy": {"client": {"enabled": True, "noise_multiplier": 0.0, "clipping_norm": 1e6}},
    }
    return config_for(
        data, rounds=2, fraction_train=fraction, min_train_clients=min_train, min_available_clients=3
    )


def _expected_global(config, clients: list[int], expected_clients: float) -> dict[str, torch.Tensor]:
    """Round 1's global adapter by hand: initial + the sum of the clients' deltas / (q N)."""
    experiment = Experiment.cached(config)
    initial = dict(experiment.initial_state)
    total = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in initial.items()}
    for client in clients:
        result = run_client_round(experiment, client, initial, 1, {}, PrivacyLedger())
        delta = experiment.codec.decode(result.payload, _context(config, client), initial)
        for name, t in delta.items():
            total[name] += t.double()
    return {name: initial[name] + (total[name] / expected_clients).float() for name in initial}


def assert_global(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    checkpoint = load_checkpoint(folder)
    assert checkpoint is not None and checkpoint.global_state.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(checkpoint.global_state[name].float(), tensor, rtol=1e-5, atol=1e-6)


def _context(config, client: int):
    from fedpeft.codecs import CodecContext

    return CodecContext(run_seed=config.seed, server_round=1, client_id=client)


def test_the_ledger_records_q_and_the_mean_divides_by_q_n(tiny_config_data: dict, tmp_path: Path) -> None:
    config = _dp_config(tiny_config_data, fraction=0.5, min_train=1)
    config = config.model_copy(update={"federation": config.federation.model_copy(update={"rounds": 1})})
    run(config, tmp_path, InProcessGrid(app_for(config), honest_nodes()))
    ledger = json.loads((tmp_path / "privacy_ledger.json").read_text())
    assert [(e["party"], e["unit"], e["sample_rate"], e["steps"]) for e in ledger] == [
        (SERVER, "client", 0.5, 1)
    ]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    clients = [c["client_id"] for c in metrics["rounds"][0]["per_client"]]
    assert_global(tmp_path, _expected_global(config, clients, 0.5 * 3))


def test_too_few_replies_still_release_the_mean_over_q_n_once(tiny_config_data: dict, tmp_path: Path) -> None:
    # q = 1: every node is sampled; two of three are silent in the first call. Without
    # user-level DP this round would be sent again; under it the mean is released (over
    # q N = 3, not over the one reply) and counted once, and no retry tells who was absent.
    config = _dp_config(tiny_config_data, fraction=1.0, min_train=3)
    config = config.model_copy(update={"federation": config.federation.model_copy(update={"rounds": 1})})
    grid = InProcessGrid(app_for(config), honest_nodes(), silent={101: (1,), 102: (1,)})
    run(config, tmp_path, grid)
    assert grid.calls == 1
    ledger = json.loads((tmp_path / "privacy_ledger.json").read_text())
    assert [(e["party"], e["sample_rate"]) for e in ledger] == [(SERVER, 1.0)]
    assert_global(tmp_path, _expected_global(config, [0], 3.0))


def test_a_config_whose_expected_cohort_cannot_reach_min_train_clients_fails_at_load() -> None:
    from fedpeft.config import parse_config
    from fedpeft.errors import ConfigError

    data = {
        "partition": {"num_clients": 10},
        "federation": {"fraction_train": 0.1, "min_train_clients": 2},
        "privacy": {"client": {"enabled": True, "delta": 1e-3}},
    }
    with pytest.raises(ConfigError, match=r"fraction_train x partition.num_clients = 1 .*min_train_clients"):
        parse_config(data)
    data["federation"]["fraction_train"] = 0.2
    assert parse_config(data).federation.fraction_train == 0.2
