"""fedpeft-supernode: Flower's SuperNode loop, replies sent when ready, shorter waits while busy.

The loop's own functions (``_push_messages``, the node state, the object store) are
Flower's; only the connection to the SuperLink is a recorder.
"""

from __future__ import annotations

import importlib
import itertools
import subprocess
import sys
import threading
from types import ModuleType, SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode import start_client_internal as flower_loop
from flwr.supernode.nodestate import NodeStateFactory

from fedpeft.flower import supernode
from fedpeft.flower.supernode import BACKOFF, LOCAL_WAIT_SECONDS, BusyPoll

NODE_ID = 5


class Node:
    """A SuperNode's state and object store, and what its connection has sent."""

    def __init__(self) -> None:
        factory = ObjectStoreFactory()
        self.state = NodeStateFactory(objectstore_factory=factory).state()
        self.store = factory.store()
        self.sent: list[int] = []

    def send(self, message: Message, object_tree: object, runtime: float) -> tuple[set[str], str]:
        self.sent.append(message.metadata.run_id)
        return set(), "session"

    def push_arguments(self) -> dict:
        return {"state": self.state, "object_store": self.store, "send": self.send, "push_object": _ignore}

    def reply_ready(self, run_id: int) -> None:
        """A ClientApp answered a message of run ``run_id``."""
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 0, run_id, NODE_ID
        message = Message(
            RecordDict({"x": ConfigRecord({"run": run_id})}), dst_node_id=NODE_ID, message_type="train"
        )
        message.metadata.__dict__["_message_id"] = message.object_id
        self.state.store_message(message)
        self.state.record_message_processing_start(message.metadata.message_id)
        self.state.record_message_processing_end(message.metadata.message_id)
        flower_loop._insert_message(
            Message(RecordDict({"y": ConfigRecord({"run": run_id})}), reply_to=message),
            self.state,
            self.store,
        )


def _ignore(*args: object) -> None:
    return None


def test_a_poll_without_a_message_sends_the_reply_left_behind() -> None:
    # After a SuperLink restart: the node pulls the resumed run's (2) message while a
    # ClientApp still answers the killed run's (1). Flower's push sends the stale reply
    # that is ready first and returns; the resumed run's reply comes later.
    node = Node()
    messages = iter([2, None, None])
    flusher = supernode.ReplyFlusher(lambda: next(messages), flower_loop._push_messages)

    assert flusher.pull() == 2
    node.reply_ready(1)
    flusher.push(**node.push_arguments())
    assert node.sent == [1]

    node.reply_ready(2)
    assert flusher.pull() is None  # no new message: Flower alone would keep reply 2 until one comes
    assert node.sent == [1, 2]
    assert flusher.pull() is None and node.sent == [1, 2]  # each reply goes once


def test_a_poll_with_no_reply_ready_does_not_wait() -> None:
    node = Node()
    messages = iter([None, 3, None])
    flusher = supernode.ReplyFlusher(lambda: next(messages), flower_loop._push_messages)
    assert flusher.pull() is None and flusher.flush() is False  # before the first message
    assert flusher.pull() == 3
    node.reply_ready(3)
    flusher.push(**node.push_arguments())
    poll = threading.Thread(target=flusher.pull, daemon=True)
    poll.start()
    poll.join(5.0)
    assert not poll.is_alive(), "a poll with no reply ready waited for one"
    assert node.sent == [3]


def test_positional_push_arguments_are_remembered_too() -> None:
    node = Node()
    flusher = supernode.ReplyFlusher(lambda: None, flower_loop._push_messages)
    node.reply_ready(4)
    arguments = node.push_arguments()
    flusher.push(*arguments.values())
    node.reply_ready(5)
    assert flusher.flush() is True
    assert node.sent == [4, 5]


def test_install_hooks_flowers_loop_and_refuses_a_loop_it_does_not_know() -> None:
    pull = flower_loop._pull_and_store_message
    module = ModuleType("loop")
    module._pull_and_store_message = pull  # type: ignore[attr-defined]
    module._push_messages = flower_loop._push_messages  # type: ignore[attr-defined]
    flusher = supernode.install(module)
    assert flusher is not None
    assert module._pull_and_store_message == flusher.pull  # type: ignore[attr-defined]
    assert module._push_messages == flusher.push  # type: ignore[attr-defined]

    def other_push(state: object, store: object) -> None:  # another Flower's loop
        return None

    other = SimpleNamespace(_pull_and_store_message=pull, _push_messages=other_push)
    assert supernode.install(other) is None  # type: ignore[arg-type]
    assert other._push_messages is other_push and other._pull_and_store_message is pull


def test_the_entry_point_runs_flower_supernode_hooked() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.argv = ['fedpeft-supernode', '--help']; "
            "from fedpeft.flower.supernode import main; main()",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--busy-poll" in done.stdout and "--superlink" in done.stdout  # ours, then Flower's
    assert "not the one fedpeft knows" not in done.stderr
    assert "keeps Flower's own polling" not in done.stderr


