"""Storage tests: the database against SQLite and a real PostgreSQL, and the blob store on disk."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, cast

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic import ValidationError
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import QueuePool

from fluxport.settings import Settings
from fluxport.storage.blobs import TEMP_SUFFIX, LocalBlobStore, new_image_id
from fluxport.storage.db import (
    INTERRUPTED_ERROR,
    Database,
    ImageRow,
    MigrationLockTimeout,
    PoolSizing,
    alembic_config,
    make_engine,
    metadata,
)
from fluxport.storage.engine import PG_MIGRATION_LOCK
from tests.storage_targets import PG_URL, Target, fresh_database, probe_postgres


@pytest.fixture
async def db(target: Target) -> AsyncIterator[Database]:
    database = await target.open()
    try:
        yield database
    finally:
        await database.close()


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


async def _scalar(db: Database, sql: str, **params: Any) -> Any:
    async with db.engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar_one()


async def _new_request(db: Database, rid: str | None = None, **overrides: Any) -> str:
    rid = rid or f"req_{secrets.token_hex(8)}"
    fields: dict[str, Any] = {
        "model": "flux.2-dev",
        "operation": "generate",
        "prompt": "a lighthouse at dusk",
        "params": {"size": "1024x1024", "seed": 7, "output_format": "png"},
        "n": 1,
    }
    fields.update(overrides)
    await db.create_request(id=rid, **fields)
    return rid


async def _finish_ok(db: Database, rid: str, **overrides: Any) -> None:
    fields: dict[str, Any] = {
        "status": "succeeded",
        "provider": "local",
        "error": None,
        "queued_ms": 1.5,
        "generation_ms": 900.25,
        "ttfb_ms": 901.0,
        "total_ms": 950.5,
        "width": 1024,
        "height": 768,
        "images": 1,
        "revised_prompt": None,
    }
    fields.update(overrides)
    await db.finish_request(rid, **fields)


def _assert_recent_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - value) < timedelta(minutes=1)


# Migrations


async def test_migrations_create_tables_and_are_idempotent(target: Target) -> None:
    db = await target.open()
    try:

        def describe(conn: Connection) -> tuple[set[str], set[str]]:
            insp = inspect(conn)
            tables = set(insp.get_table_names())
            indexes = {
                ix["name"] or "" for t in ("requests", "attempts", "images") for ix in insp.get_indexes(t)
            }
            return tables, indexes

        async with db.engine.connect() as conn:
            tables, indexes = await conn.run_sync(describe)
        assert {"requests", "attempts", "images", "alembic_version"} <= tables
        assert {
            "ix_requests_model_created_at",
            "ix_requests_status",
            "ix_attempts_model_provider_started_at",
            "ix_attempts_request_id",
            "ix_images_request_id",
        } <= indexes
        assert await _scalar(db, "SELECT version_num FROM alembic_version") == _head()
        rid = await _new_request(db)
    finally:
        await db.close()

    # Opening again migrates nothing and keeps the data.
    again = await target.open()
    try:
        assert await _scalar(again, "SELECT count(*) FROM alembic_version") == 1
        row = await again.get_request(rid)
        assert row is not None and row.status == "queued"
    finally:
        await again.close()


async def test_migrations_match_the_models(db: Database) -> None:
    """The ORM classes and the latest migration describe the same schema."""

    def diff(conn: Connection) -> list[Any]:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, metadata))

    async with db.engine.connect() as conn:
        assert await conn.run_sync(diff) == []


async def test_concurrent_open_of_a_fresh_database(target: Target) -> None:
    """Servers starting at once on an empty database must not both create the tables, nor fail
    (on SQLite, switching a new file to WAL meets the others' write lock: "database is locked")."""
    dbs = await asyncio.gather(*(target.open() for _ in range(6)))
    try:
        assert await _scalar(dbs[0], "SELECT version_num FROM alembic_version") == _head()
        assert await _scalar(dbs[0], "SELECT count(*) FROM alembic_version") == 1

        def diff(conn: Connection) -> list[Any]:
            return list(compare_metadata(MigrationContext.configure(conn), metadata))

        async with dbs[-1].engine.connect() as conn:
            assert await conn.run_sync(diff) == []  # every table once, as the models say
        await asyncio.gather(*(_new_request(d) for d in dbs))
        assert await _scalar(dbs[0], "SELECT count(*) FROM requests") == 6
    finally:
        for d in dbs:
            await d.close()


# Migrations down and up again (every revision's downgrade, on both backends)

# The tables the migrations own (alembic_version, Alembic's, stays behind after "base").
FLUXPORT_TABLES = frozenset(metadata.tables)
Schema = dict[str, dict[str, Any]]


def _revisions() -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory.from_config(alembic_config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def _describe(conn: Connection) -> Schema:
    """What a revision leaves: per table its columns (type, nullability), indexes, unique and
    foreign keys."""
    insp = inspect(conn)
    out: Schema = {}
    for table in sorted(set(insp.get_table_names()) - {"alembic_version"}):
        out[table] = {
            "columns": {c["name"]: (str(c["type"]), c["nullable"]) for c in insp.get_columns(table)},
            "indexes": sorted(
                (ix["name"] or "", tuple(ix["column_names"])) for ix in insp.get_indexes(table)
            ),
            "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(table)),
            "foreign_keys": sorted(
                (tuple(fk["constrained_columns"]), fk["referred_table"])
                for fk in insp.get_foreign_keys(table)
            ),
            "primary_key": tuple(insp.get_pk_constraint(table)["constrained_columns"]),
        }
    return out


class Migrator:
    """Alembic's commands on one engine, each in its own transaction, as `Database.open` runs them."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.engine = make_engine(target.url, schema=target.schema)

    async def run(self, command_name: str, revision: str) -> Schema:
        from alembic import command

        def go(connection: Connection) -> Schema:
            cfg = alembic_config()
            cfg.attributes["connection"] = connection
            getattr(command, command_name)(cfg, revision)
            return _describe(connection)

        async with self.engine.begin() as conn:
            if self.target.schema is not None:
                await conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{self.target.schema}"')
            return await conn.run_sync(go)

    async def version(self) -> str | None:
        def current(connection: Connection) -> str | None:
            return MigrationContext.configure(connection).get_current_revision()

        async with self.engine.connect() as conn:
            return await conn.run_sync(current)

    async def diff_from_models(self) -> list[Any]:
        def diff(conn: Connection) -> list[Any]:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, metadata))

        async with self.engine.connect() as conn:
            return await conn.run_sync(diff)

    async def scalar(self, sql: str) -> Any:
        async with self.engine.connect() as conn:
            return (await conn.exec_driver_sql(sql)).scalar_one()

    async def close(self) -> None:
        await self.engine.dispose()


async def test_migrations_go_down_to_base_and_up_again(target: Target) -> None:
    """head -> base leaves none of fluxport's tables; base -> head matches the models again."""
    migrator = Migrator(target)
    try:
        at_head = await migrator.run("upgrade", "head")
        assert set(at_head) == FLUXPORT_TABLES
        assert await migrator.diff_from_models() == []

        at_base = await migrator.run("downgrade", "base")
        assert at_base == {}
        assert await migrator.version() is None
        assert await migrator.scalar("SELECT count(*) FROM alembic_version") == 0

        again = await migrator.run("upgrade", "head")
        assert again == at_head
        assert await migrator.version() == _head()
        assert await migrator.diff_from_models() == []
    finally:
        await migrator.close()


async def test_each_downgrade_restores_the_schema_before_its_revision(target: Target) -> None:
    """Up one revision at a time, then down one at a time: each step down gives back exactly the
    schema the step up started from, and keeps the rows the older schema has room for."""
    revisions = _revisions()
    assert revisions[0] == "0001" and revisions[-1] == _head()
    migrator = Migrator(target)
    try:
        schemas: dict[str, Schema] = {}
        for revision in revisions:
            schemas[revision] = await migrator.run("upgrade", revision)
            assert await migrator.version() == revision
        assert set(schemas["0001"]) == {"requests", "attempts", "images"}
        assert "cost_usd" not in schemas["0001"]["requests"]["columns"]
        assert "cost_usd" in schemas["0002"]["requests"]["columns"]
        assert {"api_keys", "idempotency"} <= set(schemas["0003"])
        assert "api_key_id" in schemas["0003"]["requests"]["columns"]
        assert await migrator.diff_from_models() == []

        # A request with an attempt and an image, recorded at head, as a running server would.
        db = await target.open()
        try:
            rid = await _new_request(db)
            attempt = await db.start_attempt(request_id=rid, provider="local", model="flux.2-dev")
            await db.add_images([_image(rid, 0)])
            await _finish_ok(db, rid, cost_usd=0.25)
        finally:
            await db.close()

        for older, newer in reversed(list(zip([None, *revisions[:-1]], revisions, strict=True))):
            schema = await migrator.run("downgrade", older or "base")
            assert await migrator.version() == older
            assert schema == (schemas[older] if older else {}), f"downgrade of {newer}"
            if older is not None:
                # Dropping a column must not take the rows with it (nor cascade to their children).
                assert await migrator.scalar(f"SELECT count(*) FROM requests WHERE id = '{rid}'") == 1
                assert await migrator.scalar(f"SELECT count(*) FROM attempts WHERE id = {attempt}") == 1
                assert await migrator.scalar("SELECT count(*) FROM images") == 1

        for revision in revisions:
            assert await migrator.run("upgrade", revision) == schemas[revision]
        assert await migrator.diff_from_models() == []
    finally:
        await migrator.close()


async def test_migrations_run_in_a_worker_thread_without_a_loop(tmp_path: Path) -> None:
    """The CLI path: env.py opens its own connection and runs asyncio.run (here, off this loop)."""
    from alembic import command

    url = f"sqlite+aiosqlite:///{tmp_path / 'cli' / 'fluxport.db'}"
    cfg = alembic_config()
    cfg.set_main_option("sqlalchemy.url", url)
    await asyncio.to_thread(command.upgrade, cfg, "head")
    db = await Database.open(url)
    try:
        assert await _scalar(db, "SELECT version_num FROM alembic_version") == _head()
    finally:
        await db.close()


def test_open_refuses_unsupported_targets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="in-memory"):
        make_engine("sqlite+aiosqlite://")
    with pytest.raises(ValueError, match="in-memory"):
        make_engine("sqlite+aiosqlite:///:memory:")
    with pytest.raises(ValueError, match="PostgreSQL"):
        make_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", schema="s")
    with pytest.raises(ValueError, match="schema name"):
        make_engine(PG_URL, schema='x"; DROP TABLE requests; --')


async def test_sqlite_pragmas(tmp_path: Path) -> None:
    db = await Database.open(f"sqlite+aiosqlite:///{tmp_path / 'fluxport.db'}")
    try:
        assert str(await _scalar(db, "PRAGMA journal_mode")).lower() == "wal"
        assert await _scalar(db, "PRAGMA busy_timeout") >= 5000
        assert await _scalar(db, "PRAGMA foreign_keys") == 1
    finally:
        await db.close()


# PostgreSQL: the pool from the settings, and a start that meets another process's migration


def _queue_pool(engine: AsyncEngine) -> QueuePool:
    pool = engine.pool
    assert isinstance(pool, QueuePool), type(pool)
    return pool


def test_the_pool_defaults_and_sqlite_keeps_its_own(tmp_path: Path) -> None:
    pool = _queue_pool(make_engine(PG_URL))  # no connection is made
    assert (pool.size(), pool._max_overflow, pool._timeout) == (10, 20, 30.0)
    sized = _queue_pool(make_engine(PG_URL, pool=PoolSizing(size=2, max_overflow=0, timeout_s=1.5)))
    assert (sized.size(), sized._max_overflow, sized._timeout) == (2, 0, 1.5)
    # SQLite keeps SQLAlchemy's own pool for its driver whatever the sizing says.
    sqlite = _queue_pool(make_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", pool=PoolSizing(size=1)))
    plain = _queue_pool(make_engine(f"sqlite+aiosqlite:///{tmp_path / 'y.db'}"))
    assert type(sqlite) is type(plain)
    assert (sqlite.size(), sqlite._max_overflow) == (plain.size(), plain._max_overflow) != (1, 20)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FLUXPORT_DATABASE_POOL_SIZE", "0"),
        ("FLUXPORT_DATABASE_MAX_OVERFLOW", "-1"),
        ("FLUXPORT_DATABASE_POOL_TIMEOUT_S", "0"),
        ("FLUXPORT_DATABASE_MIGRATION_WAIT_S", "-5"),
        ("FLUXPORT_DATABASE_POOL_SIZE", "ten"),
    ],
)
def test_a_bad_pool_setting_is_a_settings_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    (error,) = info.value.errors()
    assert error["loc"] == (variable.removeprefix("FLUXPORT_").lower(),)
    with pytest.raises(ValueError, match="pool size must be at least 1"):
        PoolSizing(size=0)


