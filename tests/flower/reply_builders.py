"""Client replies built by hand, as a device could send them: no model, no ClientApp."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedpeft.aggregation import AGGREGATORS
from fedpeft.codecs import CODECS
from fedpeft.config import FederationConfig
from fedpeft.flower.records import TRAIN_METRICS, UPDATE, state_to_record
from fedpeft.flower.strategy import AdapterStrategy

GLOBAL = {
    "layer.lora_A.default.weight": torch.linspace(-1, 1, 8).reshape(2, 4),
    "layer.lora_B.default.weight": torch.linspace(0.5, -0.5, 8).reshape(4, 2),
}
"""A tiny global adapter: two LoRA factors."""
GLOBAL_RECORD = state_to_record(GLOBAL)


@pytest.fixture(autouse=True)
def server_identity() -> None:
    """Messages are created inside a Flower task; outside a runtime, declare one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0


class NodeGrid:
    """The part of Flower's Grid that node sampling reads: nodes 1..count."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.count + 1))


def make_strategy(
    codec: str = "dense",
    aggregator: str = "fedavg",
    codec_options: dict | None = None,
    aggregator_options: dict | None = None,
    partition_sizes: list[int] | None = None,
    bind_client_ids: bool = False,
    **federation: object,
) -> AdapterStrategy:
    """A strategy over :data:`GLOBAL` whose round 1 has been configured (3 nodes)."""
    settings = {"min_train_clients": 1, "min_available_clients": 1, "max_payload_bytes": 2**20, **federation}
    optional = {"partition_sizes": partition_sizes, "bind_client_ids": bind_client_ids}
    strategy = AdapterStrategy(
        FederationConfig(**settings),
        CODECS.build(codec, codec_options or {}, "federation.codec_options"),
        AGGREGATORS.build(aggregator, aggregator_options or {}, "federation.aggregator_options"),
        run_seed=0,
        **{k: v for k, v in optional.items() if v},  # type: ignore[arg-type]
    )
    start_round(strategy, 1)
    return strategy


def start_round(strategy: AdapterStrategy, server_round: int, nodes: int = 3) -> None:
    """Send round ``server_round``'s messages to ``nodes`` nodes (to nowhere), as the round loop does."""
    strategy.configure_train(server_round, GLOBAL_RECORD, ConfigRecord(), NodeGrid(nodes))


def to_node(node_id: int) -> Message:
    """The TRAIN message a reply answers (it sets the reply's source node)."""
    return Message(content=RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)


def metrics(client_id: object = 0, num_examples: object = 10, **extra: object) -> dict:
    """What an honest client sends in its train-metrics record (``train_loss=`` sets "train-loss")."""
    values = {"client-id": client_id, "num-examples": num_examples, "train-loss": 0.5, "steps": 3}
    return {**values, "train-seconds": 1.0, **{k.replace("_", "-"): v for k, v in extra.items()}}


def update_reply(node_id: int, delta: dict, **metric_values: object) -> Message:
    """A reply with ``delta`` as a dense payload and :func:`metrics` (``None`` drops a key)."""
    values = {k: v for k, v in metrics(**metric_values).items() if v is not None}
    content = RecordDict({UPDATE: state_to_record(delta), TRAIN_METRICS: MetricRecord(values)})
    return Message(content, reply_to=to_node(node_id))


def record_reply(node_id: int, update: ArrayRecord, values: dict) -> Message:
    """A reply of exactly this update record and these metric values."""
    return Message(
        RecordDict({UPDATE: update, TRAIN_METRICS: MetricRecord(values)}), reply_to=to_node(node_id)
    )


def error_reply(node_id: int, reason: str, code: int = 0) -> Message:
    """A reply saying the client failed."""
    return Message(Error(code=code, reason=reason), reply_to=to_node(node_id))


def honest_delta(client_id: int) -> dict[str, torch.Tensor]:
    """A small delta, different per client."""
    generator = torch.Generator().manual_seed(client_id)
    return {name: 0.01 * torch.randn(t.shape, generator=generator) for name, t in GLOBAL.items()}


def honest_replies(count: int = 3) -> list[Message]:
    """``count`` good replies from nodes 1..count, clients 0..count-1."""
    return [update_reply(1 + i, honest_delta(i), client_id=i) for i in range(count)]
