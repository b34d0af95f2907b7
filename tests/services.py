"""The real PostgreSQL and Redis servers the scale-out tests use, and a skip when one is not there.

CI runs beside both (127.0.0.1:5432 database `test`, 127.0.0.1:6379); on a fresh machine without
them these tests skip and say which server they looked for.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

REDIS_URL = os.environ.get("FLUXPORT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "FLUXPORT_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)

_seen: dict[str, str | None] = {}


def redis_or_skip() -> str:
    """The test Redis URL; skips the test when no Redis answers there."""
    if REDIS_URL not in _seen:
        _seen[REDIS_URL] = _redis_problem(REDIS_URL)
    if (problem := _seen[REDIS_URL]) is not None:
        pytest.skip(problem)
    return REDIS_URL


def postgres_or_skip() -> str:
    """The test PostgreSQL URL; skips the test when no server answers there."""
    if POSTGRES_URL not in _seen:
        _seen[POSTGRES_URL] = _postgres_problem(POSTGRES_URL)
    if (problem := _seen[POSTGRES_URL]) is not None:
        pytest.skip(problem)
    return POSTGRES_URL


def unique_prefix() -> str:
    """Redis keys of one test, apart from every other run sharing the server (CI beside a session)."""
    return f"fptest-{secrets.token_hex(6)}:"


def _redis_problem(url: str) -> str | None:
    try:
        import redis
    except ImportError:
        return "the redis package is not installed (pip install -e '.[dev]')"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
    except Exception as exc:
        return f"no Redis server reachable at {url}: {exc!r}"
    return None


def _postgres_problem(url: str) -> str | None:
    async def probe() -> None:
        import asyncpg

        conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"), timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        return f"no PostgreSQL server reachable at {url}: {exc!r}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def private_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], int]]:
    """A redis-server of the test's own on a free port, which the test may stop and start again
    (to take Redis away mid-run). Skips where no redis-server binary is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: cannot take a Redis away mid-run")
    port = free_port()
    proc = start_redis(binary, port, tmp_path)
    try:
        yield f"redis://127.0.0.1:{port}/0", proc, port
    finally:
        proc.kill()
        proc.wait()


def start_redis(binary: str | None, port: int, tmp_path: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            binary or "redis-server",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


class CuttableProxy:
    """A TCP forwarder on loopback in front of a real server, which a test can cut (every
    connection dropped, new ones refused) and restore: the server going away and coming back,
    without stopping a server other tests share."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        import threading

        self.target = (target_host, target_port)
        self.port = free_port()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        import threading

        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        if self._listener is not None:
            with suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in it
            self._listener.close()
            self._listener = None
        with self._lock:
            for conn in self._open:
                with suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
