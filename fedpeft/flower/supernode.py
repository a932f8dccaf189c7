"""``fedpeft-supernode``: Flower's SuperNode, looking for work sooner while a run is busy.

Flower 1.41's SuperNode asks the SuperLink for a message, and when there is none it
sleeps a fixed 3 s before asking again; once it has handed a message to its ClientApp
it checks for the reply every 0.5 s. A deployed round therefore starts, on average,
1.5 s late on each node (the round waits for the last of them: 2.25 s on average with
three nodes) and ends up to 0.5 s late: seconds per round that a simulation never
pays (``docs/deployment.md``). Flower offers no setting for either wait.

This entry point runs ``flower-supernode`` unchanged except for those two waits. After
a node receives a message or sends a reply it asks again after ``first_wait`` seconds
(0.1 by default), then at intervals growing by :data:`BACKOFF` per empty answer until
they reach Flower's 3 s (after 15 polls and 11 s). The next round, which follows
within seconds while a run is under way, is seen within about an eighth of the time
since the node's last work (0.4 s after a 3 s gap), and a node with nothing to do
settles back to Flower's pace, so an idle fleet polls the SuperLink no more than
Flower's own would. The wait for the local ClientApp's reply, a lookup in the node's
own memory, becomes :data:`LOCAL_WAIT_SECONDS`.

The waits are Flower internals: :func:`install` checks that the loop still has them
and otherwise leaves Flower as it is, with a warning, so a Flower upgrade can make a
node slower again but never wrong.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

FLOWER_IDLE_WAIT_SECONDS = 3
"""Flower 1.41's wait after a poll that found no message (``start_client_internal``)."""

FLOWER_LOCAL_WAIT_SECONDS = 0.5
"""Flower 1.41's wait between checks for the ClientApp's reply in the node's state."""

LOCAL_WAIT_SECONDS = 0.05
"""fedpeft's wait between those checks: they read the node's own memory, no network."""

BACKOFF = 1.25
"""Growth of the wait after each empty poll, from ``first_wait`` up to Flower's 3 s."""

log = logging.getLogger(__name__)


class BusyPoll:
    """Stands in for the ``time`` module of Flower's SuperNode loop, changing only its waits.

    ``note_work()`` marks a message received or a reply sent; the idle waits after it
    start at ``first_wait`` and grow by :data:`BACKOFF` up to Flower's 3 s.
    """

    def __init__(self, first_wait: float, sleep: Callable[[float], None] = time.sleep) -> None:
        if not 0 < first_wait <= FLOWER_IDLE_WAIT_SECONDS:
            raise ValueError(
                f"busy poll interval must be in (0, {FLOWER_IDLE_WAIT_SECONDS}] seconds, got {first_wait}"
            )
        self.first_wait = first_wait
        self._sleep = sleep
        self._next_wait: float = FLOWER_IDLE_WAIT_SECONDS

    def note_work(self) -> None:
        """A message came in or a reply went out: poll soon again."""
        self._next_wait = self.first_wait

    def wait_for(self, seconds: float) -> float:
        """How long a wait Flower asked for lasts here."""
        if seconds == FLOWER_IDLE_WAIT_SECONDS:
            wait = self._next_wait
            self._next_wait = min(wait * BACKOFF, FLOWER_IDLE_WAIT_SECONDS)
            return wait
        if seconds == FLOWER_LOCAL_WAIT_SECONDS:
            return LOCAL_WAIT_SECONDS
        return seconds

    def sleep(self, seconds: float) -> None:
        """``time.sleep`` as the loop calls it, for :meth:`wait_for`'s time."""
        self._sleep(self.wait_for(seconds))

    def __getattr__(self, name: str) -> Any:
        # Everything else the loop reads from ``time`` (time(), monotonic(), ...).
        return getattr(time, name)


def install(poll: BusyPoll, module: ModuleType | None = None) -> bool:
    """Make Flower's SuperNode loop (``module``) wait as ``poll`` says; False if it cannot.

    Returns False, leaving ``module`` untouched, where the loop no longer has the waits
    and functions this relies on (another Flower version).
    """
    if module is None:
        from flwr.supernode import start_client_internal as module
    assert module is not None
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        source = ""
    pull = getattr(module, "_pull_and_store_message", None)
    push = getattr(module, "_push_messages", None)
    if (
        f"time.sleep({FLOWER_IDLE_WAIT_SECONDS})" not in source
        or f"time.sleep({FLOWER_LOCAL_WAIT_SECONDS})" not in source
        or getattr(module, "time", None) is not time
        or pull is None
        or push is None
    ):
        log.warning(
            "fedpeft-supernode: this Flower's SuperNode loop is not the one fedpeft knows "
            "(Flower 1.41); it keeps Flower's own polling"
        )
        return False

    def pull_and_note(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            poll.note_work()
        return run_id

    def push_and_note(*args: Any, **kwargs: Any) -> None:
        push(*args, **kwargs)
        poll.note_work()

    module.time = poll  # type: ignore[attr-defined]
    module._pull_and_store_message = pull_and_note  # type: ignore[attr-defined]
    module._push_messages = push_and_note  # type: ignore[attr-defined]
    return True


def build_parser() -> argparse.ArgumentParser:
    """The options fedpeft adds; the rest of the command line is Flower's."""
    parser = argparse.ArgumentParser(
        prog="fedpeft-supernode",
        allow_abbrev=False,
        description="flower-supernode that looks for the next message every BUSY_POLL seconds "
        "while a run is busy, instead of Flower's fixed 3 s. Every other argument goes to "
        "flower-supernode unchanged (see flower-supernode --help).",
    )
    parser.add_argument(
        "--busy-poll",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="first wait between polls after a message or reply, growing 1.25x per empty poll up to "
        "Flower's 3 s (default 0.1; 0 keeps Flower's 3 s throughout)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``fedpeft-supernode``."""
    args, flower_args = build_parser().parse_known_args(argv)
    if args.busy_poll:
        try:
            poll = BusyPoll(args.busy_poll)
        except ValueError as err:
            raise SystemExit(f"fedpeft-supernode: {err}") from None
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if args.busy_poll and install(poll):
        print(
            f"fedpeft-supernode: polling {args.busy_poll:g} s after a message or reply, then "
            f"{BACKOFF:g}x longer per empty poll up to Flower's {FLOWER_IDLE_WAIT_SECONDS} s",
            file=sys.stderr,
            flush=True,
        )
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
