"""A warm worker: one long-lived process per device that does the ClientApp's work.

A Flower 1.41 SuperNode starts a fresh ``flwr-clientapp`` process for every message;
that process pulls one message, runs the ClientApp and exits. For fedpeft that means
importing torch, transformers and peft, loading the model and building the client's
data again for every round: 31-40 s of a deployed round against 4 s of training
(``docs/deployment.md``). With ``warm-worker = "PATH"`` in the node config, the
short-lived ClientApp instead hands each message, with its context, to a worker the
device keeps running (``fedpeft worker --socket PATH``), which has the model loaded
from the previous round, and returns the worker's reply and context state as its own.
The ClientApp process then imports Flower but never torch.

The channel is a Unix socket (0600, in a 0700 folder), so only the device's own user
can hand the worker work, and each exchange is length-prefixed frames of Flower's own
protobuf messages. Failure keeps Flower's semantics: a worker that cannot be reached
means the ClientApp runs the message itself (slower, the same result); a worker that
fails while handling it makes this ClientApp fail, which the server counts as a
failed client, as it would an in-process exception. The worker handles one message
at a time, in arrival order, as the SuperNode would.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.task_identity import TaskIdentity

WORKER_KEY = "warm-worker"
"""Node config key: the worker's socket path."""

MAX_FRAME_BYTES = 4 * 2**30
"""A frame larger than this is refused: no adapter message comes near it."""

_OK, _FAILED = b"ok", b"failed"

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """The warm worker took the message but could not answer it."""


def warm_worker_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: hand ``msg`` to the node's warm worker, if it has one.

    Outermost mod of the deployed ClientApp: the worker runs the whole app (fault
    injection and SecAgg+ included) on its side.
    """
    path = context.node_config.get(WORKER_KEY)
    if not path:
        return call_next(msg, context)
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
    except OSError as err:
        connection.close()
        log.warning(
            "warm worker at %s not reachable (%s): this message runs in the ClientApp process", path, err
        )
        return call_next(msg, context)
    with connection:
        write_frame(connection, message_to_proto(msg).SerializeToString())
        write_frame(connection, context_to_proto(context).SerializeToString())
        status = read_frame(connection)
        if status != _OK:
            raise WorkerError(f"warm worker at {path}: {read_frame(connection).decode(errors='replace')}")
        content = recorddict_from_proto(ProtoRecordDict.FromString(read_frame(connection)))
        context.state = recorddict_from_proto(ProtoRecordDict.FromString(read_frame(connection)))
    return Message(content=content, reply_to=msg)


def serve(
    socket_path: Path, app: ClientApp, handled: int | None = None, parent_pid: int | None = None
) -> None:
    """Answer messages on ``socket_path`` with ``app`` until stopped (or after ``handled``).

    ``app`` must not itself forward to a worker: the node config's ``warm-worker`` is
    removed from each context before the app sees it. With ``parent_pid`` the worker
    exits once that process (its SuperNode) is gone, so none outlives its node.
    """
    listener = listen(socket_path)
    if parent_pid is not None:
        threading.Thread(target=_exit_with, args=(parent_pid, socket_path), daemon=True).start()
    count = 0
    try:
        while handled is None or count < handled:
            connection, _ = listener.accept()
            started = time.monotonic()
            with connection:
                try:
                    kind = answer(connection, app)
                except (OSError, ValueError) as err:  # a ClientApp that went away, a bad frame
                    log.warning("warm worker: dropped a request: %s", err)
                else:
                    log.info("warm worker: answered a %s message in %.1f s", kind, time.monotonic() - started)
            count += 1
    finally:
        listener.close()
        socket_path.unlink(missing_ok=True)


def _exit_with(parent_pid: int, socket_path: Path) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    log.warning("warm worker: SuperNode %d is gone; exiting", parent_pid)
    socket_path.unlink(missing_ok=True)
    os._exit(0)


def listen(socket_path: Path) -> socket.socket:
    """A listening Unix socket only this user can connect to (a stale one is replaced)."""
    socket_path = socket_path.expanduser().resolve()
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(socket_path))
    except OSError:
        socket_path.unlink(missing_ok=True)  # left by a worker that died
    else:
        probe.close()
        raise RuntimeError(f"a warm worker already listens on {socket_path}")
    finally:
        probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        listener.bind(str(socket_path))
    finally:
        os.umask(umask)
    listener.listen()
    return listener


def answer(connection: socket.socket, app: ClientApp) -> str:
    """Read one message and its context, run ``app``, send its reply content and state.

    Returns the message's type (for the log).
    """
    msg = message_from_proto(ProtoMessage.FromString(read_frame(connection)))
    sent = context_from_proto(ProtoContext.FromString(read_frame(connection)))
    node_config = {k: v for k, v in sent.node_config.items() if k != WORKER_KEY}
    context = Context(
        run_id=sent.run_id,
        node_id=sent.node_id,
        node_config=node_config,
        state=sent.state,
        run_config=sent.run_config,
        series_id=sent.series_id,
    )
    # Flower builds a reply's metadata from the process's task identity, which
    # flwr-clientapp sets and a worker must; only the reply's content goes back.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 0, context.run_id, context.node_id
    try:
        reply = app(msg, context)
    except Exception as err:  # the ClientApp's own failure, reported as the ClientApp would
        log.exception("warm worker: the ClientApp failed")
        write_frame(connection, _FAILED)
        write_frame(connection, f"{type(err).__name__}: {err}".encode())
        return f"failed {msg.metadata.message_type}"
    if reply.has_error():
        write_frame(connection, _FAILED)
        write_frame(connection, f"ClientApp error {reply.error.code}: {reply.error.reason}".encode())
        return f"failed {msg.metadata.message_type}"
    write_frame(connection, _OK)
    write_frame(connection, recorddict_to_proto(reply.content).SerializeToString())
    write_frame(connection, recorddict_to_proto(context.state).SerializeToString())
    return msg.metadata.message_type


def write_frame(connection: socket.socket, payload: bytes) -> None:
    """One frame: an 8-byte big-endian length, then the bytes."""
    connection.sendall(struct.pack(">Q", len(payload)) + payload)


def read_frame(connection: socket.socket) -> bytes:
    """The next frame's bytes; a length over :data:`MAX_FRAME_BYTES` is refused unread."""
    (size,) = struct.unpack(">Q", _read_exactly(connection, 8))
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    return _read_exactly(connection, size)


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = connection.recv(min(left, 2**20))
        if not chunk:
            raise ConnectionError(f"connection closed with {left} of {size} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
