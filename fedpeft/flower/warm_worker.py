"""A warm worker: one long-lived process per device that runs every ClientApp task.

A Flower 1.41 SuperNode hands each message to its SuperExec, which starts a fresh
``flwr-clientapp`` process for it; that process imports Flower (1.2-1.9 s on 2 cores),
then torch, transformers and peft, loads the model, builds the client's data, trains
once and exits: 31-40 s of a deployed round against 4 s of training
(``docs/deployment.md``).

Started with ``--isolation process``, a SuperNode starts no SuperExec: it keeps each
ClientApp task on its runtime API (a local HTTP API, ``--port``) until an executor
claims it. ``fedpeft worker --runtime-api ADDRESS`` is that executor, and runs every
task in its own process, where the model, tokenizer and partition stay loaded from the
previous round (:class:`fedpeft.experiment.Experiment`'s cache). For each task it does
what ``flwr-clientapp`` does, with Flower's own functions: pull the message and its
context with the task's token, run the ClientApp, push the reply, then the context
and the task's status, sending the task's heartbeats meanwhile.

What it runs is the fedpeft ClientApp installed beside it, not code from the run's app
bundle: a run whose bundle names another ClientApp fails each of its tasks, saying so.
A ClientApp that raises fails its task as it would in ``flwr-clientapp`` (an error
reply, which the server counts as a failed client), and the worker takes the next.
One task at a time, in the order the SuperNode queued them.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import zipfile
from collections.abc import Callable

import httpx
import tomllib
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

CLIENTAPP_REFERENCE = "fedpeft.flower.client_app:app"
"""The ClientApp a run's bundle must name for a worker to run its tasks."""

POLL_SECONDS = 0.05
"""Wait between asking the SuperNode for a task: a local request, answered at once."""

INPUT_PULL_SECONDS = 60.0
"""Longest wait for a task's message in the SuperNode's store, which holds it entirely
or never will (a message from a run whose SuperLink died mid-transfer): flwr-clientapp
would wait two hours for it, and a worker that did would answer nothing else."""

log = logging.getLogger(__name__)


class BundleMismatch(RuntimeError):
    """The run's app bundle names a ClientApp other than the one this worker runs."""


def serve(
    runtime_api: str,
    app: ClientApp,
    *,
    handled: int | None = None,
    parent_pid: int | None = None,
    poll_seconds: float = POLL_SECONDS,
) -> None:
    """Claim and run the SuperNode's ClientApp tasks at ``runtime_api`` until stopped.

    Stops after ``handled`` tasks when given; with ``parent_pid`` the worker exits once
    that process (its SuperNode) is gone, so none outlives its node. A SuperNode that
    is not up yet, or restarting, is waited for.
    """
    if parent_pid is not None:
        threading.Thread(target=_exit_with, args=(parent_pid,), daemon=True).start()
    client = _client(runtime_api, RuntimeVersionHttpInterceptor(component_name="SuperExec"))
    bundles: dict[str, str] = {}
    count = 0
    reported_unreachable = False
    try:
        while handled is None or count < handled:
            try:
                claimed = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except httpx.HTTPError as err:  # not up yet, restarting, or overloaded
                if not reported_unreachable:
                    log.warning("warm worker: SuperNode at %s not reachable (%s); retrying", runtime_api, err)
                    reported_unreachable = True
                time.sleep(1.0)
                continue
            reported_unreachable = False
            if not (claimed.HasField("task") and claimed.token):
                time.sleep(poll_seconds)
                continue
            started = time.monotonic()
            try:
                outcome = run_task(runtime_api, claimed.token, app, bundles)
            except Exception as err:  # one task's trouble (Flower's side of it) ends that task only
                log.exception("warm worker: task %d could not be run", claimed.task.task_id)
                outcome = f"not run ({type(err).__name__}: {err})"
            log.info(
                "warm worker: task %d %s in %.1f s", claimed.task.task_id, outcome, time.monotonic() - started
            )
            count += 1
    finally:
        client.close()


