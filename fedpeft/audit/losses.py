"""Per-example losses of a model on given texts: what every audit score is made of."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedpeft.config import Task
from fedpeft.data.loading import LABEL, TEXT
from fedpeft.privacy.dp_sgd import per_example_loss
from fedpeft.training import make_loader, tokenize


@torch.no_grad()
def example_losses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    texts: Sequence[str],
    labels: Sequence[int | None] | None,
    max_length: int,
    device: torch.device,
    batch_size: int = 64,
) -> list[float]:
    """The loss of each (text, label) under ``model``.

    Cross-entropy of the label for a classifier; the mean next-token cross-entropy
    (log-perplexity per token) for a causal LM.

    Args:
        model: The (peft) model, already holding the adapter to score.
        tokenizer: Its tokenizer.
        task: Decides the loss.
        texts: One text per example.
        labels: One class per example (classification); None for causal LMs.
        max_length: Tokens per example, as in training.
        device: Where to run.
        batch_size: Examples per forward pass.

    Raises:
        ValueError: A classifier without labels, or label and text counts differ.

    """
    if not texts:
        return []
    columns: dict[str, list] = {TEXT: list(texts)}
    if task == "sequence-classification":
        if labels is None or len(labels) != len(texts) or any(label is None for label in labels):
            raise ValueError("a classifier's losses need one label per text")
        columns[LABEL] = [int(label) for label in labels]  # type: ignore[arg-type]
    encoded = tokenize(datasets.Dataset.from_dict(columns), tokenizer, max_length, task)
    loader = make_loader(encoded, tokenizer, task, batch_size, shuffle=False)
    was_training = model.training
    model.to(device)
    model.eval()
    losses: list[float] = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        targets = batch.pop("labels")
        losses.extend(float(x) for x in per_example_loss(model(**batch).logits, targets, task))
    model.train(was_training)
    return losses
