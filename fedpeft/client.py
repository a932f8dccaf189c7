"""One client's round: load the global adapter, train locally, encode the delta.

Flower-free, so the same function serves the simulation, real SuperNodes and tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedpeft.codecs import CodecContext, CodecMemory, Payload
from fedpeft.config import ExamplePrivacyConfig, TrainConfig
from fedpeft.errors import PrivacyBudgetExhausted
from fedpeft.experiment import Experiment
from fedpeft.models import adapter_state, load_adapter_state, state_delta
from fedpeft.privacy.dp_sgd import sample_rate_of, steps_per_round, train_local_private
from fedpeft.privacy.ledger import DpEvent, PrivacyLedger, epsilon_of
from fedpeft.training import train_local


@dataclass(frozen=True)
class ClientRoundResult:
    """What a client sends back (``payload``) and reports (the rest).

    ``num_examples`` is the size of the client's training set, the FedAvg weight
    (McMahan et al.'s n_k), not the number of examples seen, which under a fixed step
    budget is the same for every client.
    """

    payload: Payload
    num_examples: int
    steps: int
    train_loss: float
    privacy: DpEvent | None = None
    """The DP-SGD event of this round (None without ``privacy.example``)."""
    epsilon: float | None = None
    """The client's example-level epsilon over every round it trained, this one included."""
    drawn_batches: tuple[tuple[int, ...], ...] = ()
    """Partition indices of each DP-SGD batch (Poisson draws from OS randomness): the
    client's own record, never sent. Simulations keep it beside captured updates so
    that attacks on them can be scored (:mod:`fedpeft.attacks.drawn_batches`)."""


def run_client_round(
    experiment: Experiment,
    client_id: int,
    global_state: Mapping[str, Tensor],
    server_round: int,
    memory: CodecMemory | None = None,
    ledger: PrivacyLedger | None = None,
    partition: int | None = None,
) -> ClientRoundResult:
    """Train from ``global_state`` on the client's partition and encode the delta.

    ``memory`` is the client's codec state from earlier rounds and ``ledger`` its DP
    events (both updated in place); None for a client that keeps none. Under
    ``privacy.example`` the ledger is required: it is how epsilon composes over rounds.
    ``partition`` is the index of the client's data in ``experiment.partitions``: its
    ``client_id`` unless a device brings its own data file (then its only partition, 0).

    Raises:
        PrivacyBudgetExhausted: This round would take the client past its target epsilon.

    """
    config = experiment.config
    partition = client_id if partition is None else partition
    model = experiment.model.model
    experiment.prepare_round(server_round)
    train_config = experiment.train_config_for(server_round)
    load_adapter_state(model, global_state)
    # The seed covers dropout; the loader carries its own seeded shuffle.
    torch.manual_seed(config.seed * 1_000_003 + server_round * 1_009 + client_id)
    privacy = config.privacy.example
    event = None
    epsilon = None
    if privacy.enabled:
        if ledger is None:
            raise ValueError("privacy.example needs the client's ledger")
        dataset = experiment.tokenized_partition(partition)
        sigma = experiment.privacy_plan[partition]
        _check_budget(ledger, privacy, client_id, server_round, sigma, train_config, len(dataset))
        result, spent = train_local_private(
            model,
            dataset,
            experiment.collator,
            config.model.task,
            train_config,
            privacy,
            sigma,
            experiment.device,
        )
        event = DpEvent(server_round, str(client_id), "example", sigma, spent.sample_rate, spent.steps)
        ledger.record(event)
        epsilon = ledger.epsilon(privacy.delta, accountant=privacy.accountant)
        num_examples = len(dataset)
    else:
        loader = experiment.client_loader(partition, server_round)
        result = train_local(model, loader, train_config, experiment.device)
        num_examples = len(loader.dataset)  # type: ignore[arg-type]
    delta = state_delta(adapter_state(model), global_state)
    if memory is not None:
        # Codec memory of tensors this round does not train (SLoRA's stage switch) is stale.
        for name in [n for n in memory if n not in delta]:
            del memory[name]
    context = CodecContext(run_seed=config.seed, server_round=server_round, client_id=client_id)
    payload = experiment.codec.encode(delta, context, {} if memory is None else memory)
    return ClientRoundResult(
        payload=payload,
        num_examples=num_examples,
        steps=result.steps,
        train_loss=result.mean_loss,
        privacy=event,
        epsilon=epsilon,
        drawn_batches=result.drawn_batches,
    )


def _check_budget(
    ledger: PrivacyLedger,
    privacy: ExamplePrivacyConfig,
    client_id: int,
    server_round: int,
    sigma: float,
    train_config: TrainConfig,
    num_examples: int,
) -> None:
    """Refuse a round that would take the client past ``target_epsilon``."""
    if privacy.target_epsilon is None:
        return
    planned = DpEvent(
        server_round,
        str(client_id),
        "example",
        sigma,
        sample_rate_of(train_config.batch_size, num_examples),
        steps_per_round(train_config, num_examples),
    )
    after = epsilon_of([*ledger.events, planned], privacy.delta, privacy.accountant)
    if after > privacy.target_epsilon * (1 + 1e-9):
        spent = ledger.epsilon(privacy.delta, accountant=privacy.accountant)
        raise PrivacyBudgetExhausted(
            f"client {client_id}: privacy budget spent (epsilon {spent:.3f} of {privacy.target_epsilon} at "
            f"delta {privacy.delta}); round {server_round} would reach {after:.3f}, so it does not train"
        )
