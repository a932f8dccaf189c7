"""One client's round: load the global adapter, train locally, encode the delta.

Flower-free, so the same function serves the simulation, real SuperNodes and tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedpeft.codecs import CodecContext, CodecMemory, Payload
from fedpeft.experiment import Experiment
from fedpeft.models import adapter_state, load_adapter_state, state_delta
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


def run_client_round(
    experiment: Experiment,
    client_id: int,
    global_state: Mapping[str, Tensor],
    server_round: int,
    memory: CodecMemory | None = None,
) -> ClientRoundResult:
    """Train from ``global_state`` on the client's partition and encode the delta.

    ``memory`` is the client's codec state from earlier rounds (updated in place);
    None for a client that keeps none.
    """
    config = experiment.config
    model = experiment.model.model
    load_adapter_state(model, global_state)
    # The seed covers dropout; the loader carries its own seeded shuffle.
    torch.manual_seed(config.seed * 1_000_003 + server_round * 1_009 + client_id)
    loader = experiment.client_loader(client_id, server_round)
    result = train_local(model, loader, config.train, experiment.device)
    num_examples = len(loader.dataset)  # type: ignore[arg-type]
    delta = state_delta(adapter_state(model), global_state)
    context = CodecContext(run_seed=config.seed, server_round=server_round, client_id=client_id)
    payload = experiment.codec.encode(delta, context, {} if memory is None else memory)
    return ClientRoundResult(
        payload=payload,
        num_examples=num_examples,
        steps=result.steps,
        train_loss=result.mean_loss,
    )
