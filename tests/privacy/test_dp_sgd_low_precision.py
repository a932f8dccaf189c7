"""DP-SGD on a bfloat16 model: every example's clipped gradient stays within max_grad_norm."""

import pytest
import torch
from opacus.optimizers import DPOptimizer

from fedpeft.config import parse_config
from fedpeft.experiment import Experiment
from fedpeft.models import load_adapter_state
from fedpeft.privacy.dp_sgd import train_local_private

MAX_GRAD_NORM = 1e-3  # far below every example's gradient norm: all are clipped


def test_bfloat16_dp_sgd_clips_within_the_bound_and_keeps_the_noise_std(
    tiny_config_data: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tiny_config_data
    data["model"]["dtype"] = "bfloat16"  # peft keeps LoRA in float32; the classifier head is bfloat16
    data["train"] = {"steps": 1, "batch_size": 1, "lr": 1.0, "optimizer": "sgd", "clip_grad_norm": None}
    data["privacy"] = {
        "example": {
            "enabled": True,
            "noise_multiplier": 0.0,
            "max_grad_norm": MAX_GRAD_NORM,
            "grad_sample_mode": "hooks",
        }
    }
    experiment = Experiment(parse_config(data))
    model = experiment.model.model
    assert any(p.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)
    clipped_norms: list[float] = []
    noise_stds: list[float] = []
    clip_and_accumulate = DPOptimizer.clip_and_accumulate

    def observed(optimizer: DPOptimizer) -> None:
        clip_and_accumulate(optimizer)  # Opacus' own clipping; this only reads its result
        # One example per batch: the accumulated sum is that example's clipped gradient.
        clipped_norms.append(sum(float((p.summed_grad.double() ** 2).sum()) for p in optimizer.params) ** 0.5)
        noise_stds.append(optimizer.noise_multiplier * optimizer.max_grad_norm)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", observed)
    partition = experiment.tokenized_partition(0)
    for example in range(40):
        load_adapter_state(model, experiment.initial_state)
        train_local_private(
            model,
            partition,
            experiment.collator,
            "sequence-classification",
            experiment.config.train,
            experiment.config.privacy.example,
            0.7,
            torch.device("cpu"),
            batches=[[example]],
        )
    # Before: up to 1.0032 x max_grad_norm (bfloat16 rounding of the scaled gradient).
    assert len(clipped_norms) == 40 and max(clipped_norms) <= MAX_GRAD_NORM
    assert min(clipped_norms) > 0.97 * MAX_GRAD_NORM
    # The noise Opacus adds stays noise_multiplier x max_grad_norm, what the ledger records.
    assert noise_stds == pytest.approx([0.7 * MAX_GRAD_NORM] * 40, rel=1e-12)
