"""Fixtures of the attack tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.config import AdapterConfig, ModelConfig
from fedpeft.models import LoadedModel, build_model
from tests.attacks.test_token_set import no_dropout


@pytest.fixture()
def tiny_llama(tiny_llama_dir: Path) -> LoadedModel:
    """The tiny Llama with LoRA r = 8 on q/v and no dropout (the attacks replay it exactly)."""
    adapter = AdapterConfig(
        method="lora", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
    )  # type: ignore[call-arg]
    return no_dropout(build_model(ModelConfig(name_or_path=str(tiny_llama_dir), task="causal-lm"), adapter))
