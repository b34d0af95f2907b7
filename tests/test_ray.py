"""`fluxport ray`: a local Ray instance on the CPU serving flux.2-dummy from two Ray Serve replicas,
reached by a gateway as an OpenAI upstream. Skips with the reason where Ray cannot start."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fluxport.settings import UpstreamConfig
from fluxport.storage.db import Database
from tests.conftest import LiveServer, free_port, start_server

pytest.importorskip("ray.serve", reason="Ray is not installed (pip install 'fluxport[ray]')")


@pytest.fixture(scope="module")
def ray_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    data = tmp_path_factory.mktemp("ray-data")
    port = free_port()
    log = data / "ray.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUXPORT_", "FAL_", "REPLICATE_"))}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fluxport.cli",
                "ray",
                "--port",
                str(port),
                "--min-replicas",
                "2",
                "--max-replicas",
                "2",
                "--gpus-per-replica",
                "0",
                "--data-dir",
                str(data),
            ],
            env=env | {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while "FLUXPORT_UPSTREAMS=" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"Ray Serve did not start here: {log.read_text(errors='replace')[-800:]}")
            time.sleep(0.5)
        url = re.search(r'"base_url": "([^"]+)"', log.read_text()).group(1)  # type: ignore[union-attr]
        yield url, data
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _served_by_each(data: Path) -> dict[str, int]:
    """Succeeded requests in each replica's own database."""

    async def count(db_file: Path) -> int:
        db = await Database.open(f"sqlite+aiosqlite:///{db_file}")
        try:
            return sum(1 for r in await db.find_requests() if r.status == "succeeded")
        finally:
            await db.close()

    return {d.name: asyncio.run(count(d / "fluxport.db")) for d in sorted(data.glob("fluxport-ray-*"))}


def test_the_gateway_generates_through_two_ray_replicas(
    ray_workers: tuple[str, Path], tmp_path: Path
) -> None:
    url, data = ray_workers
    printed = (data / "ray.log").read_text()
    assert '"flux.2-dummy": "flux.2-dummy"' in printed and "2-2 replica(s)" in printed
    gateway: LiveServer = start_server(
        tmp_path,
        upstreams=[
            UpstreamConfig(name="ray", base_url=url, models={"flux.2-dev": "flux.2-dummy"}, max_concurrency=8)
        ],
    )
    try:
        client = gateway.client(timeout=120)
        results: list[Any] = []
        errors: list[BaseException] = []

        def one(i: int) -> None:
            try:
                results.append(
                    client.images.with_raw_response.generate(
                        model="flux.2-dev", prompt=f"ray {i}", size="256x256", extra_body={"provider": "ray"}
                    )
                )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert errors == [] and len(results) == 8
        assert {r.headers["x-fluxport-provider"] for r in results} == {"ray"}
        for raw in results:  # the gateway stored them: its links serve the images
            link = raw.parse().data[0].url
            assert httpx.get(link, timeout=10).status_code == 200
    finally:
        gateway.stop()
    # Both replicas did some of the work (Ray's router spreads requests by their queue lengths).
    served = _served_by_each(data)
    assert len(served) == 2 and sum(served.values()) == 8 and min(served.values()) >= 1, served
