"""Link expiry (expires_at, 404 after it, the sweep) and crash repair at start-up; what works on
the database directly runs on SQLite and on PostgreSQL (the `target` fixture)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from fluxport.settings import Settings
from fluxport.storage.blobs import LocalBlobStore
from fluxport.storage.db import Database, ImageRow
from fluxport.storage.repair import repair_on_start, sweep_expired
from tests.conftest import start_server
from tests.storage_targets import Target

DUMMY = {"model": "flux.2-dummy", "prompt": "a red square", "size": "256x256"}


def test_links_expire_and_the_sweep_deletes_the_files(tmp_path: Path) -> None:
    live = start_server(tmp_path, image_ttl_s=3, dummy_steps=1)
    try:
        t0 = time.time()
        r = httpx.post(f"{live.api}/images/generations", json=DUMMY, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["expires_at"] == body["created"] + 3
        assert t0 - 1 <= body["created"] <= time.time()
        url = body["data"][0]["url"]
        got = httpx.get(url)
        assert got.status_code == 200 and got.content.startswith(b"\x89PNG")
        assert int(got.headers["cache-control"].rsplit("=", 1)[1]) <= 3

        b64 = httpx.post(
            f"{live.api}/images/generations", json={**DUMMY, "response_format": "b64_json"}, timeout=120
        ).json()
        assert "expires_at" not in b64

        files = list((tmp_path / "images").rglob("*.png"))
        assert len(files) == 2  # b64_json images are stored too, and expire alike
        while time.time() < body["expires_at"]:
            time.sleep(0.1)
        gone = httpx.get(url)
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "expired"
        assert "expired" in gone.json()["error"]["message"]
        deadline = time.monotonic() + 10
        while any(f.exists() for f in files) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(f.exists() for f in files), "the sweep deletes expired files"
        assert httpx.get(url).json()["error"]["code"] == "expired"  # the record is kept
    finally:
        live.stop()


async def test_sweep_deletes_only_what_expired_since_the_last_sweep(tmp_path: Path, target: Target) -> None:
    db = await target.open()
    blobs = LocalBlobStore(tmp_path / "images")
    try:
        await db.create_request(id="r1", model="m", operation="generate", prompt="p", params={}, n=2)
        now = datetime.now(UTC)
        rows = []
        for i, age in enumerate((100, 5)):
            path = await blobs.save(f"img{i}", b"x", "png")
            rows.append(
                ImageRow(f"img{i}", "r1", i, path, "png", "image/png", 1, 1, 1, now - timedelta(seconds=age))
            )
        await db.add_images(rows)
        deleted, cutoff = await sweep_expired(db, blobs, ttl_s=50, since=None)
        assert deleted == 1
        assert not blobs.exists(rows[0].path) and blobs.exists(rows[1].path)
        assert await db.get_image("img0") is not None  # records are kept
        deleted, _ = await sweep_expired(db, blobs, ttl_s=50, since=cutoff)
        assert deleted == 0
    finally:
        await db.close()


async def _seed_inconsistent_data_dir(data_dir: Path) -> dict[str, str]:
    """A data dir (its SQLite database and images) as a crash could leave it."""
    settings = Settings(data_dir=data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    return await _seed_inconsistent(await Database.open(settings.resolved_database_url), settings.images_dir)


async def _seed_inconsistent(db: Database, images_dir: Path) -> dict[str, str]:
    """A database and image files as a crash could leave them; returns the interesting paths.
    Closes `db`."""
    blobs = LocalBlobStore(images_dir)
    try:
        await db.create_request(
            id="req_run",
            model="flux.2-dummy",
            operation="generate",
            prompt="p",
            params={},
            n=1,
            status="running",
        )
        await db.create_request(
            id="req_queued", model="flux.2-dummy", operation="generate", prompt="p", params={}, n=1
        )
        await db.create_request(
            id="req_ok", model="flux.2-dummy", operation="generate", prompt="p", params={}, n=4
        )
        good = await blobs.save("good-image-0000000000000000", b"\x89PNG good", "png")
        lost = blobs.relative_path("lost-image-0000000000000000", "png")  # recorded, never written
        old = await blobs.save("old-image-00000000000000000", b"\x89PNG old", "png")
        orphan = await blobs.save("orphan-image-00000000000000", b"\x89PNG orphan", "png")
        # Renamed into place, then a power cut before its fsync: fewer bytes than recorded.
        torn = await blobs.save("torn-image-0000000000000000", b"\x89PNG", "png")
        await db.add_images(
            [
                ImageRow("good-image-0000000000000000", "req_ok", 0, good, "png", "image/png", 1, 1, 9),
                ImageRow("lost-image-0000000000000000", "req_ok", 1, lost, "png", "image/png", 1, 1, 9),
                ImageRow(
                    "old-image-00000000000000000",
                    "req_ok",
                    2,
                    old,
                    "png",
                    "image/png",
                    1,
                    1,
                    9,
                    datetime.now(UTC) - timedelta(days=30),
                ),
                ImageRow("torn-image-0000000000000000", "req_ok", 3, torn, "png", "image/png", 1, 1, 9),
            ]
        )
        await db.finish_request(
            "req_ok",
            status="succeeded",
            provider="local",
            error=None,
            queued_ms=None,
            generation_ms=None,
            ttfb_ms=None,
            total_ms=None,
            width=1,
            height=1,
            images=4,
            revised_prompt=None,
        )
    finally:
        await db.close()
    shard = blobs.resolve(good).parent
    temp = shard / ".x.png.abc123.tmp"
    temp.write_bytes(b"half an ima")
    return {"good": good, "lost": lost, "old": old, "orphan": orphan, "torn": torn, "temp": str(temp)}


async def test_repair_on_start_fixes_every_inconsistency(
    tmp_path: Path, target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    paths = await _seed_inconsistent(await target.open(), tmp_path / "images")
    db = await target.open()
    blobs = LocalBlobStore(tmp_path / "images")
    try:
        with caplog.at_level(logging.INFO, logger="fluxport.repair"):
            report = await repair_on_start(db, blobs, ttl_s=24 * 3600)
        assert report.interrupted == 2
        assert report.temp_files == 1
        assert report.orphan_files == 1
        assert report.missing_files == 2
        assert report.expired_files == 1
        assert report.damaged_requests == {"req_ok": 2}
        assert "request req_ok lost 2 of its 4 images" in caplog.text
        assert "2 requests left in flight" in caplog.text
        assert not Path(paths["temp"]).exists()  # noqa: ASYNC240
        assert not blobs.exists(paths["orphan"])
        assert not blobs.exists(paths["torn"])
        assert await db.get_image("torn-image-0000000000000000") is None
        assert not blobs.exists(paths["old"])
        assert blobs.exists(paths["good"])
        assert await db.get_image("lost-image-0000000000000000") is None
        assert await db.get_image("good-image-0000000000000000") is not None
        assert await db.get_image("old-image-00000000000000000") is not None  # expired: record kept
        for rid in ("req_run", "req_queued"):
            row = await db.get_request(rid)
            assert row is not None and row.status == "interrupted"
        # A second run finds nothing left to do.
        again = await repair_on_start(db, blobs, ttl_s=24 * 3600)
        assert (again.interrupted, again.temp_files, again.orphan_files, again.missing_files) == (0, 0, 0, 0)
    finally:
        await db.close()


def test_a_server_started_on_a_damaged_data_dir_repairs_it_before_serving(tmp_path: Path) -> None:
    paths = asyncio.run(_seed_inconsistent_data_dir(tmp_path))
    live = start_server(tmp_path)
    try:
        blobs = LocalBlobStore(tmp_path / "images")
        assert not Path(paths["temp"]).exists()
        assert not blobs.exists(paths["orphan"])
        assert not blobs.exists(paths["torn"])
        torn = httpx.get(f"{live.url}/images/torn-image-0000000000000000.png")
        assert torn.status_code == 404 and torn.json()["error"]["code"] == "not_found"
        assert httpx.get(f"{live.url}/images/good-image-0000000000000000.png").status_code == 200
        lost = httpx.get(f"{live.url}/images/lost-image-0000000000000000.png")
        assert lost.status_code == 404 and lost.json()["error"]["code"] == "not_found"
        old = httpx.get(f"{live.url}/images/old-image-00000000000000000.png")
        assert old.status_code == 404 and old.json()["error"]["code"] == "expired"
    finally:
        live.stop()
