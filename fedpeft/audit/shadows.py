"""Shadow adapters for LiRA: the federation trained again with a random half of the examples.

Paper: Membership Inference Attacks From First Principles (Carlini et al., 2022).

Shadow ``2j`` is trained with a random half of the membership examples and shadow
``2j + 1`` with the other half, so every example has IN and OUT shadows as soon as
there are two. A shadow must be trained the way the target was, so by default
(``audit.shadow_training = "federated"``) each one reruns the federation in this
process: the same rounds, clients, local training (DP-SGD at each client's calibrated
noise where the run uses it), codec, aggregator and server-side DP, from the run's
initial adapter, with the shadow's half planted in the audit clients' data where the
target had its own. Only Flower's transport is left out, and the clients each round
are drawn afresh (seeded per shadow): the target's draw is not known here, and a shadow
should vary over it anyway.

A run under secure aggregation (``federation.secure_aggregation``, the audit's
``secagg`` variants) has its shadows federated without the protocol: SecAgg+ needs
Flower's message exchange between parties, and what it computes is the plain sum of the
round's payloads up to its quantisation grid (``2 R / 2**bits`` per coordinate), so the
final model is the same function of the data up to that rounding. Under user-level DP
the shadow's server adds Gaussian noise of about the variance the clients' Skellam shares
add up to (theirs also covers the rounding, and divides by the clients that took part,
not the expected cohort: the two agree at ``fraction_train = 1``).

``"local"`` is the cheaper imitation: the first audit client's own data (nothing the
audit inserted) plus the whole half, trained by one client for ``audit.shadow_steps``
local steps (default: rounds x ``train.steps``). It sees its half more often than the
federation's average does, so its IN/OUT Gaussians sit further apart than the target's
(see :mod:`fedpeft.audit.membership`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import datasets

from fedpeft.aggregation import ClientUpdate
from fedpeft.audit.losses import example_losses
from fedpeft.client import run_client_round
from fedpeft.codecs import CodecContext, CodecMemory
from fedpeft.data.loading import LABEL, TEXT
from fedpeft.errors import ConfigError
from fedpeft.experiment import Experiment
from fedpeft.models import load_adapter_state
from fedpeft.privacy import PrivacyLedger
from fedpeft.privacy.central import AdaptiveClipping, noisy_mean, poisson_sample
from fedpeft.privacy.dp_sgd import train_local_private
from fedpeft.training import make_loader, tokenize, train_local


@dataclass(frozen=True)
class ShadowLosses:
    """Every shadow's loss on every membership example.

    Attributes:
        losses: Shape (shadows, examples).
        included: Whether each shadow trained on each example, shape (shadows, examples).
        steps: Local steps each shadow took (a federated one: summed over its clients and rounds).
        training: ``audit.shadow_training``: ``"federated"`` or ``"local"``.

    """

    losses: list[list[float]]
    included: list[list[bool]]
    steps: int
    training: str = "local"


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
        ConfigError: The run plants no membership examples, or a federated shadow
            cannot rerun it (SLoRA).

    """
    config = experiment.config
    plan = experiment.audit_plan
    if plan is None or not plan.examples:
        raise ConfigError("audit.membership_examples: shadow models need membership examples")
    training = config.audit.shadow_training
    if training == "federated" and config.slora.rounds:
        raise ConfigError(
            "audit.shadow_training = 'federated' cannot rerun SLoRA's stage switch; "
            "set audit.shadow_training = 'local'"
        )
    task = config.model.task
    texts = [e.text for e in plan.examples]
    labels = [e.label for e in plan.examples] if task == "sequence-classification" else None
    losses, masks, steps = [], shadow_halves(count, len(plan.examples), config.seed), 0
    for index, mask in enumerate(masks):
        if training == "federated":
            steps = federate_shadow(experiment.with_audit_plan(plan.with_membership(mask)), index)
        else:
            steps = train_local_shadow(experiment, mask, index)
        losses.append(
            example_losses(
                experiment.model.model,
                experiment.model.tokenizer,
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
    return ShadowLosses(losses=losses, included=masks, steps=steps, training=training)


def federate_shadow(experiment: Experiment, shadow: int) -> int:
    """Rerun ``experiment``'s federation in this process; the local steps its clients took.

    Every sampled client runs the real client round (:func:`fedpeft.client.run_client_round`:
    local training or DP-SGD, then the codec's encoding, with its codec memory and DP
    ledger kept across rounds); the server decodes, applies user-level DP when
    configured, and aggregates, as the strategy does. A round in which a malicious
    server crafts what it sends leaves the global adapter as it was, as in the run.
    Secure aggregation, where configured, is left out (see the module's docstring).
    Leaves the model holding the final global adapter.
    """
    config = experiment.config
    federation = config.federation
    clients = len(experiment.partitions)
    global_state = dict(experiment.initial_state)
    aggregator = experiment.new_aggregator()
    memories: dict[int, CodecMemory] = {c: {} for c in range(clients)}
    ledgers = {c: PrivacyLedger() for c in range(clients)}
    central = config.privacy.client if config.privacy.client.enabled else None
    adaptive = (
        AdaptiveClipping.of(central, federation.fraction_train * clients)
        if central is not None and central.adaptive_clipping
        else None
    )
    crafted = set(config.capture.rounds) if config.capture.malicious else set()
    rng = random.Random(f"shadow-federation:{config.seed}:{shadow}")
    steps = 0
    for server_round in range(1, federation.rounds + 1):
        if central is not None:  # Poisson at q, as the strategy samples under user-level DP
            sampled = poisson_sample(range(clients), federation.fraction_train, rng)
        else:
            sampled = sorted(rng.sample(range(clients), federation.clients_per_round(clients)))
        if server_round in crafted:
            continue
        updates = []
        for client_id in sampled:
            result = run_client_round(
                experiment, client_id, global_state, server_round, memories[client_id], ledgers[client_id]
            )
            context = CodecContext(run_seed=config.seed, server_round=server_round, client_id=client_id)
            delta = experiment.codec.decode(result.payload, context, global_state)
            updates.append(ClientUpdate(client_id, delta, result.num_examples))
            steps += result.steps
        if central is not None:
            noised, _ = noisy_mean(
                updates, federation.fraction_train * clients, central, like=global_state, adaptive=adaptive
            )
            updates = [noised]
        global_state = aggregator.aggregate(global_state, updates).state
    load_adapter_state(experiment.model.model, global_state)
    return steps


def train_local_shadow(experiment: Experiment, included: list[bool], shadow: int) -> int:
    """Train one shadow as the first audit client alone, with ``included`` examples added; its steps."""
    config = experiment.config
    plan = experiment.audit_plan
    assert plan is not None
    steps = config.audit.shadow_steps or config.federation.rounds * max(config.train.steps, 1)
    train_config = config.train.model_copy(update={"steps": steps, "epochs": 0})
    client = plan.clients[0]
    background = plan.base_partitions(config.partition, config.seed)[client]
    labelled = config.model.task == "sequence-classification"
    columns = [TEXT, LABEL] if labelled else [TEXT]
    half = [
        {TEXT: e.text, LABEL: e.label} if labelled else {TEXT: e.text}
        for e, inside in zip(plan.examples, included, strict=True)
        if inside
    ]
    rows = background.select_columns(columns)
    if half:
        rows = datasets.concatenate_datasets([rows, datasets.Dataset.from_list(half).cast(rows.features)])
    tokenizer = experiment.model.tokenizer
    encoded = tokenize(rows, tokenizer, config.data.max_length, config.model.task)
    model = experiment.model.model
    load_adapter_state(model, experiment.initial_state)
    privacy = config.privacy.example
    if privacy.enabled:
        sigma = experiment.privacy_plan[client]
        train_local_private(
            model,
            encoded,
            experiment.collator,
            config.model.task,
            train_config,
            privacy,
            sigma,
            experiment.device,
        )
    else:
        loader = make_loader(
            encoded,
            tokenizer,
            config.model.task,
            train_config.batch_size,
            shuffle=True,
            seed=config.seed + shadow,
        )
        train_local(model, loader, train_config, experiment.device)
    return steps
