"""QLoRA: a bitsandbytes-quantised frozen base (NF4, int8) under a full-precision adapter,
on the CPU (bitsandbytes' CPU backend), with and without DP-SGD; gradient checkpointing."""

from pathlib import Path

import pytest
import torch

from fedpeft.config import (
    AdapterConfig,
    ExamplePrivacyConfig,
    InstructionConfig,
    ModelConfig,
    TrainConfig,
    parse_config,
)
from fedpeft.errors import ConfigError, ModelLoadError
from fedpeft.models import adapter_state, build_model
from fedpeft.privacy.dp_sgd import train_local_private
from fedpeft.training import make_collator, make_loader, tokenize, train_local
from tests.conftest import save_tiny_llama
from tests.data.test_instructions import chats

pytest.importorskip("bitsandbytes", reason="scripts/install.sh installs bitsandbytes")

CPU = torch.device("cpu")
ADAPTER = AdapterConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])


def examples(tokenizer, n: int = 32):
    data = chats(*[(f"what comes after {i % 10}?", f"the answer is {(i + 1) % 10}") for i in range(n)])
    return tokenize(data, tokenizer, 32, "causal-lm", InstructionConfig(format="qa"))


def mean_loss(model, encoded, tokenizer) -> float:
    model.eval()
    with torch.no_grad():
        batch = next(iter(make_loader(encoded, tokenizer, "causal-lm", len(encoded), shuffle=False)))
        return float(model(**batch).loss)


@pytest.fixture(scope="module")
def llama_64_dir(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer_dir: Path) -> Path:
    """A tiny Llama 64 wide: bitsandbytes >= 0.50 repacks NF4 weights for its CPU kernel in
    blocks of 64 input features and fails on narrower layers (real models are far wider)."""
    return save_tiny_llama(tmp_path_factory.mktemp("llama-64"), minilm_tokenizer_dir, hidden_size=64)


@pytest.mark.parametrize(("quantization", "layer"), [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_a_quantised_base_trains_its_full_precision_adapter(llama_64_dir: Path, quantization, layer) -> None:
    loaded = build_model(
        ModelConfig(name_or_path=str(llama_64_dir), task="causal-lm", quantization=quantization),
        ADAPTER,
        device=CPU,
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    base_q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(base_q).__name__ == layer and not any(p.requires_grad for p in base_q.parameters())
    state = adapter_state(model)
    assert state and all(t.dtype == torch.float32 for t in state.values())  # what travels
    encoded = examples(tokenizer)
    before = mean_loss(model, encoded, tokenizer)
    loader = make_loader(encoded, tokenizer, "causal-lm", 8, shuffle=True)
    train_local(model, loader, TrainConfig(steps=8, batch_size=8, lr=1e-2), CPU)
    assert mean_loss(model, encoded, tokenizer) < before - 0.5
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == layer


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_sgd_runs_on_an_nf4_base_in_both_grad_sample_modes(tiny_llama_dir: Path, mode) -> None:
    loaded = build_model(
        ModelConfig(name_or_path=str(tiny_llama_dir), task="causal-lm", quantization="nf4"),
        ADAPTER,
        device=CPU,
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    start = adapter_state(model)
    result, private = train_local_private(
        model,
        examples(tokenizer),
        make_collator(tokenizer, "causal-lm"),
        "causal-lm",
        TrainConfig(steps=2, batch_size=8, lr=1e-2),
        ExamplePrivacyConfig(enabled=True, noise_multiplier=1.0, grad_sample_mode=mode),
        noise_multiplier=1.0,
        device=CPU,
    )
    assert result.steps == 2 and private.grad_sample_mode == mode
    moved = adapter_state(model)
    assert any(not torch.equal(moved[k], start[k]) for k in start)
    assert all(torch.isfinite(t).all() for t in moved.values())


def test_a_gguf_base_cannot_be_quantised_again() -> None:
    config = ModelConfig(name_or_path="builtin:SmolLM2-135M-Instruct", task="causal-lm", quantization="nf4")
    with pytest.raises(ModelLoadError, match=r"GGUF file.*save_pretrained"):
        build_model(config, ADAPTER, device=CPU)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir: Path) -> None:
    grads = []
    for checkpointing in (False, True):
        loaded = build_model(ModelConfig(name_or_path=str(tiny_llama_dir), task="causal-lm"), ADAPTER, seed=0)
        model, tokenizer = loaded.model, loaded.tokenizer
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        batch = next(iter(make_loader(examples(tokenizer, 8), tokenizer, "causal-lm", 8, shuffle=False)))
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_is_refused_with_dp_sgd() -> None:
    with pytest.raises(ConfigError, match="gradient_checkpointing is not supported with DP-SGD"):
        parse_config(
            {
                "train": {"gradient_checkpointing": True},
                "privacy": {"example": {"enabled": True, "noise_multiplier": 1.0}},
            }
        )
