"""``fedpeft-supernode``: Flower's SuperNode, sending replies when ready and polling sooner.

``flower-supernode`` with the same arguments and two changes to its loop (Flower 1.41).

**Replies go out when they are ready.** Flower's loop alternates: pull a message, then
wait for a reply and send every reply its ClientApps have finished, then pull again.
Replies go out only after a pull that found a message. When the reply that turns up
first is not the pulled message's own, the pulled message's reply waits in the node
until the next message arrives, which never happens if the server is waiting for it.
That is what a SuperLink restart produces (``fedpeft deploy --resume``): a node that
fetches a message of the killed run after reconnecting is told the run has stopped,
but Flower has already stored the message and its task, so a ClientApp still answers
it. The node then pulls the resumed run's message and sends the stale reply (which the
SuperLink ignores), and the resumed run's reply is left behind: the round ends at
``federation.round_timeout`` without that node (measured on 2 loaded cores: round 3
with 2 of 3 clients after 120 s). Here every poll that finds no message also sends the
replies that are ready, with Flower's own sending code (:class:`ReplyFlusher`).

**Polls come sooner while a run is busy.** A poll that finds no message is followed by
a fixed 3 s sleep, and once a message is handed to a ClientApp the loop checks for its
reply every 0.5 s. A deployed round therefore starts, on average, 1.5 s late on each
node (the round waits for the last of them) and ends up to 0.5 s late: seconds per
round that a simulation never pays (``docs/deployment.md``), and Flower has no setting
for either. Here, after a message or a reply, the next poll comes ``--busy-poll``
seconds later (0.1 by default), then at intervals growing by :data:`BACKOFF` per empty
poll until they reach Flower's 3 s (after 15 polls and 11 s): the next round, which
follows within seconds while a run is under way, is seen within about an eighth of the
time since the node's last work, and an idle node settles back to Flower's pace, so an
idle fleet polls the SuperLink no more than Flower's own would (:class:`BusyPoll`).

Both hook Flower internals: :func:`install` checks that they are still there and
otherwise leaves Flower as it is, with a warning, so a Flower upgrade can bring the
waits back but cannot break a node.
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

log = logging.getLogger(__name__)

PUSH_ARGUMENTS = ("state", "object_store", "send", "push_object")
"""The parameters of Flower 1.41's ``_push_messages``."""

FLOWER_IDLE_WAIT_SECONDS = 3
"""Flower 1.41's wait after a poll that found no message (``start_client_internal``)."""

FLOWER_LOCAL_WAIT_SECONDS = 0.5
"""Flower 1.41's wait between checks for the ClientApp's reply in the node's state."""

LOCAL_WAIT_SECONDS = 0.05
"""fedpeft's wait between those checks: they read the node's own memory, no network."""

BACKOFF = 1.25
"""Growth of the wait after each empty poll, from ``first_wait`` up to Flower's 3 s."""


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


class _NoReplyReady(Exception):
    """Raised in place of Flower's wait for a reply, when none is ready."""


class _NoWaitState:
    """A node state whose lookup of ready replies answers at once instead of waiting.

    ``_push_messages`` polls ``get_messages_legacy(is_reply=True)`` until a reply turns
    up; through this view an empty answer ends the call instead. Everything else is
    the node's state itself.
    """

    def __init__(self, state: Any) -> None:
        self._state = state

    def get_messages_legacy(self, **filters: Any) -> Sequence[Any]:
        messages = self._state.get_messages_legacy(**filters)
        if filters.get("is_reply") and not messages:
            raise _NoReplyReady
        return messages

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


