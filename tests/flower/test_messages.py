"""What actually travels: build the real messages and check what is (not) in them."""

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedpeft.config import parse_config
from fedpeft.errors import ConfigError
from fedpeft.experiment import Experiment
from fedpeft.flower.client_app import build_client_app
from fedpeft.flower.records import (
    CODEC_MEMORY,
    GLOBAL_ADAPTER,
    ROUND_CONFIG,
    TRAIN_METRICS,
    UPDATE,
    content_nbytes,
    record_to_state,
    state_to_record,
)


@pytest.fixture(autouse=True)
def server_identity() -> None:
    """Messages are created inside a Flower task; outside a runtime, declare one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0


@pytest.fixture()
def experiment(tiny_config_data: dict) -> Experiment:
    return Experiment(parse_config(tiny_config_data))


def train_message(experiment: Experiment) -> Message:
    content = RecordDict(
        {
            GLOBAL_ADAPTER: state_to_record(experiment.initial_state),
            ROUND_CONFIG: ConfigRecord({"server-round": 1}),
        }
    )
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def run_client(experiment: Experiment, partition_id: int = 0) -> Message:
    app = build_client_app(lambda _: experiment.config)
    Experiment._cache[experiment.config.fingerprint()] = experiment
    context = Context(
        run_id=1, node_id=1, node_config={"partition-id": partition_id}, state=RecordDict(), run_config={}
    )
    return app(train_message(experiment), context)


def base_fingerprints(experiment: Experiment) -> dict[tuple, str]:
    """Pretrained base weights, by (shape, sum). The frozen ``original_module`` of a
    peft-saved head is excluded: it is the new head's random init, not a base weight,
    and its trainable copy legitimately starts equal to it."""
    frozen = {}
    for name, param in experiment.model.model.named_parameters():
        if not param.requires_grad and "original_module" not in name:
            frozen[(tuple(param.shape), round(float(param.detach().double().sum()), 6))] = name
    return frozen


def test_no_base_weight_in_either_direction(experiment: Experiment) -> None:
    reply = run_client(experiment)
    down = record_to_state(train_message(experiment).content.array_records[GLOBAL_ADAPTER])
    up = record_to_state(reply.content.array_records[UPDATE])
    frozen = base_fingerprints(experiment)
    base_names = {n for n, p in experiment.model.model.named_parameters() if not p.requires_grad}
    for tensors in (down, up):
        assert not set(tensors) & base_names
        for name, tensor in tensors.items():
            key = (tuple(tensor.shape), round(float(tensor.double().sum()), 6))
            assert key not in frozen, f"{name} carries base weight {frozen.get(key)}"
            assert "lora_" in name or "modules_to_save" in name


def test_reply_is_a_delta_with_metrics_and_far_smaller_than_the_model(experiment: Experiment) -> None:
    reply = run_client(experiment, partition_id=1)
    assert not reply.has_error()
    metrics = reply.content.metric_records[TRAIN_METRICS]
    assert metrics["client-id"] == 1 and metrics["num-examples"] == 80 and metrics["steps"] == 10
    delta = record_to_state(reply.content.array_records[UPDATE])
    assert any(t.abs().sum() > 0 for t in delta.values())
    model_bytes = sum(p.numel() * p.element_size() for p in experiment.model.model.parameters())
    assert content_nbytes(reply.content) < 0.2 * model_bytes


def test_client_without_partition_id_fails_clearly(experiment: Experiment) -> None:
    app = build_client_app(lambda _: experiment.config)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="partition-id"):
        app(train_message(experiment), context)


def test_error_feedback_memory_persists_in_client_state(tiny_config_data: dict) -> None:
    tiny_config_data["federation"]["codec"] = "topk"
    tiny_config_data["federation"]["codec_options"] = {"density": 0.05}
    experiment = Experiment(parse_config(tiny_config_data))
    Experiment._cache[experiment.config.fingerprint()] = experiment
    app = build_client_app(lambda _: experiment.config)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = app(train_message(experiment), context)
    assert not reply.has_error()
    memory = record_to_state(context.state.array_records[CODEC_MEMORY])
    assert set(memory) == set(experiment.initial_state)
    assert any(t.abs().sum() > 0 for t in memory.values())  # the unsent 95 %
    sent = record_to_state(reply.content.array_records[UPDATE])
    assert all(name.endswith(("/indices", "/values")) for name in sent)


def test_privacy_ledger_persists_in_client_state_and_a_spent_client_declines(tiny_config_data: dict) -> None:
    from fedpeft.aggregation import AGGREGATORS
    from fedpeft.codecs import CODECS
    from fedpeft.flower.records import DECLINED, PRIVACY_LEDGER
    from fedpeft.flower.strategy import AdapterStrategy
    from fedpeft.privacy import PrivacyLedger

    tiny_config_data["train"] = {"steps": 3, "batch_size": 8}
    tiny_config_data["privacy"] = {
        "example": {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 4.0}
    }
    experiment = Experiment(parse_config(tiny_config_data))
    Experiment._cache[experiment.config.fingerprint()] = experiment
    app = build_client_app(lambda _: experiment.config)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    epsilons = []
    for _ in range(30):
        reply = app(train_message(experiment), context)
        assert not reply.has_error()
        if DECLINED in reply.content.config_records:
            break
        epsilons.append(reply.content.metric_records[TRAIN_METRICS]["epsilon"])
        ledger = PrivacyLedger.from_json(str(context.state.config_records[PRIVACY_LEDGER]["events"]))
        assert len(ledger.events) == len(epsilons)
    else:
        raise AssertionError("the client never ran out of budget")
    assert len(epsilons) > 2 and epsilons == sorted(epsilons) and 0 < epsilons[-1] <= 4.0
    assert "privacy budget spent" in str(reply.content.config_records[DECLINED]["reason"])

    # The server logs it as a refusal with the client's reason and aggregates nothing from it.
    strategy = AdapterStrategy(
        experiment.config.federation, CODECS.build("dense", {}, ""), AGGREGATORS.build("fedavg", {}, ""), 0
    )
    strategy.configure_train(
        1,
        state_to_record(experiment.initial_state),
        ConfigRecord(),
        _Grid(experiment.config.partition.num_clients),
    )
    arrays, _ = strategy.aggregate_train(1, [reply])
    assert arrays is None
    assert "client declined to train" in strategy.traffic.rejected[0]["reason"]


class _Grid:
    """The part of Flower's Grid that node sampling reads: ``count`` connected nodes."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.count + 1))
