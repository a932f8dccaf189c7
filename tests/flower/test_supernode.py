"""fedpeft-supernode: Flower's SuperNode with shorter waits while a run is busy."""

from __future__ import annotations

import importlib
import itertools
import sys
import types

import pytest
from flwr.supernode import start_client_internal

from fedpeft.flower import supernode
from fedpeft.flower.supernode import BACKOFF, LOCAL_WAIT_SECONDS, BusyPoll, install


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
def test_bad_settings_are_refused(first_wait: float) -> None:
    with pytest.raises(ValueError, match="busy poll"):
        BusyPoll(first_wait)


def test_install_wraps_flowers_loop_and_marks_work(monkeypatch: pytest.MonkeyPatch) -> None:
    pulled: list[int | None] = [None, 5]
    pushed: list[bool] = []
    # The real module (its source is what install checks), with the network parts replaced.
    monkeypatch.setattr(start_client_internal, "_pull_and_store_message", lambda **_: pulled.pop(0))
    monkeypatch.setattr(start_client_internal, "_push_messages", lambda **_: pushed.append(True))
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)
    slept: list[float] = []
    poll = BusyPoll(0.1, sleep=slept.append)

    assert install(poll, start_client_internal)
    assert start_client_internal.time is poll
    assert start_client_internal._pull_and_store_message() is None
    start_client_internal.time.sleep(3)
    assert slept == [3]  # no message: Flower's wait
    assert start_client_internal._pull_and_store_message() == 5
    start_client_internal.time.sleep(3)
    assert slept[-1] == pytest.approx(0.1)
    for _ in range(20):
        start_client_internal.time.sleep(3)
    start_client_internal._push_messages()  # a reply sent counts as work too
    start_client_internal.time.sleep(3)
    assert pushed == [True] and slept[-2:] == [3, pytest.approx(0.1)]


def test_install_leaves_an_unknown_loop_alone(caplog: pytest.LogCaptureFixture) -> None:
    module = types.ModuleType("not_flower_1_41")
    module.time = __import__("time")  # type: ignore[attr-defined]

    assert not install(BusyPoll(0.1), module)
    assert module.time is __import__("time")  # type: ignore[attr-defined]
    assert "keeps Flower's own polling" in caplog.text


def test_main_passes_flowers_arguments_through(monkeypatch: pytest.MonkeyPatch) -> None:
    flower_supernode = importlib.import_module("flwr.supernode.cli.flower_supernode")
    seen: list[list[str]] = []
    installed: list[BusyPoll] = []
    monkeypatch.setattr(flower_supernode, "flower_supernode", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(supernode, "install", lambda poll: installed.append(poll) or True)
    monkeypatch.setattr(sys, "argv", sys.argv)

    supernode.main(["--busy-poll", "0.3", "--superlink", "h:9092", "--insecure"])
    assert seen == [["flower-supernode", "--superlink", "h:9092", "--insecure"]]
    assert installed[0].first_wait == 0.3

    supernode.main(["--busy-poll", "0", "--insecure"])  # 0: Flower's waits, not installed
    assert len(installed) == 1 and seen[-1] == ["flower-supernode", "--insecure"]


def test_main_refuses_a_bad_interval() -> None:
    with pytest.raises(SystemExit, match="busy poll interval"):
        supernode.main(["--busy-poll", "5"])
