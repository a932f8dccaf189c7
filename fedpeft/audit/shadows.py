"""Shadow adapters for LiRA, trained centrally on the audit client's data plus random halves.

Paper: Membership Inference Attacks From First Principles (Carlini et al., 2022).

Shadow ``2j`` trains on a random half of the membership examples and shadow ``2j + 1``
on the other half, so every example has IN and OUT shadows as soon as there are two.
Each shadow starts from the run's initial adapter and trains on the first audit
client's own data (without anything the audit inserted) plus its half, with the run's
local optimiser for ``audit.shadow_steps`` steps (default: rounds x ``train.steps``, the
client's whole local budget) and, when the run uses DP-SGD, with DP-SGD at that
client's noise multiplier: a shadow must be trained the way the target was.

Notes:
    A shadow mimics one client's local training over the whole run, not the federation
    (other clients' updates and FedAvg's averaging are not simulated); see
    :mod:`fedpeft.audit.membership` for what that does to the scores.

"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import datasets

from fedpeft.audit.losses import example_losses
from fedpeft.data.loading import LABEL, TEXT
from fedpeft.errors import ConfigError
from fedpeft.experiment import Experiment
from fedpeft.models import load_adapter_state
from fedpeft.privacy.dp_sgd import train_local_private
from fedpeft.training import make_loader, tokenize, train_local


@dataclass(frozen=True)
class ShadowLosses:
    """Every shadow's loss on every membership example.

    Attributes:
        losses: Shape (shadows, examples).
        included: Whether each shadow trained on each example, shape (shadows, examples).
        steps: Local steps each shadow took.

    """

    losses: list[list[float]]
    included: list[list[bool]]
    steps: int


def shadow_halves(count: int, examples: int, seed: int) -> list[list[bool]]:
    """Inclusion masks: pairs of complementary random halves (deterministic under ``seed``)."""
    masks: list[list[bool]] = []
    for pair in range((count + 1) // 2):
        rng = random.Random(f"shadow:{seed}:{pair}")
        chosen = set(rng.sample(range(examples), examples // 2))
        first = [i in chosen for i in range(examples)]
        masks.append(first)
        if len(masks) < count:
            masks.append([not x for x in first])
    return masks


def train_shadows(
    experiment: Experiment, count: int, on_shadow: Callable[[int], None] | None = None
) -> ShadowLosses:
    """Train ``count`` shadows and score each on every membership example.

    Leaves the experiment's model holding the last shadow's adapter: reload what you
    score next.

    Raises:
        ConfigError: The run plants no membership examples.

    """
    config = experiment.config
    plan = experiment.audit_plan
    if plan is None or not plan.examples:
        raise ConfigError("audit.membership_examples: shadow models need membership examples")
    rounds = config.federation.rounds
    steps = config.audit.shadow_steps or rounds * max(config.train.steps, 1)
    train_config = config.train.model_copy(update={"steps": steps, "epochs": 0})
    client = plan.clients[0]
    background = plan.base_partitions(config.partition, config.seed)[client]
    task = config.model.task
    texts = [e.text for e in plan.examples]
    labels = [e.label for e in plan.examples] if task == "sequence-classification" else None
    columns = [TEXT, LABEL] if labels is not None else [TEXT]
    model = experiment.model.model
    tokenizer = experiment.model.tokenizer
    losses, masks = [], shadow_halves(count, len(plan.examples), config.seed)
    for index, mask in enumerate(masks):
        half = [
            {TEXT: e.text, LABEL: e.label} if labels is not None else {TEXT: e.text}
            for e, inside in zip(plan.examples, mask, strict=True)
            if inside
        ]
        rows = background.select_columns(columns)
        if half:
            rows = datasets.concatenate_datasets([rows, datasets.Dataset.from_list(half).cast(rows.features)])
        encoded = tokenize(rows, tokenizer, config.data.max_length, task)
        load_adapter_state(model, experiment.initial_state)
        privacy = config.privacy.example
        if privacy.enabled:
            sigma = experiment.privacy_plan[client]
            train_local_private(
                model, encoded, experiment.collator, task, train_config, privacy, sigma, experiment.device
            )
        else:
            loader = make_loader(
                encoded, tokenizer, task, train_config.batch_size, shuffle=True, seed=config.seed + index
            )
            train_local(model, loader, train_config, experiment.device)
        losses.append(
            example_losses(
                model,
                tokenizer,
                task,
                texts,
                labels,
                config.data.max_length,
                experiment.device,
                config.train.eval_batch_size,
            )
        )
        if on_shadow is not None:
            on_shadow(index)
    return ShadowLosses(losses=losses, included=masks, steps=steps)
