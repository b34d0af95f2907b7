"""Fixtures that start real fluxport servers on loopback and point the official openai SDK at them,
and `target`: the storage tests' empty database, on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fluxport.api.app import create_app
from fluxport.settings import Settings
from tests.storage_targets import BACKENDS, Target, storage_target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    settings: Settings
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("api_key", "sk-test")
        return openai.OpenAI(base_url=self.api, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def start_server(data_dir: Path, **overrides: Any) -> LiveServer:
    """A real uvicorn server in a thread, on a free port, with its own data directory.

    Auth is off unless a test passes auth="keys" (tests/test_auth.py covers keys).
    """
    # Hosted provider keys from the developer's shell must not leak into tests.
    base = {"data_dir": data_dir, "fal_key": None, "replicate_api_token": None, "auth": "none"}
    settings = Settings(**{**base, **overrides})
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"fluxport-test-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", settings, server, thread)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tmp_path_factory.mktemp("fluxport-data"))
    # Build the dummy pipeline once up front so the first test does not pay for it.
    httpx.post(
        f"{live.api}/images/generations",
        json={"model": "flux.2-dummy", "prompt": "warm up", "size": "256x256", "response_format": "b64_json"},
        timeout=120,
    ).raise_for_status()
    yield live
    live.stop()


@pytest.fixture(scope="session")
def client(server: LiveServer) -> openai.OpenAI:
    return server.client()


@pytest.fixture(params=BACKENDS)
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    """An empty database, once on SQLite and once on PostgreSQL (tests/storage_targets.py)."""
    async with storage_target(request.param, tmp_path) as found:
        if isinstance(found, str):
            pytest.skip(found)
        yield found


@pytest.fixture
async def pg_target(tmp_path: Path) -> AsyncIterator[Target]:
    """An empty PostgreSQL schema, for what only PostgreSQL does (advisory locks, pools)."""
    async with storage_target("postgresql", tmp_path) as found:
        if isinstance(found, str):
            pytest.skip(found)
        yield found
