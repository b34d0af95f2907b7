"""The whole service on PostgreSQL (FLUXPORT_DATABASE_URL), when a server is reachable."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from fluxport.storage.db import Database
from tests.conftest import start_server

PG_URL = os.environ.get("FLUXPORT_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


def _reachable() -> str | None:
    async def probe() -> None:
        import asyncpg

        conn = await asyncpg.connect(PG_URL.replace("postgresql+asyncpg", "postgresql"), timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_URL}: {exc!r}"
    return None


def test_serve_on_postgres(tmp_path: Path) -> None:
    reason = _reachable()
    if reason:
        pytest.skip(reason)
    live = start_server(tmp_path, database_url=PG_URL)
    try:
        raw = live.client().images.with_raw_response.generate(
            model="flux.2-dummy", prompt="on postgres", size="256x256", response_format="url"
        )
        request_id = raw.headers["x-request-id"]
    finally:
        live.stop()

    async def fetch():  # type: ignore[no-untyped-def]
        db = await Database.open(PG_URL)
        try:
            return await db.get_request(request_id), await db.list_images(request_id)
        finally:
            await db.close()

    row, images = asyncio.run(fetch())
    assert row is not None and row.status == "succeeded" and row.provider == "local"
    assert len(images) == 1 and (tmp_path / "images" / images[0].path).exists()
