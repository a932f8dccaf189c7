"""A deployed Grid that notices replies promptly.

Flower's deployed Grid (``HttpGrid``) pulls replies from the SuperLink every 3 s, so a
round whose last reply lands just after a pull waits up to 3 s more for nothing (1.5 s
on average): on localhost, with a few seconds of training a round, that wait was a
large part of what a deployed round cost over a simulated one (the simulation's Grid
pulls every 0.1 s). :class:`PromptGrid` pulls after 20 ms and then at intervals that
double up to 0.2 s, so a reply is seen within 0.2 s of its arrival, at about five pulls
a second while clients train.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft.flower.grid_delegate import DelegatingGrid


class PromptGrid(DelegatingGrid):
    """``grid`` with :meth:`send_and_receive` pulling at 20 ms to 0.2 s intervals.

    Args:
        grid: The Grid Flower handed the ServerApp; every other call goes to it.
        first_wait: Seconds before the first pull after pushing.
        longest_wait: The longest interval between pulls.

    """

    def __init__(self, grid: Grid, first_wait: float = 0.02, longest_wait: float = 0.2) -> None:
        if not 0 < first_wait <= longest_wait:
            raise ValueError(f"need 0 < first_wait <= longest_wait, got {first_wait} and {longest_wait}")
        self.grid = grid
        self.first_wait = first_wait
        self.longest_wait = longest_wait

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; return their replies once all came back or ``timeout`` seconds passed.

        The same contract as Flower's: ``timeout`` None waits for every reply, and the
        replies that came back in time are returned when it runs out.
        """
        waiting = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = self.first_wait
        while waiting:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            time.sleep(wait if left is None else min(wait, left))
            arrived = list(self.grid.pull_messages(waiting))
            replies.extend(arrived)
            waiting.difference_update(m.metadata.reply_to_message_id for m in arrived)
            wait = min(2 * wait, self.longest_wait)
        return replies
