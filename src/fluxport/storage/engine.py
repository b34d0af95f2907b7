"""Engines and migrations: SQLite pragmas, PostgreSQL schema set-up, Alembic to head at start."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, Engine, create_engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

__all__ = [
    "MIGRATIONS_DIR",
    "MIGRATION_WAIT_S",
    "PG_MIGRATION_LOCK",
    "SQLITE_BUSY_TIMEOUT_MS",
    "MigrationLockTimeout",
    "PoolSizing",
    "alembic_config",
    "make_engine",
    "migrate",
]

log = logging.getLogger("fluxport.storage")

MIGRATIONS_DIR: Final = Path(__file__).resolve().with_name("migrations")

# A process-wide writer waits this long for another process's SQLite write lock before failing.
SQLITE_BUSY_TIMEOUT_MS: Final = 30_000
# Serialises concurrent migrations on one PostgreSQL database (several servers starting at once).
PG_MIGRATION_LOCK: Final = 0x666C7578706F7274  # b"fluxport"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# How long a process waits for another one's migration before giving up (PostgreSQL).
MIGRATION_WAIT_S: Final = 300.0
# A wait for another process's migration shorter than this goes unsaid.
_QUIET_WAIT_S: Final = 1.0
# PostgreSQL's SQLSTATE lock_not_available: lock_timeout expired.
_LOCK_NOT_AVAILABLE: Final = "55P03"


@dataclass(frozen=True)
class PoolSizing:
    """PostgreSQL's connection pool, per process: `size` connections kept open, up to
    `max_overflow` more under load, and `timeout_s` a checkout waits for one before failing."""

    size: int = 10
    max_overflow: int = 20
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"pool size must be at least 1, not {self.size}")
        if self.max_overflow < 0:
            raise ValueError(f"pool max_overflow must be at least 0, not {self.max_overflow}")
        if not self.timeout_s > 0:
            raise ValueError(f"pool timeout must be above 0 s, not {self.timeout_s}")


class MigrationLockTimeout(RuntimeError):
    """Another process held the migration lock for longer than this one would wait."""


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


def make_engine(url: str | URL, *, schema: str | None = None, pool: PoolSizing | None = None) -> AsyncEngine:
    """Create the async engine: SQLite gets its parent dir and pragmas, PostgreSQL a pool sized by
    `pool` (default PoolSizing()) and an optional schema."""
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
        pool = pool or PoolSizing()
        kwargs |= {
            "pool_size": pool.size,
            "max_overflow": pool.max_overflow,
            "pool_timeout": pool.timeout_s,
        }
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


async def migrate(engine: AsyncEngine, schema: str | None, *, wait_s: float = MIGRATION_WAIT_S) -> None:
    """Upgrade the database to the latest revision, one process at a time; on PostgreSQL a process
    that finds another one migrating says so and waits for it up to `wait_s`."""
    if engine.dialect.name != "sqlite":
        await _migrate_once(engine, schema, wait_s)
        return
    # Switching a fresh SQLite file to WAL upgrades a read lock to a write lock, and SQLite answers
    # "database is locked" at once, without waiting busy_timeout, when another process holds the
    # write lock meanwhile (its deadlock rule): several servers starting together on a new file.
    # The migration is idempotent; try again until the other process is done.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.05
    while True:
        try:
            await _migrate_once(engine, schema, wait_s)
            return
        except OperationalError as exc:
            if "database is locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def _pg_migration_lock(conn: AsyncConnection, wait_s: float) -> None:
    """Take the migration lock for this transaction; if another process holds it (a replica
    migrating), log that once and wait for it, at most `wait_s` in all."""
    key = {"k": PG_MIGRATION_LOCK}
    started = time.monotonic()
    deadline = started + wait_s
    # Workers and replicas starting together each take the lock for a migration that finds
    # nothing to do, in milliseconds: only a wait longer than that is worth a log line.
    quiet_until = started + min(_QUIET_WAIT_S, wait_s)
    while True:
        if (await conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), key)).scalar_one():
            return
        if time.monotonic() >= quiet_until:
            break
        await asyncio.sleep(0.05)
    log.warning(
        "waiting for another fluxport process to finish migrating the database (at most %g s)",
        wait_s,
    )
    # lock_timeout bounds the wait on the server; it is reset once the lock is ours, so that the
    # migration's own statements wait as long as they need.
    left_ms = max(1, round((deadline - time.monotonic()) * 1000))
    await conn.execute(text("SELECT set_config('lock_timeout', :t, true)"), {"t": f"{left_ms}ms"})
    try:
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), key)
    except DBAPIError as exc:
        code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if code != _LOCK_NOT_AVAILABLE:
            raise
        raise MigrationLockTimeout(
            f"another fluxport process has been migrating the database for more than {wait_s:g} s "
            "(it holds the migration lock); if none is running, look for a stuck session in "
            "pg_stat_activity, or raise FLUXPORT_DATABASE_MIGRATION_WAIT_S"
        ) from exc
    await conn.exec_driver_sql("SET LOCAL lock_timeout TO DEFAULT")
    log.warning("the other migration finished after %.1f s; going on", time.monotonic() - started)


async def _migrate_once(engine: AsyncEngine, schema: str | None, wait_s: float) -> None:
    async with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            # Take the write lock before Alembic reads the version table, so that two processes
            # opening a fresh file at once do not both try to create the tables.
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            await _pg_migration_lock(conn, wait_s)
            if schema is not None:
                await conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.run_sync(_upgrade_to_head)
