"""The warm worker: one long-lived process running a SuperNode's ClientApp tasks.

Flower's runtime API is replaced by a fake that records what the worker pushes; the
real protocol runs in tests/flower/test_deployment_e2e.py (node1 has a warm worker)."""

from __future__ import annotations

import io
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskResponse
from flwr.proto.task_pb2 import Task
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.config import parse_config
from fedpeft.experiment import Experiment
from fedpeft.flower import warm_worker
from fedpeft.flower.client_app import build_client_app
from fedpeft.flower.records import GLOBAL_ADAPTER, ROUND_CONFIG, UPDATE, record_to_state, state_to_record
from fedpeft.flower.warm_worker import CLIENTAPP_REFERENCE, BundleMismatch, _check_bundle, serve


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


def fab(clientapp: str = CLIENTAPP_REFERENCE) -> Fab:
    """An app bundle as ``flwr build`` makes it: a zip with the project's pyproject.toml."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("pyproject.toml", f'[tool.flwr.app.components]\nclientapp = "{clientapp}"\n')
    content = buffer.getvalue()
    return Fab(hash_str=uuid.uuid4().hex, content=content, verifications={})


@dataclass
class FakeRuntime:
    """The SuperNode's runtime API as the worker uses it: tasks to claim, what it pushed."""

    tasks: list[tuple[Message, Context, Fab]]
    replies: list[Message] = field(default_factory=list)
    outputs: list[tuple[Context | None, str, str]] = field(default_factory=list)
    current: tuple[Message, Context, Fab] | None = None

    def AcquireTask(self, request: Any) -> AcquireTaskResponse:
        assert list(request.supported_task_types) == ["flwr-clientapp"]
        if not self.tasks:
            return AcquireTaskResponse()
        self.current = self.tasks.pop(0)
        return AcquireTaskResponse(task=Task(task_id=len(self.outputs) + 1), token=uuid.uuid4().hex)

    def SendTaskHeartbeat(self, request: Any) -> Any:
        return type("Response", (), {"success": True})()

    def close(self) -> None:
        pass


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> FakeRuntime:
    fake = FakeRuntime(tasks=[])

    def pull(client: Any, abandoned: Any) -> tuple[Message, Context, Fab]:
        assert fake.current is not None
        return fake.current

    monkeypatch.setattr(warm_worker, "_client", lambda *_: fake)
    monkeypatch.setattr(warm_worker, "pull_task_input", pull)
    monkeypatch.setattr(
        warm_worker, "push_message", lambda client, reply, context: fake.replies.append(reply)
    )
    monkeypatch.setattr(
        warm_worker,
        "push_task_output",
        lambda client, context, status, details: fake.outputs.append((context, status, details)),
    )
    return fake


def node() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})  # type: ignore[arg-type]


def update_of(reply: Message) -> dict[str, torch.Tensor]:
    return record_to_state(reply.content.array_records[UPDATE])


def test_a_task_gets_the_in_process_reply_and_its_state_goes_back(
    experiment: Experiment, runtime: FakeRuntime
) -> None:
    app = build_client_app(lambda _: experiment.config)
    here = app(train_message(experiment), direct := node())
    runtime.tasks.append((train_message(experiment), context := node(), fab()))

    serve("127.0.0.1:1", app, handled=1, poll_seconds=0.0)

    [reply] = runtime.replies
    assert reply.metadata.message_type == MessageType.TRAIN and not reply.has_error()
    mine, theirs = update_of(reply), update_of(here)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # Top-k's residuals are in the context the worker pushes back with the task's status.
    [(pushed, status, details)] = runtime.outputs
    assert (pushed, status, details) == (context, SubStatus.COMPLETED, "")
    assert (
        pushed.state.array_records and pushed.state.array_records.keys() == direct.state.array_records.keys()
    )


