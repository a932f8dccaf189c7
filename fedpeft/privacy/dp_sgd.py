"""Client-side DP-SGD with Opacus on the adapter's trainable tensors.

Per-example clipping to ``max_grad_norm``, Gaussian noise of std ``noise_multiplier x
max_grad_norm`` on the summed clipped gradients, Poisson-sampled batches of expected
size ``train.batch_size`` (the sampling the accountant's amplification assumes). Only
trainable tensors get per-example gradients: the frozen base costs nothing extra.

Two per-example gradient modes (Opacus ``grad_sample_mode``):

* ``hooks`` materialises every example's gradient of every trainable tensor.
* ``ghost`` (ghost clipping, Li et al. 2022; Bu et al. 2023) computes per-example
  gradient *norms* from activations and backprops without the gradients, then takes
  a second backward pass on the clipping-weighted loss.

``auto`` (see :func:`resolve_grad_sample_mode`) takes ``hooks`` for adapters, whose
per-example gradients are small, and ``ghost`` once they would be large.

Logical batches larger than memory (``privacy.example.max_physical_batch_size``): a
Poisson batch is split into physical batches by Opacus' ``BatchSplittingSampler`` (the
sampler inside its ``BatchMemoryManager``), which tells the optimiser to only clip and
sum until the last one; the noise, the division by the expected batch and the
optimiser step happen once per Poisson batch. DP training wants large batches (noise
per coordinate falls as 1/batch): with this a client can use thousands. The batch is
sorted by length before it is split, so that each physical batch pads to its own
longest example rather than the batch's: which example goes into which pass changes
nothing but the padding (the clipped sum is the same), and on short texts it is about
3x faster (SST-2: 13 tokens on average, 62 at most).

The Opacus + peft trap ("No activations detected for Linear" at the first backward,
in both modes): ``from_pretrained`` returns the model in eval mode and
``get_peft_model`` wraps it in a ``PeftModel`` whose own flag says training while every
module inside (including the ``ModulesToSaveWrapper`` copy of the classifier, the
last layer and so the first backward hook to fire) is still in eval mode. Opacus only
records activations of modules in training mode, but its backward hooks still fire.
The fix is to put the whole tree in training mode before wrapping, which
:func:`train_local_private` does and then checks.

Randomness the server must not know (the noise and the Poisson draws) comes from a
generator seeded by the operating system, never from the run seed, which the server
knows: a seeded noise stream could be regenerated and subtracted.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import datasets
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.batch_memory_manager import BatchSplittingSampler
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import Tensor, nn
from transformers import get_scheduler

from fedpeft.config import ExamplePrivacyConfig, Task, TrainConfig
from fedpeft.training import TrainResult, make_optimizer, parameter_groups


@dataclass(frozen=True)
class PrivateRound:
    """What one client's DP-SGD round spent: the ledger event's parameters."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    grad_sample_mode: str


