"""Heartbeats of long attack stages: rate-limited, sent only where the caller listens."""

from __future__ import annotations

import torch

from fedpeft.attacks.progress import format_elapsed, heartbeat, reporting
from fedpeft.attacks.pursuit import simultaneous_pursuit


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Counted:
    """Counts how often it is turned into text."""

    def __init__(self) -> None:
        self.formatted = 0

    def __str__(self) -> str:
        self.formatted += 1
        return "x"


def test_inner_steps_are_sent_at_most_every_period_and_stage_starts_always() -> None:
    lines: list[str] = []
    clock = _Clock()
    with reporting(lines.append, every=30.0, clock=clock):
        heartbeat("stage A", major=True)
        clock.now += 10
        heartbeat("step %d of %d", 1, 9)  # 10 s after the last line: held back
        clock.now += 25
        heartbeat("step %d of %d", 2, 9)  # 35 s after: sent
        clock.now += 5
        heartbeat("stage B", major=True)  # a stage start: sent at once
        clock.now += 100
        heartbeat("step %d of %d", 3, 9)
    assert lines == [
        "    stage A (0 s in)",
        "    step 2 of 9 (35 s in)",
        "    stage B (40 s in)",
        "    step 3 of 9 (2 min 20 s in)",
    ]


def test_without_a_listener_nothing_is_sent_or_formatted() -> None:
    counted = _Counted()
    lines: list[str] = []
    heartbeat("value %s", counted, major=True)
    with reporting(None):
        heartbeat("value %s", counted, major=True)
    clock = _Clock()
    with reporting(lines.append, every=30.0, clock=clock):
        heartbeat("value %s", counted)  # within the period: not formatted either
        clock.now += 31
        heartbeat("value %s", counted)
    heartbeat("value %s", counted, major=True)  # the listener is gone again
    assert counted.formatted == 1 and lines == ["    value x (31 s in)"]


def test_a_stage_says_what_it_does() -> None:
    generator = torch.Generator().manual_seed(0)
    dictionary = torch.randn(50, 16, generator=generator, dtype=torch.float64)
    rows = torch.randn(3, 4, generator=generator, dtype=torch.float64) @ dictionary[[3, 7, 11, 20]]
    lines: list[str] = []
    with reporting(lines.append, every=0.0):
        fit = simultaneous_pursuit(rows, dictionary, max_atoms=8)
    assert sorted(fit.atoms.tolist()) == [3, 7, 11, 20]
    assert lines[0].startswith("    pursuit: 0 atoms of at most 8 chosen (")
    assert len(lines) == 4  # one line per atom taken, none after the exact fit


def test_elapsed_time_reads_as_a_person_would_say_it() -> None:
    assert [format_elapsed(s) for s in (0.4, 59, 61, 3599, 3600, 7322)] == [
        "0 s",
        "59 s",
        "1 min 01 s",
        "59 min 59 s",
        "1 h 00 min",
        "2 h 02 min",
    ]
