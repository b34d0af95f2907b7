"""Relational storage: every request, every provider attempt, every saved image, the API keys and
the idempotency keys (SQLAlchemy 2 Core, async).

Where things are: the tables in `schema.py`, engines and migrations in `engine.py`, the records
handed out in `records.py`, the queries in one repository per table family (`repos/`) and the
statistics in `stats.py`. `Database` puts them together over one engine.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from fluxport.storage.engine import (
    MIGRATION_WAIT_S,
    MigrationLockTimeout,
    PoolSizing,
    alembic_config,
    make_engine,
    migrate,
    sync_sqlite_engine,
)
from fluxport.storage.records import (
    ATTEMPT_STATUSES,
    INTERRUPTED_ERROR,
    OPERATIONS,
    REQUEST_STATUSES,
    ApiKeyRow,
    AttemptRow,
    AttemptStats,
    AttemptStatus,
    IdempotencyRow,
    ImageRow,
    Operation,
    RequestRow,
    RequestStatus,
    UsageTotals,
)
from fluxport.storage.repos.idempotency import IdempotencyRepository
from fluxport.storage.repos.keys import KeyRepository
from fluxport.storage.repos.requests import RequestRepository
from fluxport.storage.schema import metadata
from fluxport.storage.stats import StatsQueries
from fluxport.storage.writer import GroupCommit

if TYPE_CHECKING:
    from fluxport.settings import Settings

__all__ = [
    "ATTEMPT_STATUSES",
    "INTERRUPTED_ERROR",
    "OPERATIONS",
    "REQUEST_STATUSES",
    "ApiKeyRow",
    "AttemptRow",
    "AttemptStats",
    "AttemptStatus",
    "Database",
    "IdempotencyRow",
    "ImageRow",
    "MigrationLockTimeout",
    "Operation",
    "PoolSizing",
    "RequestRow",
    "RequestStatus",
    "UsageTotals",
    "alembic_config",
    "make_engine",
    "metadata",
]


class Database(RequestRepository, KeyRepository, IdempotencyRepository, StatsQueries):
    """Async data access over one engine: every repository's methods on one object, so that callers
    hold a single `db` (the repositories share its sessions, its write lock and its group commit).

    The writes every request makes (create_request, start_attempt, finish_attempt, add_images,
    finish_request, ...) are queued when called and return a future that completes once they are
    committed: writes made in one go share a transaction (storage/writer.py).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer per file: queueing our own writers here is cheaper than SQLite's
        # busy-wait backoff; busy_timeout still covers other processes (CLI, a second server).
        write_lock = asyncio.Lock() if sqlite else None
        # The records every request writes go through group commit (storage/writer.py); SQLite's
        # batches run on the synchronous driver in one thread.
        writer = GroupCommit.for_engine(
            engine, (lambda: sync_sqlite_engine(engine.url)) if sqlite else None, write_lock
        )
        super().__init__(async_sessionmaker(engine, expire_on_commit=False), writer, write_lock)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        schema: str | None = None,
        pool: PoolSizing | None = None,
        migration_wait_s: float = MIGRATION_WAIT_S,
    ) -> Database:
        """Connect and migrate to head; `schema` (PostgreSQL only) isolates tables, e.g. per test run.
        `pool` sizes PostgreSQL's connection pool; `migration_wait_s` bounds the wait for another
        process's migration (PostgreSQL: MigrationLockTimeout)."""
        engine = make_engine(url, schema=schema, pool=pool)
        try:
            await migrate(engine, schema, wait_s=migration_wait_s)
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine)

    @classmethod
    async def from_settings(cls, settings: Settings) -> Database:
        """The database the settings name, with their pool sizing and migration wait."""
        return await cls.open(
            settings.resolved_database_url,
            pool=settings.database_pool,
            migration_wait_s=settings.database_migration_wait_s,
        )

    async def close(self) -> None:
        await self._writer.aclose()
        await self.engine.dispose()