def sample_rate_of(batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate giving an expected batch of ``batch_size`` (capped at 1)."""
    return min(1.0, batch_size / num_examples)


def steps_per_round(config: TrainConfig, num_examples: int) -> int:
    """Optimiser steps of one round: ``train.steps``, or ``epochs / q`` Poisson batches."""
    if config.steps:
        return config.steps
    return config.epochs * math.ceil(1 / sample_rate_of(config.batch_size, num_examples))


def trainable_leaf_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that directly own a trainable parameter (where Opacus puts hooks)."""
    return [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


PER_EXAMPLE_GRADIENT_BUDGET = 2**30
"""Bytes of per-example gradients above which ``auto`` prefers ghost clipping."""


def resolve_grad_sample_mode(
    model: nn.Module, requested: str, batch_size: int, budget_bytes: int = PER_EXAMPLE_GRADIENT_BUDGET
) -> str:
    """Which Opacus mode to use: ``auto`` resolves by size and module kinds.

    ``hooks`` while a batch's per-example gradients fit ``budget_bytes``, else ``ghost``
    if every trainable module can be ghost-clipped.

    Adapters are small: B x (LoRA parameters) per-example gradients cost little, and
    ghost clipping's second backward pass costs more than it saves (benchmarks/dp.py
    measures both). Ghost clipping wins when per-example gradients would be large,
    e.g. full-layer training (``modules_to_save``) of a big model.
    """
    if requested != "auto":
        return requested
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if batch_size * trainable <= budget_bytes:
        return "hooks"
    supported = tuple(GradSampleModuleFastGradientClipping.NORM_SAMPLERS)
    leaves = trainable_leaf_modules(model)
    return "ghost" if leaves and all(type(m) in supported for m in leaves) else "hooks"


def per_example_loss(logits: Tensor, labels: Tensor, task: Task) -> Tensor:
    """One loss per example: cross-entropy, or mean next-token cross-entropy per sequence."""
    if task == "sequence-classification":
        return F.cross_entropy(logits.float(), labels, reduction="none")
    targets = labels[:, 1:]
    token_losses = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, reduction="none", ignore_index=-100
    )
    valid = (targets != -100).sum(dim=1).clamp(min=1)
    return token_losses.sum(dim=1) / valid


def poisson_batches(num_examples: int, sample_rate: float, steps: int) -> Iterator[list[int]]:
    """``steps`` Poisson draws of example indices (possibly empty) from OS randomness."""
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    sampler = UniformWithReplacementSampler(
        num_samples=num_examples, sample_rate=sample_rate, generator=generator, steps=steps
    )
    for indices in sampler:
        yield [int(i) for i in indices]


def check_training_mode(model: nn.Module) -> None:
    """Fail clearly if a module with trainable tensors is in eval mode (see module docs)."""
    stale = [type(m).__name__ for m in trainable_leaf_modules(model) if not m.training]
    if stale:
        raise RuntimeError(
            f"{len(stale)} trainable module(s) in eval mode (e.g. {stale[0]}): Opacus would record no "
            "activations for them; call model.train() on the whole model first"
        )


def clipping_margin(params: Iterable[Tensor]) -> float:
    """The factor (<= 1) on ``max_grad_norm`` that keeps Opacus' clipping within it.

    Opacus computes each example's norm, scales its gradient and rounds the result in
    the parameters' dtype: each step can be off by half an ulp, so a clipped example
    may exceed the norm by about one ``eps`` of the narrowest dtype (bfloat16: 2^-7,
    float32: 1.2e-7). Clipping to ``(1 - 2 eps)`` of it covers both roundings.
    """
    return 1.0 - 2 * max((torch.finfo(p.dtype).eps for p in params), default=0.0)


def train_local_private(
    model: nn.Module,
    dataset: datasets.Dataset,
    collate: Callable[[list[dict]], dict[str, Tensor]],
    task: Task,
    config: TrainConfig,
    privacy: ExamplePrivacyConfig,
    noise_multiplier: float,
    device: torch.device,
    batches: Iterable[list[int]] | None = None,
) -> tuple[TrainResult, PrivateRound]:
    """DP-SGD (or DP-AdamW, per ``train.optimizer``) on the trainable tensors of ``model``, in place.

    Args:
        model: The peft model; its trainable tensors are trained.
        dataset: The client's tokenized examples.
        collate: Pads a list of examples into a batch.
        task: Decides the per-example loss.
        config: Local training (``lr``, ``batch_size`` = expected batch, ``steps``/``epochs``).
        privacy: Clipping norm, mode and the physical batch bound.
        noise_multiplier: Sigma for this client (fixed or calibrated to its target).
        device: Where to train.
        batches: Index batches to use instead of Poisson sampling (tests only: the
            privacy accounting assumes Poisson sampling).

    """
    num_examples = len(dataset)
    sample_rate = sample_rate_of(config.batch_size, num_examples)
    steps = steps_per_round(config, num_examples)
    model.to(device)
    model.train()
    check_training_mode(model)
    physical = privacy.max_physical_batch_size
    mode = resolve_grad_sample_mode(
        model, privacy.grad_sample_mode, min(config.batch_size, physical or config.batch_size)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    # Opacus clips and sums in the parameters' dtype; with bfloat16 ones (a peft head
    # of a bfloat16 model) a clipped example overshot max_grad_norm by up to 0.3 %.
    # Clipping to a slightly smaller norm keeps the sensitivity within max_grad_norm,
    # and the noise multiplier given to Opacus grows to match: the noise std stays
    # noise_multiplier x max_grad_norm, what the ledger records.
    margin = clipping_margin(params)
    clip_norm = privacy.max_grad_norm * margin
    opacus_noise = noise_multiplier / margin
    noise_generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    base_optimizer = make_optimizer(parameter_groups(model, config), config)
    private_model: GradSampleModule
    optimizer: DPOptimizer
    if mode == "ghost":
        private_model = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=clip_norm
        )
        optimizer = DPOptimizerFastGradientClipping(
            base_optimizer,
            noise_multiplier=opacus_noise,
            max_grad_norm=clip_norm,
            expected_batch_size=config.batch_size,
            loss_reduction="mean",
            generator=noise_generator,
        )
    elif mode == "hooks":
        private_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = DPOptimizer(
            base_optimizer,
            noise_multiplier=opacus_noise,
            max_grad_norm=clip_norm,
            expected_batch_size=config.batch_size,
            loss_reduction="mean",
            generator=noise_generator,
        )
    else:
        raise ValueError(f"unknown grad_sample_mode {mode!r}")
    scheduler = get_scheduler(
        config.lr_schedule,
        optimizer=optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=steps,
    )
    index_batches = poisson_batches(num_examples, sample_rate, steps) if batches is None else batches
    loss_sum, loss_count, done, seen = 0.0, 0, 0, 0
    drawn: list[tuple[int, ...]] = []
    with warnings.catch_warnings():
        # Opacus' hooks on a first layer whose input needs no grad, and a noise-only
        # step that bypasses the wrapped optimizer's step(), each warn harmlessly.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        try:
            for indices in index_batches:
                drawn.append(tuple(indices))
                optimizer.zero_grad(set_to_none=True)
                if not indices:
                    _noise_only_step(optimizer, params)
                examples = {i: dataset[i] for i in indices}  # each read once, for lengths and batches
                lengths = {i: len(example["input_ids"]) for i, example in examples.items()}
                for chunk in physical_batches(indices, physical, optimizer, lengths):
                    optimizer.zero_grad(set_to_none=True)  # keeps the sum of a skipped step
                    batch = {k: v.to(device) for k, v in collate([examples[i] for i in chunk]).items()}
                    labels = batch.pop("labels")
                    losses = per_example_loss(private_model(**batch).logits, labels, task)
                    if mode == "ghost":
                        loss = DPTensorFastGradientClipping(private_model, optimizer, losses, "mean")  # type: ignore[arg-type]
                        loss.backward()
                    else:
                        losses.mean().backward()
                    optimizer.step()  # clips and sums; noise and the step after the last chunk only
                    loss_sum += float(losses.detach().sum())
                    loss_count += len(chunk)
                    seen += len(chunk)
                scheduler.step()
                done += 1
        finally:
            optimizer.zero_grad(set_to_none=True)
            private_model.cleanup()  # removes Opacus' hooks: the cached model is reused next round
    result = TrainResult(
        examples_seen=seen, steps=done, mean_loss=loss_sum / max(loss_count, 1), drawn_batches=tuple(drawn)
    )
    return result, PrivateRound(noise_multiplier, sample_rate, done, mode)


def physical_batches(
    indices: list[int], max_size: int | None, optimizer: DPOptimizer, lengths: Mapping[int, int] | None = None
) -> Iterator[list[int]]:
    """One Poisson batch as physical batches of at most ``max_size`` (None: one).

    Sorted by ``lengths`` first (when given), so that similar lengths share a pass.
    Opacus' ``BatchSplittingSampler`` does the split and signals ``optimizer`` to skip
    the noise and the step for every chunk but the last. An empty batch yields nothing
    (its noise-only step is the caller's).
    """
    if not indices:
        return iter(())
    if max_size is None or len(indices) <= max_size:
        return iter((indices,))
    if lengths is not None:
        indices = sorted(indices, key=lengths.__getitem__)
    return iter(BatchSplittingSampler(sampler=[indices], max_batch_size=max_size, optimizer=optimizer))  # type: ignore[arg-type]


def _noise_only_step(optimizer: DPOptimizer, params: list[nn.Parameter]) -> None:
    """An empty Poisson batch: the clipped sum is zero but the noise is still added."""
    for p in params:
        p.summed_grad = torch.zeros_like(p)  # type: ignore[attr-defined]
    optimizer.add_noise()
    for p in params:  # scale_grad() would look for per-example gradients there are none of
        p.grad /= optimizer.expected_batch_size  # type: ignore[operator]
    optimizer.original_optimizer.step()
