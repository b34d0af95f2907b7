"""The databases the storage tests run on: a SQLite file, and a fresh schema on the real PostgreSQL.

Every test that takes the `target` fixture (tests/conftest.py) runs once per backend; the
PostgreSQL run skips, saying where it looked, when no server answers there.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from fluxport.storage.db import Database, PoolSizing, make_engine

__all__ = ["PG_URL", "Target", "drop_schema", "fresh_database", "probe_postgres", "storage_target"]

PG_URL = os.environ.get("FLUXPORT_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgresql")
_pg_unreachable: list[str | None] = []  # cached across tests: one probe per run


async def probe_postgres() -> str | None:
    """None if PostgreSQL answers, else the reason to skip."""
    if _pg_unreachable:
        return _pg_unreachable[0]
    url = make_url(PG_URL)
    where = f"{url.host}:{url.port or 5432}"
    reason: str | None = None
    engine = make_engine(PG_URL)
    try:
        async with asyncio.timeout(5), engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")
    except Exception as exc:  # any failure to connect means: skip, saying why
        reason = f"PostgreSQL not reachable at {where}: {exc!r}"
    finally:
        await engine.dispose()
    _pg_unreachable.append(reason)
    return reason


@dataclass(frozen=True)
class Target:
    """Where one test's database lives: `url`, and on PostgreSQL the test's own `schema`."""

    backend: str
    url: str
    schema: str | None

    async def open(self, *, pool: PoolSizing | None = None, migration_wait_s: float = 300.0) -> Database:
        return await Database.open(self.url, schema=self.schema, pool=pool, migration_wait_s=migration_wait_s)


async def drop_schema(schema: str) -> None:
    engine = make_engine(PG_URL)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await engine.dispose()


@asynccontextmanager
async def storage_target(backend: str, tmp_path: Path) -> AsyncIterator[Target | str]:
    """An empty database on `backend`: a file in a tmp dir that does not exist yet (open must
    create it), or a fresh PostgreSQL schema dropped afterwards. Yields the reason to skip instead
    when PostgreSQL is unreachable."""
    if backend == "sqlite":
        yield Target("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'data' / 'fluxport.db'}", None)
        return
    reason = await probe_postgres()
    if reason is not None:
        yield reason
        return
    schema = f"fluxport_test_{secrets.token_hex(6)}"
    try:
        yield Target("postgresql", PG_URL, schema)
    finally:
        await drop_schema(schema)


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_URL.replace("postgresql+asyncpg", "postgresql"), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """The URL of a new, empty PostgreSQL database (a whole one: for what cannot take a schema,
    such as settings and real server processes), dropped afterwards."""
    name = f"fptest_{secrets.token_hex(6)}"
    await _admin(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
