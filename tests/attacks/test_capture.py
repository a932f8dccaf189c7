"""Captures: what the server saves round-trips (a secure round's sum with its clients); the crafted adapter hides itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedpeft.attacks.capture import (
    SUM_CLIENT_ID,
    CapturedUpdate,
    CapturePlan,
    load_captures,
    malicious_adapter,
    save_capture,
    threat_model_of,
)
from fedpeft.attacks.drawn_batches import save_drawn_batches
from fedpeft.attacks.observation import Observation
from fedpeft.config import AdapterConfig, ModelConfig, TrainConfig
from fedpeft.errors import AttackError
from fedpeft.models import adapter_state, build_model, load_adapter_state


def observation(seed: int = 0) -> Observation:
    generator = torch.Generator().manual_seed(seed)
    state = {
        "a.lora_A.default.weight": torch.randn(4, 6, generator=generator),
        "head.weight": torch.randn(2, 6, generator=generator),
    }
    update = {k: torch.randn(v.shape, generator=generator) for k, v in state.items()}
    return Observation("fedsgd", state, update, learning_rate=0.01, local_steps=1, num_examples=37)


def test_a_capture_round_trips_bit_for_bit(tmp_path: Path) -> None:
    saved = [CapturedUpdate(2, 7, observation(0)), CapturedUpdate(1, 3, observation(1))]
    for captured in saved:
        save_capture(tmp_path, captured)
    loaded = load_captures(tmp_path)
    assert [(c.server_round, c.client_id) for c in loaded] == [(1, 3), (2, 7)]
    for got, want in zip(loaded, saved[::-1], strict=True):
        o, w = got.observation, want.observation
        assert (o.threat_model, o.learning_rate, o.local_steps, o.num_examples) == (
            w.threat_model,
            w.learning_rate,
            w.local_steps,
            w.num_examples,
        )
        assert all(
            torch.equal(o.update[k], w.update[k]) and torch.equal(o.global_state[k], w.global_state[k])
            for k in w.update
        )


def test_missing_or_empty_capture_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(AttackError, match="no capture folder"):
        load_captures(tmp_path / "nope")
    with pytest.raises(AttackError, match="holds no captured update"):
        load_captures(tmp_path)


def test_plan_selects_rounds_and_clients(tmp_path: Path) -> None:
    plan = CapturePlan(tmp_path, frozenset({2}), frozenset({1}), True, "malicious", {2: 0.1}, 1)
    assert plan.wants(2, 1) and not plan.wants(2, 0) and not plan.wants(1, 1)
    assert plan.crafts(2) and not plan.crafts(1)
    everyone = CapturePlan(tmp_path, frozenset({2}), frozenset(), False, "fedavg", {2: 0.1}, 5)
    assert everyone.wants(2, 9) and not everyone.crafts(2)


def test_threat_model_follows_the_local_training() -> None:
    assert threat_model_of(TrainConfig(steps=1, optimizer="sgd"), malicious=False) == "fedsgd"
    assert threat_model_of(TrainConfig(steps=1, optimizer="adamw"), malicious=False) == "fedavg"
    assert threat_model_of(TrainConfig(steps=5, optimizer="sgd"), malicious=False) == "fedavg"
    assert threat_model_of(TrainConfig(steps=1, optimizer="sgd"), malicious=True) == "malicious"


def test_crafted_adapter_leaves_the_model_computing_the_base_model(tiny_llama_dir: Path) -> None:
    adapter = AdapterConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"])  # type: ignore[call-arg]
    loaded = build_model(ModelConfig(name_or_path=str(tiny_llama_dir), task="causal-lm"), adapter)
    crafted = malicious_adapter(adapter_state(loaded.model), seed=3)
    assert all((v == 0).all() for k, v in crafted.items() if ".lora_A." in k)
    assert all((v != 0).all() for k, v in crafted.items() if ".lora_B." in k)
    load_adapter_state(loaded.model, crafted)
    loaded.model.eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        with_adapter = loaded.model(input_ids=ids).logits
        with loaded.model.disable_adapter():
            base = loaded.model(input_ids=ids).logits
    assert torch.equal(with_adapter, base)


def write_metrics(run_dir: Path, rounds: dict[int, list[tuple[int, int]]]) -> Path:
    """A ``metrics.json`` whose rounds name their clients (id, example count) as the server writes them."""
    records = [
        {"round": r, "per_client": [{"client_id": c, "num_examples": n} for c, n in clients]}
        for r, clients in rounds.items()
    ]
    path = run_dir / "metrics.json"
    path.write_text(json.dumps({"rounds": records}), encoding="utf-8")
    return path


def test_a_secure_rounds_sum_loads_as_one_observation_of_its_clients(tmp_path: Path) -> None:
    plan = CapturePlan(tmp_path / "captures", frozenset({2}), frozenset(), False, "fedsgd", {2: 0.05}, 1)
    state, total = observation(0).global_state, observation(1).update
    plan.save_sum(2, state, total, clients=2)
    save_capture(plan.folder, CapturedUpdate(1, 4, observation(2)))
    save_drawn_batches(plan.folder, 2, 3, [[5, 1]])
    write_metrics(tmp_path, {1: [(4, 10)], 2: [(1, 11), (3, 12)]})

    first, summed = load_captures(plan.folder)
    assert not first.is_sum and first.clients == (4,) and first.describe() == "client 4"
    assert summed.is_sum and (summed.server_round, summed.client_id) == (2, SUM_CLIENT_ID)
    assert summed.clients == (1, 3) and summed.describe() == "sum of clients 1+3"
    assert [c.drawn_batches for c in summed.contributions] == [None, ((5, 1),)]
    o = summed.observation
    assert (o.threat_model, o.learning_rate, o.local_steps, o.num_examples) == ("fedsgd", 0.05, 1, 23)
    assert all(torch.equal(o.update[k], total[k]) and torch.equal(o.global_state[k], state[k]) for k in total)


def test_a_sum_whose_clients_cannot_be_named_is_refused(tmp_path: Path) -> None:
    plan = CapturePlan(tmp_path / "captures", frozenset({1}), frozenset(), False, "fedsgd", {1: 0.05}, 1)
    plan.save_sum(1, observation(0).global_state, observation(1).update, clients=3)
    with pytest.raises(AttackError, match=r"metrics\.json"):
        load_captures(plan.folder)
    write_metrics(tmp_path, {1: [(0, 5), (1, 5)]})
    with pytest.raises(AttackError, match=r"sums 3 updates, but .* names 2 client"):
        load_captures(plan.folder)
    write_metrics(tmp_path, {2: [(0, 5)]})
    with pytest.raises(AttackError, match="no round 1"):
        load_captures(plan.folder)
    # Another run's metrics, named explicitly, are read instead.
    other = write_metrics(tmp_path / "captures", {1: [(0, 5), (1, 5), (2, 5)]})
    assert load_captures(plan.folder, other)[0].clients == (0, 1, 2)
