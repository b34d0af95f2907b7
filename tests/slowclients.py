"""Slow and greedy HTTP clients on raw sockets, for the connection-guard tests and bench/soak.py.

Each client connects from its own loopback address when asked (Linux routes all of 127.0.0.0/8 to
the loopback interface), so a test can tell "this attacker's address" from "everyone else".
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

__all__ = ["SlowClient", "connect_from", "slow_clients"]


def connect_from(source: str, port: int, timeout_s: float = 5.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:`port` whose client address is `source` (e.g. 127.0.0.2)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


@dataclass
class SlowClient:
    """One client sending `head` (a request line and some headers), then one more header byte every
    `interval_s`, for at most `duration_s`; it records what the server answered and when it closed."""

    sock: socket.socket
    head: bytes
    interval_s: float
    duration_s: float
    started: float = field(default_factory=time.monotonic)
    answer: bytes = b""
    closed_after_s: float | None = None  # seconds from start until the server closed; None: never

    def run(self) -> None:
        try:
            self.sock.sendall(self.head)
            self.sock.setblocking(False)
            deadline = self.started + self.duration_s
            while time.monotonic() < deadline:
                try:
                    self.sock.send(b"x")
                except OSError:
                    self._closed()
                    return
                if self._read_until(time.monotonic() + self.interval_s):
                    return
        finally:
            self.sock.close()

    def _read_until(self, until: float) -> bool:
        """Read what the server sends until `until`; True once it closed the connection."""
        while (left := until - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return False
            except OSError:
                self._closed()
                return True
            if not data:
                self._closed()
                return True
            self.answer += data
        return False

    def _closed(self) -> None:
        self.closed_after_s = time.monotonic() - self.started

    @property
    def status(self) -> int | None:
        if not self.answer.startswith(b"HTTP/1.1 "):
            return None
        return int(self.answer[9:12])


def slow_clients(
    port: int,
    count: int,
    *,
    source: str = "127.0.0.2",
    body: bool = False,
    interval_s: float = 0.25,
    duration_s: float = 20.0,
) -> tuple[list[SlowClient], list[threading.Thread]]:
    """Start `count` slow clients from `source`, each on its own thread; join the threads to wait.

    `body=False`: the headers trickle in. `body=True`: the headers arrive whole, announcing a
    1 MB JSON body, and then the body trickles in a byte at a time.
    """
    if body:
        head = (
            b"POST /v1/images/generations HTTP/1.1\r\nhost: fluxport\r\n"
            b"content-type: application/json\r\ncontent-length: 1000000\r\n\r\n{"
        )
    else:
        head = b"POST /v1/images/generations HTTP/1.1\r\nhost: fluxport\r\nx-slow: "
    clients = [SlowClient(connect_from(source, port), head, interval_s, duration_s) for _ in range(count)]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    return clients, threads
