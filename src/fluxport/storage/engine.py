"""Engines and migrations: SQLite pragmas, PostgreSQL schema set-up, Alembic to head at start."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, Engine, create_engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

__all__ = ["MIGRATIONS_DIR", "SQLITE_BUSY_TIMEOUT_MS", "alembic_config", "make_engine", "migrate"]

MIGRATIONS_DIR: Final = Path(__file__).resolve().with_name("migrations")

# A process-wide writer waits this long for another process's SQLite write lock before failing.
SQLITE_BUSY_TIMEOUT_MS: Final = 30_000
# Serialises concurrent migrations on one PostgreSQL database (several servers starting at once).
_PG_MIGRATION_LOCK: Final = 0x666C7578706F7274  # b"fluxport"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # busy_timeout first: switching to WAL itself needs a lock another process may hold.
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # WAL: readers (stats, image fetches) never block the writer, nor the writer them.
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL loses nothing when the process dies (kill -9), only on power loss, and
    # spares an fsync per commit: several commits per request add up under load.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str | URL, *, schema: str | None = None) -> AsyncEngine:
    """Create the async engine: SQLite gets its parent dir and pragmas, PostgreSQL an optional schema."""
    sa_url = make_url(url)
    backend = sa_url.get_backend_name()
    kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        if schema is not None:
            raise ValueError("schema= is only supported on PostgreSQL")
        database = sa_url.database
        if not database or database == ":memory:" or sa_url.query.get("mode") == "memory":
            # Each pooled connection would see its own empty database (and miss the migrations).
            raise ValueError("in-memory SQLite is not supported; use a file (a tmp dir in tests)")
        if not sa_url.query.get("uri"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    elif backend == "postgresql":
        kwargs["pool_pre_ping"] = True  # survive server restarts and idle-connection reaping
        if schema is not None:
            if not _SCHEMA_NAME.fullmatch(schema):
                raise ValueError(f"invalid schema name {schema!r}")
            if sa_url.get_driver_name() == "asyncpg":
                kwargs["connect_args"] = {"server_settings": {"search_path": schema}}
            else:
                kwargs["connect_args"] = {"options": f"-csearch_path={schema}"}
    elif schema is not None:
        raise ValueError("schema= is only supported on PostgreSQL")
    engine = create_async_engine(sa_url, **kwargs)
    if backend == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    return engine


def sync_sqlite_engine(url: URL) -> Engine:
    """The same SQLite file through the synchronous driver, with the same pragmas."""
    engine = create_engine(url.set(drivername="sqlite+pysqlite"))
    event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def alembic_config() -> Config:
    """An Alembic config built in code, so that no alembic.ini is needed at runtime."""
    cfg = Config()
    # configparser interpolates '%'.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return cfg


def _upgrade_to_head(connection: Connection) -> None:
    cfg = alembic_config()
    # env.py runs on this connection instead of opening its own (and calling asyncio.run).
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


async def migrate(engine: AsyncEngine, schema: str | None) -> None:
    """Upgrade the database to the latest revision, one process at a time."""
    if engine.dialect.name != "sqlite":
        await _migrate_once(engine, schema)
        return
    # Switching a fresh SQLite file to WAL upgrades a read lock to a write lock, and SQLite answers
    # "database is locked" at once, without waiting busy_timeout, when another process holds the
    # write lock meanwhile (its deadlock rule): several servers starting together on a new file.
    # The migration is idempotent; try again until the other process is done.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.05
    while True:
        try:
            await _migrate_once(engine, schema)
            return
        except OperationalError as exc:
            if "database is locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def _migrate_once(engine: AsyncEngine, schema: str | None) -> None:
    async with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            # Take the write lock before Alembic reads the version table, so that two processes
            # opening a fresh file at once do not both try to create the tables.
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            if schema is not None:
                await conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.run_sync(_upgrade_to_head)