async def test_the_database_from_settings_has_their_pool(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """FLUXPORT_DATABASE_POOL_SIZE and _MAX_OVERFLOW cap the connections one process opens; past
    them a query waits FLUXPORT_DATABASE_POOL_TIMEOUT_S for one, then fails."""
    if (reason := await probe_postgres()) is not None:
        pytest.skip(reason)
    async with fresh_database() as url:
        for name, value in {
            "FLUXPORT_DATABASE_URL": url,
            "FLUXPORT_DATABASE_POOL_SIZE": "3",
            "FLUXPORT_DATABASE_MAX_OVERFLOW": "2",
            "FLUXPORT_DATABASE_POOL_TIMEOUT_S": "0.5",
        }.items():
            monkeypatch.setenv(name, value)
        db = await Database.from_settings(Settings(data_dir=tmp_path))
        try:
            pool = _queue_pool(db.engine)
            assert (pool.size(), pool._max_overflow, pool._timeout) == (3, 2, 0.5)
            rid = await _new_request(db)
            held = [await db.engine.connect() for _ in range(5)]  # the pool and all its overflow
            try:
                started = time.monotonic()
                with pytest.raises(SATimeoutError):
                    await db.get_request(rid)  # reads take their connection from the same pool
                assert 0.4 < time.monotonic() - started < 5
            finally:
                for conn in held:
                    await conn.close()
            row = await db.get_request(rid)
            assert row is not None and row.status == "queued"
        finally:
            await db.close()


class _MigrationLockHolder:
    """Another process mid-migration: a connection in a transaction holding the migration lock."""

    def __init__(self) -> None:
        self.engine = make_engine(PG_URL)
        self.conn: AsyncConnection | None = None

    async def __aenter__(self) -> _MigrationLockHolder:
        self.conn = await self.engine.connect()
        await self.conn.begin()
        await self.conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATION_LOCK})
        return self

    async def release(self) -> None:
        if self.conn is not None:
            await self.conn.rollback()
            await self.conn.close()
            self.conn = None

    async def __aexit__(self, *exc: object) -> None:
        await self.release()
        await self.engine.dispose()