def run_task(runtime_api: str, token: str, app: ClientApp, bundles: dict[str, str] | None = None) -> str:
    """Run one claimed task as ``flwr-clientapp --token`` would; returns what became of it.

    ``bundles`` caches each app bundle's ClientApp reference by hash.
    """
    client = _client(
        runtime_api,
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
        RuntimeTokenHttpInterceptor(token),
    )
    abandoned = threading.Event()
    heartbeat = HeartbeatSender(_heartbeat(client, abandoned))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        message, context, fab = pull_task_input(client, abandoned)
        _check_bundle(fab, {} if bundles is None else bundles)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as err:  # the ClientApp's own failure, reported as flwr-clientapp would
        log.exception("warm worker: the ClientApp failed")
        details = f"{type(err)}:<'{err}'>"
        if message is not None:
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message
            )
    try:
        if reply is not None and context is not None:
            push_message(client, reply, context)
    except Exception:
        log.exception("warm worker: could not push the reply")
        status, details = SubStatus.FAILED, "the reply could not be pushed to the SuperNode"
    finally:
        push_task_output(client, context, status, details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    if abandoned.is_set():
        return "abandoned by the SuperNode (the run stopped)"
    return status if status == SubStatus.COMPLETED else f"{status}: {details}"


def pull_task_input(client: RuntimeHttpClient, abandoned: threading.Event) -> tuple[Message, Context, Fab]:
    """The task's message, context and app bundle, as Flower's ``pull_task_input`` pulls them.

    Except that the message's parts are waited for :data:`INPUT_PULL_SECONDS` at most,
    and not at all once the SuperNode has dropped the task.
    """
    task = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id = task.task_id, task.run.run_id
    TaskIdentity.node_id = task.context.node_id
    context = context_from_proto(task.context)
    messages = client.PullMessages(PullAppMessagesRequest())
    if not messages.messages_list:
        raise RuntimeError("the SuperNode has no message for this task")
    node = Node(node_id=context.node_id)
    pull_object = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)

    def pull_unless_abandoned(object_id: str) -> bytes:
        if abandoned.is_set():
            raise ObjectPullError(object_id, "the SuperNode dropped the task")
        return pull_object(object_id)

    tree = messages.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        pull_unless_abandoned,
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        max_time=INPUT_PULL_SECONDS,
        backoff_cap=2.0,
    )
    # The deflated message does not carry its own id (its object id).
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, fab_from_proto(task.fab)


def _client(runtime_api: str, *interceptors: object) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=runtime_api,
        insecure=True,  # the SuperNode's runtime API on this machine, as for its own SuperExec
        root_certificates=None,
        interceptors=list(interceptors),  # type: ignore[arg-type]
        retry_invoker=make_simple_http_retry_invoker(),
    )


def _heartbeat(client: RuntimeHttpClient, abandoned: threading.Event) -> Callable[[], bool]:
    """Flower's task heartbeat, except for a task the SuperNode has dropped.

    ``flwr-clientapp`` interrupts itself then; a worker must live on, so the task runs
    to its end (its pushes are refused) and the worker takes the next.
    """
    request = SendTaskHeartbeatRequest()

    def send() -> bool:
        try:
            response = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False  # retried with backoff
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT):
                return False
            abandoned.set()
            return True
        if not response.success:
            abandoned.set()
        return True

    return send


def _check_bundle(fab: Fab, bundles: dict[str, str]) -> None:
    """Refuse a run whose app bundle (FAB) names a ClientApp other than fedpeft's."""
    if fab.hash_str not in bundles:
        try:
            with zipfile.ZipFile(io.BytesIO(fab.content)) as bundle:
                project = tomllib.loads(bundle.read("pyproject.toml").decode())
            bundles[fab.hash_str] = project["tool"]["flwr"]["app"]["components"]["clientapp"]
        except (zipfile.BadZipFile, KeyError, TypeError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise BundleMismatch(f"the run's app bundle has no readable ClientApp reference ({err})") from err
    if bundles[fab.hash_str] != CLIENTAPP_REFERENCE:
        raise BundleMismatch(
            f"the run's app bundle names ClientApp {bundles[fab.hash_str]!r}; this warm worker runs "
            f"{CLIENTAPP_REFERENCE!r} only (start the SuperNode without --warm-worker for other apps)"
        )


def _exit_with(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    log.warning("warm worker: SuperNode %d is gone; exiting", parent_pid)
    os._exit(0)
