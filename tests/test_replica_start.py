"""A real `fluxport serve` that starts on PostgreSQL while another process migrates the database:
it says it is waiting, does not serve meanwhile, then comes up and serves once the lock is free.

The other process is this test, holding the migration lock in an open transaction on its own
connection. Skips with the reason where PostgreSQL is not reachable.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import openai
import pytest

from fluxport.storage.db import Database
from fluxport.storage.engine import PG_MIGRATION_LOCK
from tests.serveproc import healthy, start, stop, wait_ready
from tests.services import free_port
from tests.storage_targets import fresh_database, probe_postgres

WAITING = "waiting for another fluxport process to finish migrating the database"


def _generate(port: int) -> str:
    """One generation through the openai SDK; the request's id."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    raw = client.images.with_raw_response.generate(
        model="flux.2-dummy", prompt="after the wait", size="256x256", response_format="b64_json"
    )
    image = raw.parse().data
    assert image and image[0].b64_json
    return raw.headers["x-request-id"]


async def test_a_replica_started_mid_migration_waits_then_serves(tmp_path: Path) -> None:
    if (reason := await probe_postgres()) is not None:
        pytest.skip(reason)
    async with fresh_database() as url:
        holder = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        await holder.execute("BEGIN")
        await holder.execute("SELECT pg_advisory_xact_lock($1)", PG_MIGRATION_LOCK)

        port, log = free_port(), tmp_path / "replica.log"
        proc = start(tmp_path / "data", port, log, strip_prefixes=("FLUXPORT_",), FLUXPORT_DATABASE_URL=url)
        try:
            deadline = time.monotonic() + 60
            while WAITING not in log.read_text(errors="replace"):
                assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
                assert time.monotonic() < deadline, f"no {WAITING!r} in the log"
                await asyncio.sleep(0.1)
            for _ in range(10):  # a second of waiting: alive, and not serving
                assert proc.poll() is None
                assert not await asyncio.to_thread(healthy, port)
                await asyncio.sleep(0.1)

            await holder.execute("ROLLBACK")  # the other process's migration is over
            await holder.close()
            await asyncio.to_thread(wait_ready, proc, port, log, 60)
            text = log.read_text(errors="replace")
            assert text.count(WAITING) == 1 and "the other migration finished" in text

            request_id = await asyncio.to_thread(_generate, port)
        finally:
            await asyncio.to_thread(stop, proc)
            if not holder.is_closed():
                await holder.close()

        db = await Database.open(url)
        try:
            row = await db.get_request(request_id)
            assert row is not None and row.status == "succeeded" and row.provider == "local"
            assert len(await db.list_images(request_id)) == 1
        finally:
            await db.close()