async def test_a_start_during_another_migration_says_so_waits_then_opens(
    pg_target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fluxport.storage")
    async with _MigrationLockHolder() as holder:
        opening = asyncio.create_task(pg_target.open())
        deadline = time.monotonic() + 20
        while "waiting for another fluxport process to finish migrating" not in caplog.text:
            assert not opening.done(), opening  # it must wait, not fail nor skip the lock
            assert time.monotonic() < deadline, "no 'waiting' log line"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert not opening.done()
        await holder.release()
        db = await asyncio.wait_for(opening, 30)
    try:
        assert await _scalar(db, "SELECT version_num FROM alembic_version") == _head()
        await _new_request(db)
    finally:
        await db.close()
    waiting = [r for r in caplog.records if "waiting for another fluxport process" in r.getMessage()]
    assert len(waiting) == 1  # said once, not once per poll
    assert "the other migration finished" in caplog.text


async def test_a_short_wait_for_another_start_goes_unsaid(
    pg_target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    """Workers starting together each take the lock for a migration with nothing to do: waiting a
    moment for one of them is no news."""
    caplog.set_level(logging.WARNING, logger="fluxport.storage")
    async with _MigrationLockHolder() as holder:
        opening = asyncio.create_task(pg_target.open())
        await asyncio.sleep(0.3)
        assert not opening.done()
        await holder.release()
        db = await asyncio.wait_for(opening, 30)
    await db.close()
    assert "waiting for another" not in caplog.text


async def test_the_wait_for_another_migration_is_bounded(pg_target: Target) -> None:
    async with _MigrationLockHolder():
        started = time.monotonic()
        with pytest.raises(MigrationLockTimeout, match=r"for more than 0\.5 s"):
            await asyncio.wait_for(pg_target.open(migration_wait_s=0.5), 10)  # not a hang
        assert time.monotonic() - started < 5
    # Nothing half-done was left behind: the next start migrates as usual.
    db = await pg_target.open()
    try:
        assert await _scalar(db, "SELECT version_num FROM alembic_version") == _head()
    finally:
        await db.close()


# Requests


async def test_request_lifecycle(db: Database) -> None:
    params = {"size": "1024x768", "seed": 42, "nested": {"a": [1, 2.5, None]}, "unicode": "café ☕"}
    rid = await _new_request(db, "req_abc123", operation="edit", params=params, n=2)

    row = await db.get_request(rid)
    assert row is not None
    assert (row.id, row.model, row.operation, row.n) == ("req_abc123", "flux.2-dev", "edit", 2)
    assert row.params == params
    assert row.status == "queued"
    assert row.error is None and row.provider is None and row.finished_at is None
    assert row.images == 0 and row.client_disconnected is False
    _assert_recent_utc(row.created_at)

    await db.set_request_status(rid, "running")
    assert (await db.get_request(rid)).status == "running"  # type: ignore[union-attr]

    await db.mark_client_disconnected(rid)
    await _finish_ok(db, rid, images=2, revised_prompt="a lighthouse at dusk, oil painting")
    done = await db.get_request(rid)
    assert done is not None
    assert done.status == "succeeded" and done.provider == "local" and done.error is None
    assert (done.queued_ms, done.generation_ms, done.ttfb_ms, done.total_ms) == (1.5, 900.25, 901.0, 950.5)
    assert (done.width, done.height, done.images) == (1024, 768, 2)
    assert done.revised_prompt == "a lighthouse at dusk, oil painting"
    assert done.client_disconnected is True
    _assert_recent_utc(done.finished_at)
    assert done.finished_at is not None and done.finished_at >= done.created_at
    assert done.created_at == row.created_at  # timestamps round-trip exactly


async def test_failed_request_keeps_its_error_and_null_stays_sql_null(db: Database) -> None:
    error = {
        "status": 502,
        "type": "server_error",
        "code": "provider_error",
        "param": None,
        "message": "fal: upstream 503",
    }
    failed = await _new_request(db)
    await _finish_ok(
        db, failed, status="failed", provider=None, error=error, width=None, height=None, images=0
    )
    ok = await _new_request(db)
    await _finish_ok(db, ok)

    row = await db.get_request(failed)
    assert row is not None and row.status == "failed" and row.error == error
    assert row.width is None and row.generation_ms == 900.25
    # None must be SQL NULL (not JSON 'null'), so that "error IS NULL" queries work.
    assert await _scalar(db, "SELECT count(*) FROM requests WHERE error IS NULL") == 1


async def test_rejected_request_is_recorded(db: Database) -> None:
    """Requests refused before they run are recorded too, as "rejected"."""
    error = {
        "status": 400,
        "type": "invalid_request_error",
        "code": "invalid_value",
        "param": "n",
        "message": "n",
    }
    rid = await _new_request(db)
    await _finish_ok(db, rid, status="rejected", provider=None, error=error, images=0)
    row = await db.get_request(rid)
    assert row is not None and row.status == "rejected" and row.error == error
    assert await db.mark_interrupted() == 0


async def test_find_requests(db: Database) -> None:
    first = await _new_request(db, prompt="slow")
    await _new_request(db, prompt="fast")
    second = await _new_request(db, prompt="slow", model="flux.2-dev-flash")
    await _finish_ok(db, second)
    assert [r.id for r in await db.find_requests(prompt="slow")] == [second, first]  # newest first
    assert [r.id for r in await db.find_requests(prompt="slow", status="queued")] == [first]
    assert [r.id for r in await db.find_requests(model="flux.2-dev-flash")] == [second]
    assert len(await db.find_requests()) == 3
    assert len(await db.find_requests(limit=2)) == 2
    assert await db.find_requests(prompt="none") == []


async def test_request_errors(db: Database) -> None:
    assert await db.get_request("req_missing") is None
    with pytest.raises(LookupError):
        await db.set_request_status("req_missing", "running")
    with pytest.raises(LookupError):
        await _finish_ok(db, "req_missing")
    with pytest.raises(LookupError):
        await db.mark_client_disconnected("req_missing")
    with pytest.raises(ValueError, match="operation"):
        await _new_request(db, operation="variation")
    rid = await _new_request(db)
    with pytest.raises(ValueError, match="status"):
        await db.set_request_status(rid, "done")
    with pytest.raises(ValueError, match="status"):
        await _finish_ok(db, rid, status="running")
    with pytest.raises(IntegrityError):
        await _new_request(db, rid)  # ids are unique


# Attempts


async def test_attempts(db: Database) -> None:
    rid = await _new_request(db)
    first = await db.start_attempt(request_id=rid, provider="fal", model="flux.2-dev")
    second = await db.start_attempt(request_id=rid, provider="replicate", model="flux.2-dev")
    assert second > first

    running = await db.list_attempts(rid)
    assert [(a.id, a.provider, a.status, a.finished_at) for a in running] == [
        (first, "fal", "running", None),
        (second, "replicate", "running", None),
    ]
    _assert_recent_utc(running[0].started_at)

    err = {"status": 503, "type": "server_error", "code": "unavailable", "param": None, "message": "down"}
    await db.finish_attempt(
        first,
        status="failed",
        error=err,
        queued_ms=None,
        ttfb_ms=None,
        generation_ms=None,
        total_ms=120.0,
        provider_request_id="fal-req-1",
        normalization=None,
        billed_usd=None,
    )
    normalization = {"size": "converted", "seed": "passthrough", "n": "emulated"}
    await db.finish_attempt(
        second,
        status="succeeded",
        error=None,
        queued_ms=10.0,
        ttfb_ms=2000.5,
        generation_ms=1900.0,
        total_ms=2100.0,
        provider_request_id="rep-xyz",
        normalization=normalization,
        billed_usd=0.012,
    )
    a, b = await db.list_attempts(rid)
    assert (a.status, a.error, a.total_ms, a.provider_request_id, a.billed_usd) == (
        "failed",
        err,
        120.0,
        "fal-req-1",
        None,
    )
    assert (b.status, b.error, b.normalization, b.billed_usd) == ("succeeded", None, normalization, 0.012)
    assert (b.queued_ms, b.ttfb_ms, b.generation_ms, b.total_ms) == (10.0, 2000.5, 1900.0, 2100.0)
    _assert_recent_utc(b.finished_at)
    assert b.finished_at is not None and b.finished_at >= b.started_at

    assert await db.list_attempts("req_other") == []
    with pytest.raises(LookupError):
        await db.finish_attempt(
            10_000_000,
            status="cancelled",
            error=None,
            queued_ms=None,
            ttfb_ms=None,
            generation_ms=None,
            total_ms=None,
            provider_request_id=None,
            normalization=None,
            billed_usd=None,
        )
    with pytest.raises(ValueError, match="status"):
        await db.finish_attempt(
            first,
            status="running",
            error=None,
            queued_ms=None,
            ttfb_ms=None,
            generation_ms=None,
            total_ms=None,
            provider_request_id=None,
            normalization=None,
            billed_usd=None,
        )


async def test_attempt_needs_an_existing_request(db: Database) -> None:
    """Foreign keys are enforced on SQLite too (PRAGMA foreign_keys)."""
    with pytest.raises(IntegrityError):
        await db.start_attempt(request_id="req_nope", provider="fal", model="flux.2-dev")


# Images


def _image(rid: str, index: int, **overrides: Any) -> ImageRow:
    image_id = new_image_id()
    fields: dict[str, Any] = {
        "id": image_id,
        "request_id": rid,
        "index": index,
        "path": f"ab/{image_id}.png",
        "format": "png",
        "mime": "image/png",
        "width": 1024,
        "height": 768,
        "bytes": 123_456,
    }
    fields.update(overrides)
    return ImageRow(**fields)


async def test_images(db: Database) -> None:
    rid = await _new_request(db, n=2)
    imgs = [_image(rid, 0), _image(rid, 1, format="webp", mime="image/webp", bytes=3_000_000_000)]
    await db.add_images(imgs)
    await db.add_images([])  # a no-op

    for img in imgs:
        got = await db.get_image(img.id)
        assert got is not None
        _assert_recent_utc(got.created_at)
        assert (got.id, got.request_id, got.index, got.path, got.format, got.mime) == (
            img.id,
            img.request_id,
            img.index,
            img.path,
            img.format,
            img.mime,
        )
        assert (got.width, got.height, got.bytes) == (img.width, img.height, img.bytes)
    assert await db.get_image(new_image_id()) is None

    # An explicit created_at in another zone comes back as the same instant in UTC.
    when = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC).astimezone(
        timezone(timedelta(hours=5, minutes=30))
    )
    dated = _image(rid, 2, created_at=when)
    await db.add_images([dated])
    got = await db.get_image(dated.id)
    assert got is not None and got.created_at == when and got.created_at.utcoffset() == timedelta(0)

    assert [i.id for i in await db.list_images(rid)] == [imgs[0].id, imgs[1].id, dated.id]
    assert await db.list_images("req_other") == []


async def test_add_images_is_all_or_nothing(db: Database) -> None:
    rid = await _new_request(db, n=2)
    await db.add_images([_image(rid, 0)])
    fresh, clash = _image(rid, 1), _image(rid, 0)  # (request_id, index) is unique
    with pytest.raises(IntegrityError):
        await db.add_images([fresh, clash])
    assert await db.get_image(fresh.id) is None
    assert await _scalar(db, "SELECT count(*) FROM images") == 1


# API keys and usage


async def _new_key(db: Database, name: str = "ci", **limits: Any) -> str:
    key_id = f"key_{secrets.token_hex(6)}"
    await db.create_api_key(id=key_id, name=name, prefix="fp_abc", hash=secrets.token_hex(32), **limits)
    return key_id


async def test_api_keys(db: Database) -> None:
    assert await db.count_api_keys() == 0
    assert await db.api_keys_version() == (0, 0, None)
    first = await _new_key(db, "first", rate_limit_per_minute=60, monthly_budget_usd=12.5)
    second = await _new_key(db, "second")
    keys = await db.list_api_keys()
    assert [k.id for k in keys] == [first, second]
    assert (keys[0].rate_limit_per_minute, keys[0].monthly_budget_usd) == (60, 12.5)
    assert keys[1].rate_limit_per_minute is None and keys[1].revoked_at is None
    _assert_recent_utc(keys[0].created_at)

    found = await db.api_key_by_hash(keys[1].hash)
    assert found is not None and found.id == second
    assert await db.api_key_by_hash("0" * 64) is None
    with pytest.raises(IntegrityError):  # hashes are unique
        await db.create_api_key(id="key_dup", name="dup", prefix="fp_abc", hash=keys[1].hash)

    revoked = await db.revoke_api_key(first)
    assert revoked is not None and revoked.id == first
    _assert_recent_utc(revoked.revoked_at)
    again = await db.revoke_api_key(first)
    assert again is not None and again.revoked_at == revoked.revoked_at  # the first stamp is kept
    assert await db.revoke_api_key("key_missing") is None
    assert await db.count_api_keys() == 2
    assert await db.api_keys_version() == (2, 1, revoked.revoked_at)


async def test_key_usage_and_spend(db: Database) -> None:
    key = await _new_key(db)
    other = await _new_key(db, "other")
    paid = await _new_request(db, api_key_id=key)
    await _finish_ok(db, paid, width=1000, height=1000, images=2, cost_usd=0.75)
    failed = await _new_request(db, api_key_id=key)
    await _finish_ok(db, failed, status="failed", width=None, height=None, images=0, cost_usd=None)
    theirs = await _new_request(db, api_key_id=other)
    await _finish_ok(db, theirs, cost_usd=5.0)
    keyless = await _new_request(db)
    await _finish_ok(db, keyless, cost_usd=1.0)

    usage = await db.key_usage(key)
    assert (usage.requests, usage.succeeded, usage.images) == (2, 1, 2)
    assert usage.megapixels == 2.0 and usage.cost_usd == 0.75
    assert (await db.key_usage(None)).requests == 1
    assert await db.key_spend(key, since=datetime.now(UTC) - timedelta(hours=1)) == 0.75
    assert await db.key_spend(key, since=datetime.now(UTC) + timedelta(hours=1)) == 0.0
    later = await db.key_usage(key, since=datetime.now(UTC) + timedelta(hours=1))
    assert (later.requests, later.cost_usd) == (0, 0.0)


# Idempotency-Key claims


async def _claim(db: Database, key: str, request_id: str, **overrides: Any) -> Any:
    now = datetime.now(UTC)
    fields: dict[str, Any] = {
        "api_key_id": "key_1",
        "key": key,
        "body_hash": "h1",
        "request_id": request_id,
        "expires_at": now + timedelta(hours=1),
        "stale_before": now - timedelta(minutes=10),
    }
    fields.update(overrides)
    return await db.claim_idempotency(**fields)


async def test_idempotency_claims(db: Database) -> None:
    assert await _claim(db, "k", "req_1") is None  # claimed
    held = await _claim(db, "k", "req_2")
    assert held is not None and (held.request_id, held.state, held.body) == ("req_1", "in_progress", None)
    assert await _claim(db, "k", "req_3", api_key_id="key_2") is None  # another key's own namespace

    await db.finish_idempotency("key_1", "k", status_code=200, headers={"x-a": "b"}, body='{"ok":1}')
    done = await db.get_idempotency("key_1", "k")
    assert done is not None and (done.state, done.status_code, done.headers, done.body) == (
        "done",
        200,
        {"x-a": "b"},
        '{"ok":1}',
    )
    replay = await _claim(db, "k", "req_4")
    assert replay is not None and replay.state == "done" and replay.request_id == "req_1"

    await db.release_idempotency("key_1", "k")
    assert await db.get_idempotency("key_1", "k") is None
    assert await _claim(db, "k", "req_5") is None

    # An in-progress claim older than stale_before (its process died) gives way; so does an expired one.
    future = datetime.now(UTC) + timedelta(minutes=1)
    assert await _claim(db, "k", "req_6", stale_before=future) is None
    assert await _claim(db, "old", "req_7", expires_at=datetime.now(UTC) - timedelta(seconds=1)) is None
    assert await db.purge_idempotency() == 1
    assert await db.get_idempotency("key_1", "old") is None
    row = await db.get_idempotency("key_1", "k")
    assert row is not None and row.request_id == "req_6"


async def test_concurrent_claims_of_one_key_let_exactly_one_through(db: Database, target: Target) -> None:
    """The primary key decides, across processes: one claim of 20, from two Databases at once."""
    other = await target.open()
    try:
        claims = (_claim(db if i % 2 else other, "race", f"req_{i}") for i in range(20))
        outcomes = await asyncio.gather(*claims)
    finally:
        await other.close()
    winners = [i for i, held in enumerate(outcomes) if held is None]
    assert len(winners) == 1
    assert {held.request_id for held in outcomes if held is not None} == {f"req_{winners[0]}"}


# Crash repair


async def test_mark_interrupted(db: Database) -> None:
    queued = await _new_request(db)
    running = await _new_request(db)
    await db.set_request_status(running, "running")
    live = await db.start_attempt(request_id=running, provider="local", model="flux.2-dev")
    done = await _new_request(db)
    ok = await db.start_attempt(request_id=done, provider="fal", model="flux.2-dev")
    await db.finish_attempt(
        ok,
        status="succeeded",
        error=None,
        queued_ms=1.0,
        ttfb_ms=2.0,
        generation_ms=3.0,
        total_ms=4.0,
        provider_request_id=None,
        normalization=None,
        billed_usd=0.03,
    )
    await _finish_ok(db, done)

    assert await db.mark_interrupted() == 2

    for rid in (queued, running):
        row = await db.get_request(rid)
        assert row is not None and row.status == "interrupted" and row.error == INTERRUPTED_ERROR
    (attempt,) = await db.list_attempts(running)
    assert attempt.id == live and attempt.status == "failed" and attempt.error == INTERRUPTED_ERROR
    finished = await db.get_request(done)
    assert finished is not None and finished.status == "succeeded" and finished.error is None
    (kept,) = await db.list_attempts(done)
    assert kept.status == "succeeded" and kept.billed_usd == 0.03

    assert await db.mark_interrupted() == 0


# Concurrency


async def _one_request_end_to_end(db: Database, i: int) -> str:
    rid = await _new_request(db, f"req_{i:04d}_{secrets.token_hex(4)}")
    await db.set_request_status(rid, "running")
    attempt = await db.start_attempt(request_id=rid, provider="local", model="flux.2-dev")
    await db.get_request(rid)  # readers interleave with the writers
    await db.finish_attempt(
        attempt,
        status="succeeded",
        error=None,
        queued_ms=0.0,
        ttfb_ms=1.0,
        generation_ms=float(i),
        total_ms=float(i) + 1,
        provider_request_id=None,
        normalization={"size": "passthrough"},
        billed_usd=None,
    )
    await db.add_images([_image(rid, 0)])
    await _finish_ok(db, rid, generation_ms=float(i))
    return rid


async def test_concurrent_writers(db: Database, target: Target) -> None:
    """50 requests recorded at once, from this Database and a second one on the same database
    (a second process: on SQLite only the busy timeout keeps the two from failing)."""
    other = await target.open()
    try:
        rids = await asyncio.gather(*(_one_request_end_to_end(db if i % 2 else other, i) for i in range(50)))
    finally:
        await other.close()
    assert len(set(rids)) == 50
    for i, rid in enumerate(rids):
        row = await db.get_request(rid)
        assert row is not None and row.status == "succeeded" and row.generation_ms == float(i)
        (attempt,) = await db.list_attempts(rid)
        assert attempt.status == "succeeded" and attempt.generation_ms == float(i)
    assert await _scalar(db, "SELECT count(*) FROM images") == 50
    assert await _scalar(db, "SELECT count(*) FROM attempts WHERE status = 'succeeded'") == 50


# Blobs


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.parametrize("fsync", ["before_answer", "after_answer"])
async def test_blob_save_and_read(tmp_path: Path, fsync: Literal["before_answer", "after_answer"]) -> None:
    store = LocalBlobStore(tmp_path / "images", fsync=fsync)  # created on first save
    image_id = new_image_id()
    data = os.urandom(256 * 1024)
    rel = await store.save(image_id, data, ".PNG")

    assert re.fullmatch(rf"[0-9a-f]{{2}}/{re.escape(image_id)}\.png", rel)
    assert await store.read(rel) == data
    assert store.exists(rel)
    assert store.resolve(rel) == (tmp_path / "images" / rel).resolve()
    assert stat.S_IMODE(store.resolve(rel).stat().st_mode) == 0o644
    assert not [p for p in _files(store.root) if p.name.endswith(TEMP_SUFFIX)]

    # Saving again replaces the file.
    assert await store.save(image_id, b"v2", "png") == rel
    assert await store.read(rel) == b"v2"

    assert await store.delete(rel) is True
    assert not store.exists(rel)
    assert await store.delete(rel) is False
    with pytest.raises(FileNotFoundError):
        await store.read(rel)
    await asyncio.to_thread(store.close)  # waits for the fsyncs still under way (after_answer)
    assert not store._syncing


async def test_blob_fsync_after_answer_waits_for_sync_soon(tmp_path: Path) -> None:
    """after_answer: saves are not fsynced while their caller still commits its records; sync_soon()
    starts one background job for every blob saved so far, and close() flushes what is left."""
    store = LocalBlobStore(tmp_path, fsync="after_answer")
    first = await store.save(new_image_id(), b"one", "png")
    await store.save(new_image_id(), b"two", "png")
    assert store._syncing is None
    assert len(store._unsynced) == 2

    store.sync_soon()
    job = store._syncing
    assert job is not None and not store._unsynced  # one job took both
    await job
    assert store._syncing is None
    store.sync_soon()  # nothing pending: no job
    assert store._syncing is None

    # A blob deleted before its fsync is skipped, not an error; close() syncs what is pending.
    await store.delete(first)
    await store.save(new_image_id(), b"three", "png")
    store._unsynced.append(store.root / first)
    await asyncio.to_thread(store.close)
    assert not store._unsynced


async def test_blob_overwrite_is_atomic_for_readers(tmp_path: Path) -> None:
    """A reader sees the whole old file or the whole new one, never a mix or a truncation."""
    store = LocalBlobStore(tmp_path)
    image_id = new_image_id()
    old, new = b"a" * 2_000_000, b"b" * 2_000_000
    rel = await store.save(image_id, old, "png")
    seen: set[bytes] = set()

    async def reader() -> None:
        for _ in range(40):
            seen.add(await store.read(rel))

    async def writer() -> None:
        for k in range(20):
            await store.save(image_id, new if k % 2 == 0 else old, "png")

    await asyncio.gather(reader(), reader(), writer())
    assert seen <= {old, new}
    assert not [p for p in _files(store.root) if p.name.endswith(TEMP_SUFFIX)]


async def test_blob_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    image_id = new_image_id()
    with pytest.raises(TypeError):
        await store.save(image_id, cast(bytes, "not bytes"), "png")
    assert not store.exists(LocalBlobStore.relative_path(image_id, "png"))
    assert _files(tmp_path) == []


async def test_blob_paths_stay_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "images"
    store = LocalBlobStore(root)
    (tmp_path / "secret.txt").write_text("no")
    for bad in ("../x", "../secret.txt", "ab/../../secret.txt", "/etc/passwd", "", ".", "ab/\0x"):
        with pytest.raises(ValueError):
            store.resolve(bad)
    with pytest.raises(ValueError):
        await store.read("../secret.txt")
    with pytest.raises(ValueError):
        await store.delete("../secret.txt")
    with pytest.raises(ValueError):
        store.exists("../secret.txt")
    assert (tmp_path / "secret.txt").exists()

    # A symlink planted inside the root cannot lead out of it either.
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError):
        store.resolve("link/secret.txt")

    assert store.resolve("ab/x.png") == root.resolve() / "ab" / "x.png"

    for bad_id in ("../evil", "a/b", "", "x" * 200, "id.png"):
        with pytest.raises(ValueError, match="image id"):
            await store.save(bad_id, b"x", "png")
    for bad_ext in ("", "p/ng", "../png", "verylongextension"):
        with pytest.raises(ValueError, match="extension"):
            await store.save(new_image_id(), b"x", bad_ext)


