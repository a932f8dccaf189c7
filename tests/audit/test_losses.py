"""Per-example losses through real tiny models: a classifier's label loss and a causal
LM's per-token log-perplexity, each checked against the model's own batch loss."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch

from fedpeft.audit.losses import example_losses
from fedpeft.audit.plan import AuditPlan
from fedpeft.config import AdapterConfig, AuditConfig, ModelConfig
from fedpeft.models import build_model

TEXTS = ["my secret code is 1 2 3", "the film was really good", "a dull and tedious story"]


def test_classifier_losses_match_the_model_one_at_a_time(tiny_bert_dir: Path) -> None:
    loaded = build_model(
        ModelConfig(name_or_path=str(tiny_bert_dir)), AdapterConfig(r=4, target_modules=["query"]), 2
    )
    losses = example_losses(
        loaded.model, loaded.tokenizer, "sequence-classification", TEXTS, [1, 0, 1], 32, torch.device("cpu")
    )
    loaded.model.eval()
    for text, label, loss in zip(TEXTS, [1, 0, 1], losses, strict=True):
        batch = loaded.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            expected = loaded.model(**batch, labels=torch.tensor([label])).loss
        assert loss == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="one label per text"):
        example_losses(
            loaded.model, loaded.tokenizer, "sequence-classification", TEXTS, None, 32, torch.device("cpu")
        )


def test_causal_lm_losses_are_per_token_log_perplexity(tiny_llama_dir: Path) -> None:
    loaded = build_model(
        ModelConfig(name_or_path=str(tiny_llama_dir), task="causal-lm"),
        AdapterConfig(r=4, target_modules=["q_proj"]),
    )
    losses = example_losses(loaded.model, loaded.tokenizer, "causal-lm", TEXTS, None, 32, torch.device("cpu"))
    loaded.model.eval()
    for text, loss in zip(TEXTS, losses, strict=True):
        batch = loaded.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            expected = loaded.model(**batch, labels=batch["input_ids"]).loss
        assert loss == pytest.approx(float(expected), rel=1e-4)


def test_plan_without_labels_plants_text_only() -> None:
    train = datasets.Dataset.from_dict({"text": [f"line {i}" for i in range(40)]})
    plan = AuditPlan.build(
        AuditConfig(canaries=4, references=8, membership_examples=10), train, seed=0, num_labels=None
    )
    assert all(c.label is None for c in plan.canaries) and all(e.label is None for e in plan.examples)
    rows = plan.inserted_rows(0)
    assert rows and all(set(r) == {"text"} for r in rows)
