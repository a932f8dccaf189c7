"""A TCP relay on 127.0.0.1 that counts every byte between SuperNodes and the SuperLink.

The bytes counted are those on the wire: TLS records carrying Flower's Fleet API
(HTTP requests and responses with the protobuf-encoded messages), heartbeats, polling
and handshakes, in each direction. SuperNodes dial the relay's port instead of the
SuperLink's; the relay forwards to the SuperLink untouched.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field


@dataclass
class WireCounter:
    """Bytes that crossed the relay so far, per direction."""

    up: int = 0  # SuperNode -> SuperLink
    down: int = 0  # SuperLink -> SuperNode
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.up, self.down


class CountingRelay:
    """Listen on ``127.0.0.1:<port>`` and relay to ``127.0.0.1:<target_port>``, counting."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.counter = WireCounter()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()  # the SuperLink is down: the node retries, as over a real link
                continue
            with self.counter.lock:
                self.counter.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
                with self.counter.lock:
                    if direction == "up":
                        self.counter.up += len(chunk)
                    else:
                        self.counter.down += len(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()

    def close(self) -> None:
        self._stopped.set()
        self._server.close()
