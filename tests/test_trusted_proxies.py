"""X-Forwarded-For is believed only from FLUXPORT_TRUSTED_PROXIES: against real `fluxport serve`
processes (uvicorn's own defaults trust 127.0.0.1, which is how the playground limit was beaten)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.serveproc import serve, stop


def start(tmp_path: Path, **env: str) -> Iterator[str]:
    port = free_port()
    proc = serve(tmp_path, port, tmp_path / "serve.log", FLUXPORT_PLAYGROUND_RATE_PER_MINUTE="2", **env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture
def untrusting(tmp_path: Path) -> Iterator[str]:
    yield from start(tmp_path)


@pytest.fixture
def behind_proxy(tmp_path: Path) -> Iterator[str]:
    yield from start(tmp_path, FLUXPORT_TRUSTED_PROXIES='["127.0.0.1"]')


def submit(base: str, forwarded_for: str) -> int:
    form = {"prompt": "a barn", "model": "flux.2-dummy", "size": "256x256"}
    r = httpx.post(
        f"{base}/playground/api/jobs",
        files={k: (None, v) for k, v in form.items()},
        headers={"X-Forwarded-For": forwarded_for},
        timeout=30,
    )
    return r.status_code


def test_a_spoofed_forwarded_for_does_not_reset_the_playground_limit(untrusting: str) -> None:
    statuses = [submit(untrusting, f"10.0.0.{i}") for i in range(3)]
    assert statuses == [202, 202, 429]  # one client, whatever it claims to be


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit(behind_proxy: str) -> None:
    assert [submit(behind_proxy, f"10.0.0.{i}") for i in range(3)] == [202, 202, 202]
    assert submit(behind_proxy, "10.0.0.1") == 202
    assert submit(behind_proxy, "10.0.0.1") == 429  # the third from that one client
