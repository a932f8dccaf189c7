"""PromptGrid: a deployed round's replies are seen within 0.2 s, not at Flower's next 3 s pull."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from fedpeft.flower.prompt_grid import PromptGrid


class SlowClients:
    """The part of a Grid that sending and receiving uses: each reply lands at a set time."""

    def __init__(self, arrivals: dict[str, float]) -> None:
        self.arrivals = arrivals  # message id -> seconds after the push
        self.pulls = 0
        self.pushed_at = 0.0

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return list(messages)

    def pull_messages(self, message_ids):
        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
            for i in message_ids
            if self.arrivals[i] <= now
        ]


def test_the_last_reply_is_seen_within_the_longest_wait_of_its_arrival() -> None:
    clients = SlowClients({"a": 0.05, "b": 0.6})
    started = time.monotonic()
    replies = PromptGrid(clients).send_and_receive(["a", "b"], timeout=10)  # type: ignore[arg-type]
    elapsed = time.monotonic() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert 0.6 <= elapsed < 0.6 + 0.2 + 0.15  # the longest wait, and slack for a loaded machine
    assert clients.pulls < 15  # backs off: not a busy loop


def test_the_replies_in_time_are_returned_when_the_timeout_runs_out() -> None:
    clients = SlowClients({"a": 0.0, "b": 60.0})
    started = time.monotonic()
    replies = PromptGrid(clients).send_and_receive(["a", "b"], timeout=0.5)  # type: ignore[arg-type]
    assert 0.5 <= time.monotonic() - started < 1.0
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]


def test_other_calls_go_to_the_wrapped_grid() -> None:
    inner = SimpleNamespace(get_node_ids=lambda: [3, 1], run="the run")
    grid = PromptGrid(inner)  # type: ignore[arg-type]
    assert grid.get_node_ids() == [3, 1] and grid.run == "the run"
    with pytest.raises(ValueError, match="first_wait"):
        PromptGrid(inner, first_wait=1.0, longest_wait=0.5)  # type: ignore[arg-type]
