"""A Grid that passes every call but ``send_and_receive`` to the Grid it wraps.

fedpeft wraps Flower's Grid where it changes how a round's messages are sent and
received (prompt polling when deployed, SecAgg+'s checked and counted stages); the
rest of a Grid is the wrapped one's, written once here.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.proto.node_pb2 import NodeInfo  # type: ignore[attr-defined]
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class DelegatingGrid(Grid):
    """Every Grid call but ``send_and_receive`` goes to ``self.grid`` (set by the subclass)."""

    grid: Grid

    def set_run(self, run: Run) -> None:  # noqa: D102
        self.grid.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self.grid.run

    def create_message(self, *args: object, **kwargs: object) -> Message:  # noqa: D102
        return self.grid.create_message(*args, **kwargs)  # type: ignore[arg-type]

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:  # noqa: D102
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.grid.pull_messages(message_ids)