def test_new_image_id() -> None:
    ids = {new_image_id() for _ in range(20_000)}
    assert len(ids) == 20_000
    for image_id in list(ids)[:500]:
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", image_id)
        assert len(base64.urlsafe_b64decode(image_id + "=" * (-len(image_id) % 4))) * 8 >= 128
    # Every URL-safe symbol turns up in every position class: no fixed or low-entropy prefix.
    assert len({i[0] for i in ids}) == 64 and len({i[-2] for i in ids}) == 64


async def test_a_database_at_revision_0001_upgrades_to_head(tmp_path: Path) -> None:
    """An existing install keeps its data across upgrades: later revisions only add to it."""
    from alembic import command
    from sqlalchemy import inspect

    from fluxport.storage.db import alembic_config, make_engine

    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)

    def to_0001(connection: Any) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0001")

    async with engine.begin() as conn:
        await conn.run_sync(to_0001)
        columns = await conn.run_sync(lambda c: {col["name"] for col in inspect(c).get_columns("requests")})
    await engine.dispose()
    assert "cost_usd" not in columns

    db = await Database.open(url)
    try:
        await db.create_request(id="req_old", model="m", operation="generate", prompt="p", params={}, n=1)
        await _finish_ok(db, "req_old", provider="fal", cost_usd=0.5)
        row = await db.get_request("req_old")
        assert row is not None and row.cost_usd == 0.5
    finally:
        await db.close()


