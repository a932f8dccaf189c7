"""The local training loop and evaluation, shared by clients, the server and baselines.

DP-SGD has its own loop (``fedpeft.privacy.dp_sgd``): Poisson batches and per-example
clipping do not fit this one without making it harder to read.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    get_scheduler,
)

from fedpeft.config import InstructionConfig, Task, TrainConfig
from fedpeft.data.chat_tokens import IGNORE_INDEX, tokenize_chats
from fedpeft.data.instructions import MESSAGES
from fedpeft.data.loading import LABEL, TEXT


@dataclass(frozen=True)
class TrainResult:
    """What one local training run did."""

    examples_seen: int
    steps: int
    mean_loss: float
    drawn_batches: tuple[tuple[int, ...], ...] = ()
    """Example indices of each step's batch when the loop drew them itself (DP-SGD's
    Poisson draws, which nothing can replay); empty for seeded loaders."""


@dataclass(frozen=True)
class EvalResult:
    """Mean loss and accuracy (class accuracy, or next-token accuracy for causal LMs)."""

    loss: float
    accuracy: float
    num_examples: int


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def tokenize(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    task: Task,
    instruction: InstructionConfig | None = None,
) -> datasets.Dataset:
    """Token ids (unpadded; batches are padded dynamically) plus labels for classification.

    Chats (instruction data, with ``instruction`` given) get labels too: -100 on the
    prompt, so that the loss is the response's (:mod:`fedpeft.data.chat_tokens`).
    """
    if MESSAGES in dataset.column_names and instruction is not None and instruction.enabled:
        return tokenize_chats(dataset, tokenizer, max_length, instruction)[0]

    # The tokenizer is called on the column directly and each chunk's output stored as a
    # Dataset, not through ``Dataset.map``: map fingerprints its function by pickling
    # it, tokenizer included (MiniLM's: 115 ms against 9 ms for the whole call made
    # directly, on a 20-sentence partition), and prints a progress bar per call. Every
    # simulated client tokenizes its partition once per process. Chunks bound the
    # Python lists alive at once for a large split.
    if len(dataset) == 0:  # fast tokenizers reject an empty batch
        empty: dict[str, list] = {"input_ids": [], "attention_mask": []}
        if task == "sequence-classification":
            empty["labels"] = []
        return datasets.Dataset.from_dict(empty)
    chunks = []
    for start in range(0, len(dataset), TOKENIZE_CHUNK):
        rows = dataset[start : start + TOKENIZE_CHUNK]
        columns = dict(tokenizer(rows[TEXT], truncation=True, max_length=max_length))
        if task == "sequence-classification":
            columns["labels"] = rows[LABEL]
        chunks.append(datasets.Dataset.from_dict(columns))
    return chunks[0] if len(chunks) == 1 else datasets.concatenate_datasets(chunks)


TOKENIZE_CHUNK = 10_000
"""Rows tokenized per call: the Python lists of one chunk are alive at a time."""


def make_collator(tokenizer: PreTrainedTokenizerBase, task: Task) -> Callable[[list[dict]], dict]:
    """Pads a list of tokenized examples into a batch (LM labels: padding set to -100)."""
    if task == "sequence-classification":
        return DataCollatorWithPadding(tokenizer)
    return CausalLMCollator(tokenizer)


class CausalLMCollator:
    """Pads causal-LM examples; labels that examples bring are kept.

    Instruction data comes with labels (-100 on the prompt): they are padded with -100
    (transformers' ``DataCollatorForSeq2Seq``). Plain text has none: every non-padding
    token becomes a target (``DataCollatorForLanguageModeling``).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._given_labels = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
        self._text = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def __call__(self, features: list[dict]) -> dict:
        """One padded batch of tensors."""
        if features and "labels" in features[0]:
            return dict(self._given_labels(features))
        return dict(self._text(features))


def make_loader(
    encoded: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    group_by_length: bool = False,
) -> DataLoader:
    """A DataLoader with dynamic padding (and LM labels with padding masked out).

    ``group_by_length`` (with ``shuffle``): :class:`LengthGroupedBatches` instead of
    uniformly shuffled batches.
    """
    collator = make_collator(tokenizer, task)
    generator = torch.Generator().manual_seed(seed)
    if shuffle and group_by_length:
        lengths = [len(ids) for ids in encoded["input_ids"]]
        return DataLoader(
            encoded,  # type: ignore[arg-type]
            batch_sampler=LengthGroupedBatches(lengths, batch_size, generator),
            collate_fn=collator,
        )
    return DataLoader(
        encoded,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collator,
        generator=generator,
    )


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of examples of similar lengths (``train.group_by_length``).

    Each pass shuffles the examples, sorts each window of ``window`` batches' worth by
    length, cuts it into batches and shuffles the batches: every example once per pass,
    in batches that pad little (transformers' Trainer does the same with windows of
    50). On short texts of mixed lengths most of a uniformly shuffled batch is padding
    to its longest example: on the cross-silo federation's SST-2 phrases, batches of 50
    held 3.2 tokens per real one uniformly shuffled and 1.07 grouped (the first 10
    batches of 5 clients over 3 rounds). The price: a batch's examples are no longer
    independent of each other's lengths.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, generator: torch.Generator, window: int = 50
    ) -> None:
        self.lengths, self.batch_size, self.generator = lengths, batch_size, generator
        self.span = batch_size * window

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches = []
        for start in range(0, len(order), self.span):
            window = sorted(order[start : start + self.span], key=self.lengths.__getitem__)
            batches += [window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        for index in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[index]


def make_eval_loader(
    encoded: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, task: Task, batch_size: int
) -> DataLoader:
    """Batches of similar lengths, shortest first, for :func:`evaluate`.

    Evaluation sums over examples, so their order is free; batching by length pads far
    less than the split's order (SST-2's test set: half the time on MiniLM), which
    matters because the server evaluates every round.
    """
    lengths = [len(ids) for ids in encoded["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return DataLoader(
        encoded,  # type: ignore[arg-type]
        batch_sampler=batches,
        collate_fn=make_collator(tokenizer, task),
    )


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def local_batches(loader: DataLoader, epochs: int, steps: int, accumulation: int) -> Iterator[dict]:
    """Micro-batches for ``epochs`` passes, or cycling until ``steps`` optimiser steps."""
    if epochs > 0:
        for _ in range(epochs):
            yield from loader
        return
    needed = steps * accumulation
    while needed > 0:
        for batch in loader:
            yield batch
            needed -= 1
            if needed == 0:
                return


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The trainable tensors of ``model``: the adapter's, then a new head's (``train.head_lr``)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    head = [p for name, p in trainable if ".modules_to_save." in name]
    if config.head_lr is None or not head:
        return [{"params": [p for _, p in trainable]}]
    adapter = [p for name, p in trainable if ".modules_to_save." not in name]
    return [g for g in ({"params": adapter}, {"params": head, "lr": config.head_lr}) if g["params"]]


def make_optimizer(
    params: list[nn.Parameter] | list[dict[str, Any]], config: TrainConfig
) -> torch.optim.Optimizer:
    """AdamW (the default) or SGD (with ``train.momentum``) over ``params``, fresh each round.

    ``params``: tensors, or groups (see :func:`parameter_groups`) whose ``lr`` overrides ``train.lr``.
    """
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def train_local(
    model: nn.Module,
    loader: DataLoader,
    config: TrainConfig,
    device: torch.device,
) -> TrainResult:
    """Train the trainable parameters of ``model`` in place (``train.optimizer``).

    The optimiser is new each call: clients are stateless between rounds in FedAvg,
    and carrying Adam moments across rounds would leak the previous global model's
    curvature into a client that was not sampled.
    """
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(parameter_groups(model, config), config)
    micro_batches = len(loader) * config.epochs if config.epochs else config.steps * config.grad_accumulation
    total_steps = max(1, math.ceil(micro_batches / config.grad_accumulation))
    scheduler = get_scheduler(
        config.lr_schedule,
        optimizer=optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=total_steps,
    )
    loss_sum, loss_count, steps, examples = 0.0, 0, 0, 0
    optimizer.zero_grad(set_to_none=True)
    pending = 0
    for batch in local_batches(loader, config.epochs, config.steps, config.grad_accumulation):
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(device, config.bf16):
            loss = model(**batch).loss
        (loss / config.grad_accumulation).backward()
        loss_sum += loss.item()
        loss_count += 1
        examples += int(batch["input_ids"].shape[0])
        pending += 1
        if pending == config.grad_accumulation:
            _step(params, optimizer, scheduler, config.clip_grad_norm)
            steps += 1
            pending = 0
    if pending:
        _step(params, optimizer, scheduler, config.clip_grad_norm)
        steps += 1
    return TrainResult(examples_seen=examples, steps=steps, mean_loss=loss_sum / max(loss_count, 1))


def _step(
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    clip_grad_norm: float | None,
) -> None:
    if clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: Task, device: torch.device) -> EvalResult:
    """Mean loss and accuracy over ``loader`` (example-weighted; token-weighted for LMs)."""
    model.to(device)
    model.eval()
    loss_sum, correct, count, examples = 0.0, 0, 0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        output = model(**batch)
        labels = batch["labels"]
        examples += int(labels.shape[0])
        if task == "sequence-classification":
            loss_sum += output.loss.item() * labels.shape[0]
            correct += int((output.logits.argmax(-1) == labels).sum())
            count += int(labels.shape[0])
        else:
            # Next-token accuracy over real (non-padding) targets.
            targets = labels[:, 1:]
            mask = targets != -100
            predictions = output.logits[:, :-1].argmax(-1)
            tokens = int(mask.sum())
            loss_sum += output.loss.item() * tokens
            correct += int(((predictions == targets) & mask).sum())
            count += tokens
    model.train()
    return EvalResult(loss=loss_sum / max(count, 1), accuracy=correct / max(count, 1), num_examples=examples)
