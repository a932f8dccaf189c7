"""``fedpeft-supernode``: Flower's SuperNode, sending each reply as soon as it is ready.

Flower 1.41's SuperNode loop alternates: pull a message, then wait for a reply and
send every reply its ClientApps have finished, then pull again. Replies go out only
after a pull that found a message. When the reply that turns up first is not the
pulled message's own, the pulled message's reply waits in the node until the next
message arrives, which never happens if the server is waiting for that reply.

That is what a SuperLink restart produces (``fedpeft deploy --resume``): a node that
fetches a message of the killed run after reconnecting is told the run has stopped,
but Flower has already stored the message and its task, so a ClientApp still answers
it. The node then pulls the resumed run's message and sends the stale reply (which the
SuperLink ignores). The resumed run's reply is left waiting, and the round ends at
``federation.round_timeout`` without that node (measured on 2 loaded cores: round 3
with 2 of 3 clients after 120 s).

This entry point runs ``flower-supernode`` unchanged except that every poll that finds
no message also sends the replies that are ready, with Flower's own sending code. So a
reply waits at most one poll interval (3 s), whatever arrived before it. The hook is on
Flower internals: :func:`install` checks that they are still there and otherwise leaves
Flower as it is, with a warning, so a Flower upgrade can bring the wait back but cannot
break a node.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

PUSH_ARGUMENTS = ("state", "object_store", "send", "push_object")
"""The parameters of Flower 1.41's ``_push_messages``."""


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
    to send.
    """

    def __init__(self, pull: Callable[..., int | None], push: Callable[..., None]) -> None:
        self._pull = pull
        self._push = push
        self._push_signature = inspect.signature(push)
        self._push_arguments: dict[str, Any] | None = None

    def pull(self, *args: Any, **kwargs: Any) -> int | None:
        """Flower's pull; when it brings no message, send what replies are ready."""
        run_id = self._pull(*args, **kwargs)
        if run_id is None:
            self.flush()
        return run_id

    def push(self, *args: Any, **kwargs: Any) -> None:
        """Flower's push (waiting for a reply, as Flower does), remembering its arguments."""
        self._push_arguments = dict(self._push_signature.bind(*args, **kwargs).arguments)
        self._push(*args, **kwargs)

    def flush(self) -> bool:
        """Send every reply that is ready now; False if there was none (nothing waits)."""
        if self._push_arguments is None:
            return False
        arguments = {**self._push_arguments, "state": _NoWaitState(self._push_arguments["state"])}
        try:
            self._push(**arguments)
        except _NoReplyReady:
            return False
        return True


def install(module: ModuleType | None = None) -> ReplyFlusher | None:
    """Hook a :class:`ReplyFlusher` into Flower's SuperNode loop (``module``).

    Returns None, leaving ``module`` untouched, where the loop is not the one this
    knows (another Flower version).
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
    flusher = ReplyFlusher(pull, push)
    module._pull_and_store_message = flusher.pull  # type: ignore[attr-defined]
    module._push_messages = flusher.push  # type: ignore[attr-defined]
    return flusher


def main() -> None:
    """``fedpeft-supernode``: ``flower-supernode`` with the same arguments, replies sent when ready."""
    install()
    from flwr.supernode.cli import flower_supernode

    flower_supernode()