def test_waits_start_short_after_work_and_grow_back_to_flowers() -> None:
    slept: list[float] = []
    poll = BusyPoll(first_wait=0.1, sleep=slept.append)
    poll.sleep(3)  # no work yet: Flower's wait
    poll.note_work()
    for _ in range(20):
        poll.sleep(3)
    poll.sleep(0.5)  # the reply check reads local memory
    poll.sleep(1.0)  # any other wait is Flower's
    idle = slept[1:21]
    assert slept[0] == 3 and idle[0] == pytest.approx(0.1) and idle[1] == pytest.approx(0.1 * BACKOFF)
    assert all(b >= a for a, b in itertools.pairwise(idle)) and idle[-1] == 3
    assert 14 <= sum(w < 3 for w in idle) <= 16  # back to Flower's pace after about 15 polls
    assert slept[21:] == [LOCAL_WAIT_SECONDS, 1.0]
    poll.note_work()  # the next round starts the short waits again
    poll.sleep(3)
    assert slept[-1] == pytest.approx(0.1)
    assert poll.monotonic is not None  # the rest of ``time`` is still there


@pytest.mark.parametrize("first_wait", [0.0, -1.0, 3.5])
def test_bad_poll_intervals_are_refused(first_wait: float) -> None:
    with pytest.raises(ValueError, match="busy poll"):
        BusyPoll(first_wait)


def test_install_shortens_flowers_waits_after_a_message_or_a_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    node = Node()
    pulled: list[int | None] = [None, 6, None, None]
    # Flower's real module (its source is what install checks), with the network pull replaced;
    # monkeypatch puts back whatever install changes.
    monkeypatch.setattr(flower_loop, "_pull_and_store_message", lambda: pulled.pop(0))
    for name in ("_push_messages", "time"):
        monkeypatch.setattr(flower_loop, name, getattr(flower_loop, name))
    slept: list[float] = []
    poll = BusyPoll(0.1, sleep=slept.append)

    flusher = supernode.install(flower_loop, poll)
    assert flusher is not None and flusher.poll is poll and flower_loop.time is poll
    assert flower_loop._pull_and_store_message() is None
    flower_loop.time.sleep(3)
    assert slept == [3]  # no message yet: Flower's wait
    assert flower_loop._pull_and_store_message() == 6
    flower_loop.time.sleep(3)
    assert slept[-1] == pytest.approx(0.1)

    for _ in range(20):
        flower_loop.time.sleep(3)
    node.reply_ready(6)
    flower_loop._push_messages(**node.push_arguments())  # a reply sent counts as work
    flower_loop.time.sleep(3)
    assert node.sent == [6] and slept[-2:] == [3, pytest.approx(0.1)]

    for _ in range(20):
        flower_loop.time.sleep(3)
    node.reply_ready(7)  # a reply left behind, sent by a poll without a message
    assert flower_loop._pull_and_store_message() is None
    flower_loop.time.sleep(3)
    assert node.sent == [6, 7] and slept[-2:] == [3, pytest.approx(0.1)]
    assert flower_loop._pull_and_store_message() is None  # nothing sent: the waits keep growing
    flower_loop.time.sleep(3)
    assert slept[-1] == pytest.approx(0.1 * BACKOFF)


def test_a_loop_without_flowers_waits_keeps_them_but_still_flushes(caplog: pytest.LogCaptureFixture) -> None:
    module = ModuleType("loop")  # no source to check the waits in
    module._pull_and_store_message = flower_loop._pull_and_store_message  # type: ignore[attr-defined]
    module._push_messages = flower_loop._push_messages  # type: ignore[attr-defined]
    module.time = __import__("time")  # type: ignore[attr-defined]

    flusher = supernode.install(module, BusyPoll(0.1))
    assert flusher is not None and flusher.poll is None
    assert module.time is __import__("time")  # type: ignore[attr-defined]
    assert module._push_messages == flusher.push  # type: ignore[attr-defined]
    assert "keeps Flower's own polling" in caplog.text


def test_main_passes_flowers_arguments_through(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    polls: list[BusyPoll | None] = []

    def install(module: None = None, poll: BusyPoll | None = None) -> SimpleNamespace:
        polls.append(poll)
        return SimpleNamespace(poll=poll)

    monkeypatch.setattr(
        importlib.import_module("flwr.supernode.cli"), "flower_supernode", lambda: seen.append(list(sys.argv))
    )
    monkeypatch.setattr(supernode, "install", install)
    monkeypatch.setattr(sys, "argv", sys.argv)

    supernode.main(["--busy-poll", "0.3", "--superlink", "h:9092", "--insecure"])
    assert seen == [["flower-supernode", "--superlink", "h:9092", "--insecure"]]
    assert polls[0] is not None and polls[0].first_wait == 0.3

    supernode.main(["--busy-poll", "0", "--insecure"])  # 0: Flower's waits, replies still flushed
    assert polls[1] is None and seen[-1] == ["flower-supernode", "--insecure"]


def test_main_refuses_a_bad_interval() -> None:
    with pytest.raises(SystemExit, match="busy poll interval"):
        supernode.main(["--busy-poll", "5"])
