"""Heartbeats of long attack stages, sent where the caller says, at most every ``every`` seconds.

One capture can keep an attack busy for many minutes (ReCIT's pursuit over a 49k-token
vocabulary, its peeling and polishing past the rank), and a command that prints nothing
for that long looks hung. The stages say what they are doing through :func:`heartbeat`;
the caller that runs the attack decides, with :func:`reporting`, whether and where that
goes (``fedpeft attack`` prints it; the audit keeps its own progress bar and listens to
none). Without a listener a heartbeat costs one context-variable read, and its text is
formatted (``message % args``, as :mod:`logging` does) only when a line is sent.

Why not a parameter of :meth:`Attack.reconstruct`: the interface is what an attack
computes from what it sees; how a command shows its progress is no part of that, and
every attack would have to pass the callable down to every helper it calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class _Listener:
    report: Callable[[str], None]
    every: float
    clock: Callable[[], float]
    started: float = field(init=False)
    last: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.last = self.clock()

    def send(self, message: str, args: tuple[object, ...], major: bool) -> None:
        now = self.clock()
        if not major and now - self.last < self.every:
            return
        self.last = now
        text = message % args if args else message
        self.report(f"    {text} ({format_elapsed(now - self.started)} in)")


_LISTENER: ContextVar[_Listener | None] = ContextVar("fedpeft_attack_progress", default=None)


@contextmanager
def reporting(
    report: Callable[[str], None] | None,
    every: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[None]:
    """Send the heartbeats of the code run inside to ``report`` (None: nowhere).

    Args:
        report: Takes one line of text (``print`` in the CLI).
        every: Least seconds between two heartbeats of the same stage's inner steps;
            a stage's start (``major``) is always sent.
        clock: Seconds, for the elapsed time each line ends with (tests pass a fake one).

    """
    token = _LISTENER.set(_Listener(report, every, clock) if report is not None else None)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def heartbeat(message: str, *args: object, major: bool = False) -> None:
    """Say what a long stage is doing; sent if someone listens and ``every`` seconds have passed.

    Args:
        message: What it is doing, with ``%`` placeholders for ``args``, e.g.
            ``heartbeat("pursuit: %d atoms of at most %d", len(chosen), max_atoms)``.
        args: Values of the placeholders.
        major: A new stage begins: sent whatever the time since the last line.

    """
    listener = _LISTENER.get()
    if listener is not None:
        listener.send(message, args, major)


def format_elapsed(seconds: float) -> str:
    """``42 s``, ``3 min 05 s`` or ``1 h 02 min``: how long something has run."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
