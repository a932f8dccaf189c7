"""Fixtures of the attack tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.config import AdapterConfig, ModelConfig
from fedpeft.models import LoadedModel, build_model
from tests.attacks.test_token_set import no_dropout
from tests.conftest import save_tiny_bert


@pytest.fixture()
def tiny_llama(tiny_llama_dir: Path) -> LoadedModel:
    """The tiny Llama with LoRA r = 8 on q/v and no dropout (the attacks replay it exactly)."""
    adapter = AdapterConfig(
        method="lora", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
    )  # type: ignore[call-arg]
    return no_dropout(build_model(ModelConfig(name_or_path=str(tiny_llama_dir), task="causal-lm"), adapter))


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer_dir: Path) -> Path:
    """A 2-layer BERT classifier initialised 10x wider than BERT's default.

    A classifier's loss reaches the first layer's positions other than [CLS] only
    through the second layer (with one layer, every projection's gradient is rank 1:
    [CLS]'s attention mixes the inputs before the loss sees them). At BERT's default
    init of std 0.02 that route carries 1e-7 of the gradient, float32's noise floor,
    where a pretrained model carries plenty; std 0.2 restores it.
    """
    return save_tiny_bert(
        tmp_path_factory.mktemp("encoder"), minilm_tokenizer_dir, hidden_size=48, initializer_range=0.2
    )


@pytest.fixture()
def tiny_bert(encoder_dir: Path) -> LoadedModel:
    adapter = AdapterConfig(
        method="lora", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "key", "value"]
    )  # type: ignore[call-arg]
    return no_dropout(build_model(ModelConfig(name_or_path=str(encoder_dir)), adapter, num_labels=2))