class ReplyFlusher:
    """Wraps the loop's pull and push so that a poll without a message sends ready replies.

    The push arguments (the node's state, object store and connection) are those of the
    loop's own latest push: before the first message has been pulled there is no reply
    to send. With a ``poll``, a pull that brought a message and any reply sent count as
    work (:meth:`BusyPoll.note_work`).
    """

    def __init__(
        self,
        pull: Callable[..., int | None],
        push: Callable[..., None],
        poll: BusyPoll | None = None,
    ) -> None:
        self._pull = pull
        self._push = push
        self.poll = poll
        self._push_signature = inspect.signature(push)
        self._push_arguments: dict[str, Any] | None = None

    def pull(self, *args: Any, **kwargs: Any) -> int | None:
        """Flower's pull; when it brings no message, send what replies are ready."""
        run_id = self._pull(*args, **kwargs)
        if run_id is None:
            self.flush()
        else:
            self._note_work()
        return run_id

    def push(self, *args: Any, **kwargs: Any) -> None:
        """Flower's push (waiting for a reply, as Flower does), remembering its arguments."""
        self._push_arguments = dict(self._push_signature.bind(*args, **kwargs).arguments)
        self._push(*args, **kwargs)
        self._note_work()

    def _note_work(self) -> None:
        if self.poll is not None:
            self.poll.note_work()

    def flush(self) -> bool:
        """Send every reply that is ready now; False if there was none (nothing waits)."""
        if self._push_arguments is None:
            return False
        arguments = {**self._push_arguments, "state": _NoWaitState(self._push_arguments["state"])}
        try:
            self._push(**arguments)
        except _NoReplyReady:
            return False
        self._note_work()
        return True


def _knows_the_waits(module: ModuleType) -> bool:
    """Whether ``module`` sleeps Flower 1.41's two waits through its ``time`` global."""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return False
    return (
        f"time.sleep({FLOWER_IDLE_WAIT_SECONDS})" in source
        and f"time.sleep({FLOWER_LOCAL_WAIT_SECONDS})" in source
        and getattr(module, "time", None) is time
    )


def install(module: ModuleType | None = None, poll: BusyPoll | None = None) -> ReplyFlusher | None:
    """Hook a :class:`ReplyFlusher` (and ``poll``'s waits, if given) into Flower's loop.

    ``module`` defaults to Flower's ``start_client_internal``. Returns None, leaving it
    untouched, where the loop's pull and push are not the ones this knows (another
    Flower version); where only the waits are not, the replies are still flushed and
    Flower's waits stay.
    """
    if module is None:
        from flwr.supernode import start_client_internal as module
    assert module is not None
    pull = getattr(module, "_pull_and_store_message", None)
    push = getattr(module, "_push_messages", None)
    try:
        push_source = inspect.getsource(push) if push is not None else ""
        push_parameters = tuple(inspect.signature(push).parameters) if push is not None else ()
    except (OSError, TypeError, ValueError):
        push_source, push_parameters = "", ()
    if (
        pull is None
        or push is None
        or push_parameters != PUSH_ARGUMENTS
        or "state.get_messages_legacy(is_reply=True)" not in push_source
    ):
        log.warning(
            "fedpeft-supernode: this Flower's SuperNode loop is not the one fedpeft knows (Flower 1.41): "
            "it runs unchanged, and a reply can wait for the node's next message"
        )
        return None
    if poll is not None and not _knows_the_waits(module):
        log.warning(
            "fedpeft-supernode: this Flower's SuperNode loop does not wait as Flower 1.41's does: "
            "it keeps Flower's own polling"
        )
        poll = None
    flusher = ReplyFlusher(pull, push, poll)
    module._pull_and_store_message = flusher.pull  # type: ignore[attr-defined]
    module._push_messages = flusher.push  # type: ignore[attr-defined]
    if poll is not None:
        module.time = poll  # type: ignore[attr-defined]
    return flusher


def build_parser() -> argparse.ArgumentParser:
    """The option fedpeft adds; the rest of the command line is Flower's."""
    parser = argparse.ArgumentParser(
        prog="fedpeft-supernode",
        add_help=False,  # --help goes on to flower-supernode, after this option's help
        allow_abbrev=False,
        description="flower-supernode sending each reply as soon as it is ready and looking for the "
        "next message every BUSY_POLL seconds while a run is busy, instead of Flower's fixed 3 s. "
        "Every other argument goes to flower-supernode unchanged.",
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
    parser = build_parser()
    args, flower_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(flower_args):
        parser.print_help()
        print("\nflower-supernode's own options follow.\n", flush=True)
    poll = None
    if args.busy_poll:
        try:
            poll = BusyPoll(args.busy_poll)
        except ValueError as err:
            raise SystemExit(f"fedpeft-supernode: {err}") from None
    flusher = install(poll=poll)
    if flusher is not None and flusher.poll is not None:
        print(
            f"fedpeft-supernode: polling {args.busy_poll:g} s after a message or reply, then "
            f"{BACKOFF:g}x longer per empty poll up to Flower's {FLOWER_IDLE_WAIT_SECONDS} s",
            file=sys.stderr,
            flush=True,
        )
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
