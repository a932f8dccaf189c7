"""The warm worker: a ClientApp handing its messages to a long-lived process on the device."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.config import parse_config
from fedpeft.experiment import Experiment
from fedpeft.flower.client_app import build_client_app
from fedpeft.flower.records import GLOBAL_ADAPTER, ROUND_CONFIG, UPDATE, record_to_state, state_to_record
from fedpeft.flower.warm_worker import WORKER_KEY, WorkerError, serve, warm_worker_mod


@pytest.fixture
def experiment(tiny_config_data: dict) -> Experiment:
    # Top-k keeps its residuals in the client's Flower state: the worker must send it back.
    data = {**tiny_config_data, "federation": {"codec": "topk", "codec_options": {"density": 0.1}}}
    experiment = Experiment(parse_config(data))
    Experiment._cache[experiment.config.fingerprint()] = experiment
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    return experiment


def train_message(experiment: Experiment, server_round: int = 1) -> Message:
    content = RecordDict(
        {
            GLOBAL_ADAPTER: state_to_record(experiment.initial_state),
            ROUND_CONFIG: ConfigRecord({"server-round": server_round, "run-key": uuid.uuid4().hex}),
        }
    )
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def node(socket_path: Path | None) -> Context:
    config: dict = {"partition-id": 1}
    if socket_path is not None:
        config[WORKER_KEY] = str(socket_path)
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})  # type: ignore[arg-type]


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~107 bytes: pytest's tmp_path can be longer.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fedpeft-") as folder:
        yield Path(folder) / "worker.sock"


def start_worker(app: ClientApp, socket_path: Path, handled: int) -> threading.Thread:
    thread = threading.Thread(target=serve, args=(socket_path, app, handled), daemon=True)
    thread.start()
    for _ in range(500):
        if socket_path.exists():
            return thread
        threading.Event().wait(0.01)
    raise AssertionError("the worker never listened")


def update_of(reply: Message) -> dict[str, torch.Tensor]:
    return record_to_state(reply.content.array_records[UPDATE])


def test_a_message_handed_to_the_worker_gets_the_in_process_reply_and_state(
    experiment: Experiment, socket_path: Path
) -> None:
    worker_app = build_client_app(lambda _: experiment.config)
    here = build_client_app(lambda _: experiment.config)(train_message(experiment), direct := node(None))

    calls = []

    def never(msg: Message, context: Context) -> Message:
        calls.append(msg)
        raise AssertionError("the ClientApp process trained: the worker was bypassed")

    forwarding = ClientApp(mods=[warm_worker_mod])
    forwarding.train()(never)
    thread = start_worker(worker_app, socket_path, handled=1)
    context = node(socket_path)
    reply = forwarding(train_message(experiment), context)
    thread.join(timeout=60)

    assert not calls
    assert reply.metadata.message_type == MessageType.TRAIN
    mine, theirs = update_of(reply), update_of(here)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # Top-k's residuals came back into this process's context, as in-process training leaves them.
    assert (
        context.state.array_records
        and context.state.array_records.keys() == direct.state.array_records.keys()
    )
    assert WORKER_KEY in context.node_config  # only the worker's copy is stripped


def test_an_unreachable_worker_means_the_clientapp_trains_itself(
    experiment: Experiment, socket_path: Path
) -> None:
    app = build_client_app(lambda _: experiment.config, mods=[warm_worker_mod])
    reply = app(train_message(experiment), node(socket_path))  # nothing listens there
    assert UPDATE in reply.content.array_records


def test_a_worker_whose_clientapp_fails_fails_the_message(experiment: Experiment, socket_path: Path) -> None:
    broken = ClientApp()

    @broken.train()
    def train(msg: Message, context: Context) -> Message:
        raise ValueError("no data on this device")

    thread = start_worker(broken, socket_path, handled=2)
    forwarding = build_client_app(lambda _: experiment.config, mods=[warm_worker_mod])
    with pytest.raises(WorkerError, match="ValueError: no data on this device"):
        forwarding(train_message(experiment), node(socket_path))
    # The worker survives a failing message and answers the next.
    with pytest.raises(WorkerError):
        forwarding(train_message(experiment), node(socket_path))
    thread.join(timeout=60)
    assert not socket_path.exists()


def test_only_its_user_can_reach_the_worker(experiment: Experiment, socket_path: Path) -> None:
    # Two requests: the second worker's probe below, then this test's empty connection.
    thread = start_worker(ClientApp(), socket_path, handled=2)
    assert socket_path.stat().st_mode & 0o077 == 0
    with pytest.raises(RuntimeError, match="already listens"):
        serve(socket_path, ClientApp(), handled=1)
    # A connection that sends nothing is dropped, not fatal; then the worker finishes.
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(str(socket_path))
    thread.join(timeout=60)
    assert not thread.is_alive()
