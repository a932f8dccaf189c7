"""Captures: what the server saves round-trips; the crafted adapter hides itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedpeft.attacks.capture import (
    CapturedUpdate,
    CapturePlan,
    load_captures,
    malicious_adapter,
    save_capture,
    threat_model_of,
)
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
