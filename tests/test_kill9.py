"""kill -9 of a real `fluxport serve` mid-generation; after a restart every request is terminal, no
temp file remains, every image record has its file and every file its record."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import httpx

from fluxport.settings import Settings
from fluxport.storage.blobs import TEMP_SUFFIX
from fluxport.storage.db import Database
from tests.conftest import free_port
from tests.serveproc import serve, stop

TERMINAL = {"succeeded", "failed", "rejected", "interrupted", "dry_run"}


async def inspect(data_dir: Path) -> tuple[list[str], list[tuple[str, str]], set[str], list[Path]]:
    settings = Settings(data_dir=data_dir)
    db = await Database.open(settings.resolved_database_url)
    try:
        requests = await db.find_requests(limit=10_000)
        images = [(i[0], i[2]) for i in await db.image_paths()]
    finally:
        await db.close()
    root = settings.images_dir
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    temps = [p for p in root.rglob(f"*{TEMP_SUFFIX}")]
    return [r.status for r in requests], images, files, temps


def test_kill_9_mid_generation_then_restart_leaves_everything_terminal(tmp_path: Path) -> None:
    data = tmp_path / "data"
    log = tmp_path / "server.log"
    port = free_port()
    proc = serve(data, port, log, FLUXPORT_DUMMY_STEPS="30")
    api = f"http://127.0.0.1:{port}/v1/images/generations"
    try:
        # One small request that finishes, so there are images on disk and in the database.
        done = httpx.post(api, json={"model": "flux.2-dummy", "prompt": "ok", "size": "256x256"}, timeout=120)
        assert done.status_code == 200, done.text

        outcomes: list[object] = []

        def slow(i: int) -> None:
            body = {"model": "flux.2-dummy", "prompt": f"slow {i}", "size": "2048x2048", "n": 8}
            try:
                outcomes.append(httpx.post(api, json=body, timeout=300).status_code)
            except httpx.TransportError as exc:  # the server is killed under it
                outcomes.append(exc)

        threads = [threading.Thread(target=slow, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        # Kill once at least one request is running (its record is written before it starts).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            statuses, *_ = asyncio.run(inspect(data))
            if statuses.count("running") + statuses.count("queued") >= 2:
                break
            time.sleep(0.2)
        time.sleep(1.5)  # well into the denoising loop
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        for t in threads:
            t.join(timeout=30)
        assert all(not isinstance(o, int) or o != 200 for o in outcomes), "killed before any finished"

        before, *_ = asyncio.run(inspect(data))
        assert {"running", "queued"} & set(before), f"nothing was in flight at the kill: {before}"

        proc = serve(
            data, port, log, FLUXPORT_DUMMY_STEPS="30"
        )  # restart on the same data dir: repair runs before serving
        statuses, images, files, temps = asyncio.run(inspect(data))
        assert statuses and all(s in TERMINAL for s in statuses), statuses
        assert statuses.count("interrupted") >= 1
        assert not temps, temps
        recorded = {path for _, path in images}
        assert recorded <= files, f"records without a file: {recorded - files}"
        assert files <= recorded, f"files without a record: {files - recorded}"
        for image_id, path in images:
            ext = path.rsplit(".", 1)[1]
            got = httpx.get(f"http://127.0.0.1:{port}/images/{image_id}.{ext}", timeout=10)
            assert got.status_code == 200
        # The restarted server serves new requests.
        again = httpx.post(
            api, json={"model": "flux.2-dummy", "prompt": "after", "size": "256x256"}, timeout=120
        )
        assert again.status_code == 200, again.text
    finally:
        stop(proc)