def test_a_failing_clientapp_fails_its_task_and_the_worker_takes_the_next(
    experiment: Experiment, runtime: FakeRuntime
) -> None:
    broken = ClientApp()

    @broken.train()
    def train(msg: Message, context: Context) -> Message:
        raise ValueError("no data on this device")

    runtime.tasks += [(train_message(experiment), node(), fab()) for _ in range(2)]
    serve("127.0.0.1:1", broken, handled=2, poll_seconds=0.0)

    assert len(runtime.replies) == len(runtime.outputs) == 2
    for reply, (_, status, details) in zip(runtime.replies, runtime.outputs, strict=True):
        assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        assert status == SubStatus.FAILED and "no data on this device" in details


def test_a_run_of_another_app_is_refused(experiment: Experiment, runtime: FakeRuntime) -> None:
    runtime.tasks.append((train_message(experiment), node(), fab("someone.else:app")))
    serve("127.0.0.1:1", build_client_app(lambda _: experiment.config), handled=1, poll_seconds=0.0)

    [reply] = runtime.replies
    assert reply.has_error() and "someone.else:app" in reply.error.reason
    assert runtime.outputs[0][1] == SubStatus.FAILED


def test_the_bundle_check_reads_the_fab_once_and_refuses_junk() -> None:
    bundles: dict[str, str] = {}
    good = fab()
    _check_bundle(good, bundles)
    assert bundles == {good.hash_str: CLIENTAPP_REFERENCE}
    with pytest.raises(BundleMismatch, match="no readable ClientApp"):
        _check_bundle(Fab(hash_str="x", content=b"not a zip", verifications={}), bundles)


def test_a_supernode_not_up_yet_is_waited_for(
    experiment: Experiment,
    runtime: FakeRuntime,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import httpx

    acquire = runtime.AcquireTask
    failures = iter([httpx.ConnectError("connection refused"), httpx.ConnectError("connection refused")])

    def flaky(request: Any) -> AcquireTaskResponse:
        error = next(failures, None)
        if error is not None:
            raise error
        return acquire(request)

    monkeypatch.setattr(runtime, "AcquireTask", flaky)
    monkeypatch.setattr(warm_worker.time, "sleep", lambda _: None)
    runtime.tasks.append((train_message(experiment), node(), fab()))
    serve("127.0.0.1:1", build_client_app(lambda _: experiment.config), handled=1, poll_seconds=0.0)

    assert runtime.outputs[0][1] == SubStatus.COMPLETED
    assert caplog.text.count("not reachable") == 1  # said once, not once a second


def test_a_message_the_supernode_never_completes_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's SuperLink died while the node fetched the message: its parts never come.

    flwr-clientapp would wait two hours; the worker gives up and can take the next task.
    """
    from flwr.proto.message_pb2 import ObjectTree, PullObjectResponse
    from flwr.proto.runtime_pb2 import PullAppMessagesResponse, PullTaskInputResponse

    class NeverComplete:
        def PullTaskInput(self, request: Any) -> PullTaskInputResponse:
            return PullTaskInputResponse(task_id=1)

        def PullMessages(self, request: Any) -> PullAppMessagesResponse:
            response = PullAppMessagesResponse(message_object_trees=[ObjectTree(object_id="ab" * 32)])
            response.messages_list.add()
            return response

        def PullObject(self, request: Any) -> PullObjectResponse:
            return PullObjectResponse(object_found=True, object_available=False)

        def ConfirmMessageReceived(self, request: Any) -> Any:
            raise AssertionError("a message that never arrived was confirmed")

    monkeypatch.setattr(warm_worker, "INPUT_PULL_SECONDS", 1.0)
    started = time.monotonic()
    with pytest.raises(ObjectPullError):
        warm_worker.pull_task_input(NeverComplete(), threading.Event())  # type: ignore[arg-type]
    assert time.monotonic() - started < 10
    dropped = threading.Event()
    dropped.set()  # the SuperNode's heartbeat answer said the task is gone: no waiting at all
    with pytest.raises(ObjectPullError, match="dropped the task"):
        warm_worker.pull_task_input(NeverComplete(), dropped)  # type: ignore[arg-type]