# Group commit (storage/writer.py): the records of concurrent requests share transactions.


def _count_commits(db: Database) -> list[int]:
    """Every COMMIT the writer's engine makes, from now on."""
    engine = db._writer.runner.engine
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    commits: list[int] = []
    event.listen(sync_engine, "commit", lambda conn: commits.append(1))
    return commits


async def test_concurrent_writes_share_a_few_transactions(db: Database) -> None:
    commits = _count_commits(db)
    ids = [f"req_group_{i}" for i in range(60)]
    await asyncio.gather(*(_new_request(db, rid) for rid in ids))
    assert 1 <= len(commits) <= 3, len(commits)
    rows = [await db.get_request(rid) for rid in ids]
    assert all(row is not None and row.prompt == "a lighthouse at dusk" for row in rows)


async def test_one_failing_write_does_not_sink_its_batch(db: Database) -> None:
    taken = await _new_request(db)
    fresh = [f"req_fresh_{i}" for i in range(5)]
    outcomes = await asyncio.gather(
        *(_new_request(db, rid) for rid in fresh[:2]),
        _new_request(db, taken),  # the same id again: this write alone fails
        _finish_ok(db, "req_missing", status="failed", provider=None, images=0),
        *(_new_request(db, rid) for rid in fresh[2:]),
        return_exceptions=True,
    )
    assert isinstance(outcomes[2], IntegrityError)
    assert isinstance(outcomes[3], LookupError) and "req_missing" in str(outcomes[3])
    assert [o for i, o in enumerate(outcomes) if i not in (2, 3)] == fresh
    for rid in fresh:
        assert await db.get_request(rid) is not None


async def test_a_cancelled_caller_still_gets_its_record_written(target: Target) -> None:
    database = await target.open()
    try:
        rid = f"req_{secrets.token_hex(8)}"
        task = asyncio.create_task(_new_request(database, rid))
        await asyncio.sleep(0)  # queued: the caller now waits for the commit
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        queued = asyncio.create_task(_new_request(database, rid + "_closing"))
        await asyncio.sleep(0)
    finally:
        await database.close()  # commits what is queued before it returns
    assert queued.done() and queued.result() == rid + "_closing"
    reopened = await target.open()
    try:
        assert await reopened.get_request(rid) is not None
        assert await reopened.get_request(rid + "_closing") is not None
    finally:
        await reopened.close()
