"""Relational storage: every request, every provider attempt and every saved image (SQLAlchemy 2, async).

The schema is owned by the Alembic migrations in `storage/migrations/`; `Database.open` runs them to
head, so the ORM classes here must stay in step with the latest revision (a test checks this).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, Self, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    bindparam,
    case,
    delete,
    event,
    false,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import URL, Connection, CursorResult, Engine, create_engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

from fluxport.storage.writer import GroupCommit, Op

__all__ = [
    "ATTEMPT_STATUSES",
    "INTERRUPTED_ERROR",
    "OPERATIONS",
    "REQUEST_STATUSES",
    "ApiKeyRecord",
    "ApiKeyRow",
    "AttemptRecord",
    "AttemptRow",
    "AttemptStats",
    "AttemptStatus",
    "Base",
    "Database",
    "IdempotencyRecord",
    "IdempotencyRow",
    "ImageRecord",
    "ImageRow",
    "Operation",
    "RequestRecord",
    "RequestRow",
    "RequestStatus",
    "UsageTotals",
    "alembic_config",
    "make_engine",
]

Operation = Literal["generate", "edit"]
# "rejected": refused before it ran (validation); recorded all the same. "cancelled": the client hung
# up without an Idempotency-Key, so the work was stopped.
RequestStatus = Literal[
    "queued", "running", "succeeded", "failed", "rejected", "dry_run", "interrupted", "cancelled"
]
AttemptStatus = Literal["running", "succeeded", "failed", "cancelled"]

OPERATIONS: Final = frozenset({"generate", "edit"})
REQUEST_STATUSES: Final = frozenset(
    {"queued", "running", "succeeded", "failed", "rejected", "dry_run", "interrupted", "cancelled"}
)
_REQUEST_FINAL: Final = frozenset({"succeeded", "failed", "rejected", "dry_run", "interrupted", "cancelled"})
_REQUEST_IN_FLIGHT: Final = ("queued", "running")
ATTEMPT_STATUSES: Final = frozenset({"running", "succeeded", "failed", "cancelled"})
_ATTEMPT_FINAL: Final = frozenset({"succeeded", "failed", "cancelled"})

INTERRUPTED_ERROR: Final[dict[str, Any]] = {
    "status": 500,
    "type": "server_error",
    "code": "interrupted",
    "param": None,
    "message": "The server stopped before this request finished.",
}

MIGRATIONS_DIR: Final = Path(__file__).resolve().with_name("migrations")

# A process-wide writer waits this long for another process's SQLite write lock before failing.
SQLITE_BUSY_TIMEOUT_MS: Final = 30_000
# Serialises concurrent migrations on one PostgreSQL database (several servers starting at once).
_PG_MIGRATION_LOCK: Final = 0x666C7578706F7274  # b"fluxport"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend; SQLite keeps no offset, so it stores UTC wall time."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware (UTC) datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def json_type() -> TypeEngine[Any]:
    """JSON on SQLite, JSONB on PostgreSQL; Python None is SQL NULL, not the JSON literal null."""
    return JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class RequestRecord(Base):
    """One client request, whatever happened to it."""

    __tablename__ = "requests"
    __table_args__ = (
        Index("ix_requests_model_created_at", "model", "created_at"),
        Index("ix_requests_status", "status"),
        Index("ix_requests_api_key_id_created_at", "api_key_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    model: Mapped[str] = mapped_column(String, nullable=False)
    operation: Mapped[str] = mapped_column(String, nullable=False)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    params: Mapped[dict[str, Any]] = mapped_column(json_type(), nullable=False)
    provider: Mapped[str | None] = mapped_column(String)
    status: Mapped[str] = mapped_column(String, nullable=False)
    error: Mapped[dict[str, Any] | None] = mapped_column(json_type())
    queued_ms: Mapped[float | None] = mapped_column(Double)
    generation_ms: Mapped[float | None] = mapped_column(Double)
    ttfb_ms: Mapped[float | None] = mapped_column(Double)
    total_ms: Mapped[float | None] = mapped_column(Double)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    n: Mapped[int] = mapped_column(Integer, nullable=False)
    images: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default=text("0"))
    revised_prompt: Mapped[str | None] = mapped_column(Text)
    # Everything the providers billed for this request: winner, hedge losers, billed failures.
    cost_usd: Mapped[float | None] = mapped_column(Double)
    client_disconnected: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default=false()
    )
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The API key that made the request; None for keyless requests (auth none, playground).
    api_key_id: Mapped[str | None] = mapped_column(String)


class AttemptRecord(Base):
    """One call to one provider on behalf of a request (failover and hedging make several)."""

    __tablename__ = "attempts"
    __table_args__ = (
        Index("ix_attempts_model_provider_started_at", "model", "provider", "started_at"),
        Index("ix_attempts_request_id", "request_id"),
    )

    # BIGINT on PostgreSQL; SQLite only autoincrements a column declared exactly INTEGER.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    request_id: Mapped[str] = mapped_column(
        String, ForeignKey("requests.id", ondelete="CASCADE"), nullable=False
    )
    provider: Mapped[str] = mapped_column(String, nullable=False)
    model: Mapped[str] = mapped_column(String, nullable=False)
    status: Mapped[str] = mapped_column(String, nullable=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    queued_ms: Mapped[float | None] = mapped_column(Double)
    # Hosted providers: milliseconds from the attempt's start to the submit answer / first status.
    submitted_ms: Mapped[float | None] = mapped_column(Double)
    first_status_ms: Mapped[float | None] = mapped_column(Double)
    ttfb_ms: Mapped[float | None] = mapped_column(Double)
    generation_ms: Mapped[float | None] = mapped_column(Double)
    total_ms: Mapped[float | None] = mapped_column(Double)
    error: Mapped[dict[str, Any] | None] = mapped_column(json_type())
    provider_request_id: Mapped[str | None] = mapped_column(String)
    normalization: Mapped[dict[str, str] | None] = mapped_column(json_type())
    billed_usd: Mapped[float | None] = mapped_column(Double)


class ImageRecord(Base):
    """One stored image file; `id` is the unguessable token that appears in image URLs."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("request_id", "index"),
        Index("ix_images_request_id", "request_id"),
    )

    id: Mapped[str] = mapped_column(String, primary_key=True)
    request_id: Mapped[str] = mapped_column(
        String, ForeignKey("requests.id", ondelete="CASCADE"), nullable=False
    )
    index: Mapped[int] = mapped_column(Integer, nullable=False)
    path: Mapped[str] = mapped_column(String, nullable=False)
    format: Mapped[str] = mapped_column(String, nullable=False)
    mime: Mapped[str] = mapped_column(String, nullable=False)
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class ApiKeyRecord(Base):
    """An API key: only the SHA-256 of the secret is kept; `prefix` is its first characters, for lists."""

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("hash"),)

    id: Mapped[str] = mapped_column(String, primary_key=True)
    name: Mapped[str] = mapped_column(String, nullable=False)
    prefix: Mapped[str] = mapped_column(String, nullable=False)
    hash: Mapped[str] = mapped_column(String, nullable=False)
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)
    monthly_budget_usd: Mapped[float | None] = mapped_column(Double)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class IdempotencyRecord(Base):
    """The answer to one Idempotency-Key of one API key ("" without auth): in progress, then stored."""

    __tablename__ = "idempotency"
    __table_args__ = (Index("ix_idempotency_expires_at", "expires_at"),)

    api_key_id: Mapped[str] = mapped_column(String, primary_key=True)
    key: Mapped[str] = mapped_column(String, primary_key=True)
    body_hash: Mapped[str] = mapped_column(String, nullable=False)
    request_id: Mapped[str] = mapped_column(String, nullable=False)
    state: Mapped[str] = mapped_column(String, nullable=False)  # in_progress | done
    status_code: Mapped[int | None] = mapped_column(Integer)
    headers: Mapped[dict[str, str] | None] = mapped_column(json_type())
    body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class _Snapshot:
    """`Row.of(record)`: a frozen copy of an ORM record's columns, so callers never hold a
    session-bound object (each Row's fields are named exactly like its table's columns)."""

    __slots__ = ()

    @classmethod
    def of(cls, record: Any) -> Self:
        return cls(**{f.name: getattr(record, f.name) for f in fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ApiKeyRow(_Snapshot):
    """A snapshot of one `api_keys` row (never the secret)."""

    id: str
    name: str
    prefix: str
    hash: str
    rate_limit_per_minute: int | None
    monthly_budget_usd: float | None
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class IdempotencyRow(_Snapshot):
    """A snapshot of one `idempotency` row."""

    api_key_id: str
    key: str
    body_hash: str
    request_id: str
    state: str
    status_code: int | None
    headers: dict[str, str] | None
    body: str | None
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """One key's recorded requests over a period: counts, output megapixels and spend."""

    requests: int
    succeeded: int
    images: int
    megapixels: float
    cost_usd: float


@dataclass(frozen=True, slots=True)
class RequestRow(_Snapshot):
    """A snapshot of one `requests` row."""

    id: str
    created_at: datetime
    model: str
    operation: str
    prompt: str
    params: dict[str, Any]
    provider: str | None
    status: str
    error: dict[str, Any] | None
    queued_ms: float | None
    generation_ms: float | None
    ttfb_ms: float | None
    total_ms: float | None
    width: int | None
    height: int | None
    n: int
    images: int
    revised_prompt: str | None
    cost_usd: float | None
    client_disconnected: bool
    finished_at: datetime | None
    api_key_id: str | None = None


@dataclass(frozen=True, slots=True)
class AttemptRow(_Snapshot):
    """A snapshot of one `attempts` row."""

    id: int
    request_id: str
    provider: str
    model: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    queued_ms: float | None
    submitted_ms: float | None
    first_status_ms: float | None
    ttfb_ms: float | None
    generation_ms: float | None
    total_ms: float | None
    error: dict[str, Any] | None
    provider_request_id: str | None
    normalization: dict[str, str] | None
    billed_usd: float | None


@dataclass(frozen=True, slots=True)
class AttemptStats:
    """One provider's finished (succeeded or failed) attempts of a model over a time window.

    Latency percentiles are over succeeded attempts that recorded the figure; None when none did.
    """

    provider: str
    attempts: int
    successes: int
    total_p50_ms: float | None
    total_p95_ms: float | None
    ttfb_p50_ms: float | None


@dataclass(frozen=True, slots=True)
class ImageRow(_Snapshot):
    """One stored image: `path` is relative to the images dir (see `BlobStore`)."""

    id: str
    request_id: str
    index: int
    path: str
    format: str
    mime: str
    width: int
    height: int
    bytes: int
    created_at: datetime | None = None  # set by `add_images` when None


def _check(value: str, allowed: frozenset[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"invalid {what} {value!r}; expected one of {sorted(allowed)}")


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


def _sync_sqlite_engine(url: URL) -> Engine:
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


async def _migrate(engine: AsyncEngine, schema: str | None) -> None:
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


# The writes every request makes, as Core statements built once: the values come with each
# execution, so the compiled SQL is cached and nothing is rebuilt per request.
_requests = cast(Table, RequestRecord.__table__)
_attempts = cast(Table, AttemptRecord.__table__)
_INSERT_REQUEST: Final = insert(_requests)
_UPDATE_REQUEST: Final = update(_requests).where(_requests.c.id == bindparam("request_id_"))
_INSERT_ATTEMPT: Final = insert(_attempts)
_UPDATE_ATTEMPT: Final = update(_attempts).where(_attempts.c.id == bindparam("attempt_id_"))
_INSERT_IMAGE: Final = insert(cast(Table, ImageRecord.__table__))


class Database:
    """Async data access for requests, attempts and images.

    The writes every request makes (create_request, start_attempt, finish_attempt, add_images,
    finish_request, ...) are queued when called and return a future that completes once they are
    committed: writes made in one go share a transaction (storage/writer.py).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer per file: queueing our own writers here is cheaper than SQLite's
        # busy-wait backoff; busy_timeout still covers other processes (CLI, a second server).
        self._write_lock = asyncio.Lock() if sqlite else None
        # The records every request writes go through group commit (storage/writer.py); SQLite's
        # batches run on the synchronous driver in one thread.
        self._writer = GroupCommit.for_engine(
            engine, (lambda: _sync_sqlite_engine(engine.url)) if sqlite else None, self._write_lock
        )

    @classmethod
    async def open(cls, url: str, *, schema: str | None = None) -> Database:
        """Connect and migrate to head; `schema` (PostgreSQL only) isolates tables, e.g. per test run."""
        engine = make_engine(url, schema=schema)
        try:
            await _migrate(engine, schema)
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine)

    async def close(self) -> None:
        await self._writer.aclose()
        await self.engine.dispose()

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        if self._write_lock is None:
            async with self.sessions.begin() as session:
                yield session
        else:
            async with self._write_lock, self.sessions.begin() as session:
                yield session

    # Requests

    def create_request(
        self,
        *,
        id: str,
        model: str,
        operation: str,
        prompt: str,
        params: dict[str, Any],
        n: int,
        status: str = "queued",
        api_key_id: str | None = None,
    ) -> asyncio.Future[None]:
        """Record a new request (queued, or already running when it starts at once)."""
        _check(operation, OPERATIONS, "operation")
        _check(status, frozenset(_REQUEST_IN_FLIGHT), "initial request status")
        values = dict(
            id=id,
            created_at=_utcnow(),
            model=model,
            operation=operation,
            prompt=prompt,
            params=params,
            status=status,
            n=n,
            images=0,
            client_disconnected=False,
            api_key_id=api_key_id,
        )
        return self._writer.write(Op(_INSERT_REQUEST, values))

    def set_request_status(self, request_id: str, status: str) -> asyncio.Future[None]:
        _check(status, REQUEST_STATUSES, "request status")
        return self._update_request(request_id, status=status)

    def finish_request(
        self,
        request_id: str,
        *,
        status: str,
        provider: str | None,
        error: dict[str, Any] | None,
        queued_ms: float | None,
        generation_ms: float | None,
        ttfb_ms: float | None,
        total_ms: float | None,
        width: int | None,
        height: int | None,
        images: int,
        revised_prompt: str | None,
        cost_usd: float | None = None,
    ) -> asyncio.Future[None]:
        """Record the outcome (succeeded / failed / rejected / interrupted) and stamp finished_at."""
        _check(status, _REQUEST_FINAL, "final request status")
        return self._update_request(
            request_id,
            status=status,
            provider=provider,
            error=error,
            queued_ms=queued_ms,
            generation_ms=generation_ms,
            ttfb_ms=ttfb_ms,
            total_ms=total_ms,
            width=width,
            height=height,
            images=images,
            revised_prompt=revised_prompt,
            cost_usd=cost_usd,
            finished_at=_utcnow(),
        )

    def mark_client_disconnected(self, request_id: str) -> asyncio.Future[None]:
        return self._update_request(request_id, client_disconnected=True)

    def _update_request(self, request_id: str, **values: Any) -> asyncio.Future[None]:
        values["request_id_"] = request_id
        return self._writer.write(Op(_UPDATE_REQUEST, values, one_row=True, what=f"request {request_id!r}"))

    async def get_request(self, request_id: str) -> RequestRow | None:
        async with self.sessions() as session:
            record = await session.get(RequestRecord, request_id)
            return RequestRow.of(record) if record is not None else None

    async def find_requests(
        self,
        *,
        prompt: str | None = None,
        model: str | None = None,
        status: str | None = None,
        limit: int = 100,
    ) -> list[RequestRow]:
        """Requests matching every given field exactly, newest first."""
        stmt = select(RequestRecord).order_by(RequestRecord.created_at.desc(), RequestRecord.id.desc())
        if prompt is not None:
            stmt = stmt.where(RequestRecord.prompt == prompt)
        if model is not None:
            stmt = stmt.where(RequestRecord.model == model)
        if status is not None:
            stmt = stmt.where(RequestRecord.status == status)
        async with self.sessions() as session:
            return [RequestRow.of(r) for r in await session.scalars(stmt.limit(limit))]

    # Attempts

    def start_attempt(
        self, *, request_id: str, provider: str, model: str, started_at: datetime | None = None
    ) -> asyncio.Future[int]:
        """Record a running attempt; returns its id. `started_at` (default now) is for imports and tests."""
        values = dict(
            request_id=request_id,
            provider=provider,
            model=model,
            status="running",
            started_at=started_at or _utcnow(),
        )
        return self._writer.write(Op(_INSERT_ATTEMPT, values), then=lambda out: int(out[0]))

    def finish_attempt(
        self,
        attempt_id: int,
        *,
        status: str,
        error: dict[str, Any] | None,
        queued_ms: float | None,
        ttfb_ms: float | None,
        generation_ms: float | None,
        total_ms: float | None,
        provider_request_id: str | None,
        normalization: dict[str, str] | None,
        billed_usd: float | None,
        submitted_ms: float | None = None,
        first_status_ms: float | None = None,
    ) -> asyncio.Future[None]:
        """Record an attempt's outcome (succeeded / failed / cancelled) and stamp finished_at."""
        _check(status, _ATTEMPT_FINAL, "final attempt status")
        values = dict(
            status=status,
            error=error,
            queued_ms=queued_ms,
            submitted_ms=submitted_ms,
            first_status_ms=first_status_ms,
            ttfb_ms=ttfb_ms,
            generation_ms=generation_ms,
            total_ms=total_ms,
            provider_request_id=provider_request_id,
            normalization=normalization,
            billed_usd=billed_usd,
            finished_at=_utcnow(),
            attempt_id_=attempt_id,
        )
        return self._writer.write(Op(_UPDATE_ATTEMPT, values, one_row=True, what=f"attempt {attempt_id}"))

    async def list_attempts(self, request_id: str) -> list[AttemptRow]:
        """A request's attempts in the order they started."""
        async with self.sessions() as session:
            rows = await session.scalars(
                select(AttemptRecord).where(AttemptRecord.request_id == request_id).order_by(AttemptRecord.id)
            )
            return [AttemptRow.of(a) for a in rows]

    async def recent_outcomes(
        self, *, per_pair: int = 200
    ) -> dict[tuple[str, str], list[tuple[bool, float]]]:
        """The latest finished attempts per (provider, model), oldest first: (succeeded, seconds).

        Seeds the router's in-memory window at start-up, so its ranking survives a restart.
        """
        a = AttemptRecord
        ranked = (
            select(
                a.provider,
                a.model,
                a.status,
                a.total_ms,
                a.started_at,
                func.row_number()
                .over(partition_by=(a.provider, a.model), order_by=a.started_at.desc())
                .label("rn"),
            )
            .where(a.status.in_(("succeeded", "failed")), a.total_ms.is_not(None))
            .subquery()
        )
        query = (
            select(ranked.c.provider, ranked.c.model, ranked.c.status, ranked.c.total_ms)
            .where(ranked.c.rn <= per_pair)
            .order_by(ranked.c.started_at)
        )
        out: dict[tuple[str, str], list[tuple[bool, float]]] = {}
        async with self.sessions() as session:
            for provider, model, status, total_ms in (await session.execute(query)).all():
                out.setdefault((provider, model), []).append((status == "succeeded", total_ms / 1000))
        return out

    async def attempt_stats(self, model: str, *, since: datetime, until: datetime) -> list[AttemptStats]:
        """Per provider, the finished attempts of `model` started in [since, until); see `AttemptStats`.

        Percentiles are nearest-rank (the value at rank ceil(p * n) of the n sorted samples), computed
        in SQL with window functions, which SQLite (3.25+) and PostgreSQL share.
        """
        a = AttemptRecord
        window = (
            a.model == model,
            a.started_at >= since,
            a.started_at < until,
            a.status.in_(("succeeded", "failed")),  # cancelled (hedge losers) and running: no verdict
        )
        counts = (
            select(
                a.provider,
                func.count().label("attempts"),
                func.sum(case((a.status == "succeeded", 1), else_=0)).label("successes"),
            )
            .where(*window)
            .group_by(a.provider)
        )

        def nearest_rank(column: Any) -> Any:
            ranked = (
                select(
                    a.provider.label("provider"),
                    column.label("v"),
                    func.row_number().over(partition_by=a.provider, order_by=column).label("rn"),
                    func.count().over(partition_by=a.provider).label("n"),
                )
                .where(*window, a.status == "succeeded", column.is_not(None))
                .subquery()
            )
            # ceil(p * n) in integer arithmetic: (n + 1) // 2 for p50, (95 n + 99) // 100 for p95.
            return select(
                ranked.c.provider,
                func.max(case((ranked.c.rn == (ranked.c.n + 1) // 2, ranked.c.v))).label("p50"),
                func.max(case((ranked.c.rn == (95 * ranked.c.n + 99) // 100, ranked.c.v))).label("p95"),
            ).group_by(ranked.c.provider)

        async with self.sessions() as session:
            totals = {r.provider: r for r in await session.execute(counts)}
            total_ms = {r.provider: r for r in await session.execute(nearest_rank(a.total_ms))}
            ttfb_ms = {r.provider: r for r in await session.execute(nearest_rank(a.ttfb_ms))}
        out = []
        for provider in sorted(totals):
            t, g = total_ms.get(provider), ttfb_ms.get(provider)
            out.append(
                AttemptStats(
                    provider=provider,
                    attempts=int(totals[provider].attempts),
                    successes=int(totals[provider].successes or 0),
                    total_p50_ms=t.p50 if t else None,
                    total_p95_ms=t.p95 if t else None,
                    ttfb_p50_ms=g.p50 if g else None,
                )
            )
        return out

    # Images

    def add_images(self, images: list[ImageRow]) -> asyncio.Future[None]:
        """Record saved images, all or none."""
        if not images:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        now = _utcnow()
        rows = [
            dict(
                id=i.id,
                request_id=i.request_id,
                index=i.index,
                path=i.path,
                format=i.format,
                mime=i.mime,
                width=i.width,
                height=i.height,
                bytes=i.bytes,
                created_at=i.created_at or now,
            )
            for i in images
        ]
        return self._writer.write(Op(_INSERT_IMAGE, rows))

    async def get_image(self, image_id: str) -> ImageRow | None:
        async with self.sessions() as session:
            record = await session.get(ImageRecord, image_id)
            return ImageRow.of(record) if record is not None else None

    async def list_images(self, request_id: str) -> list[ImageRow]:
        """A request's images in output order."""
        async with self.sessions() as session:
            rows = await session.scalars(
                select(ImageRecord).where(ImageRecord.request_id == request_id).order_by(ImageRecord.index)
            )
            return [ImageRow.of(i) for i in rows]

    # API keys

    async def create_api_key(
        self,
        *,
        id: str,
        name: str,
        prefix: str,
        hash: str,
        rate_limit_per_minute: int | None = None,
        monthly_budget_usd: float | None = None,
    ) -> ApiKeyRow:
        record = ApiKeyRecord(
            id=id,
            name=name,
            prefix=prefix,
            hash=hash,
            rate_limit_per_minute=rate_limit_per_minute,
            monthly_budget_usd=monthly_budget_usd,
            created_at=_utcnow(),
            revoked_at=None,
        )
        async with self._write() as session:
            session.add(record)
        return ApiKeyRow.of(record)

    async def list_api_keys(self) -> list[ApiKeyRow]:
        """Every key, revoked ones included, oldest first."""
        async with self.sessions() as session:
            rows = await session.scalars(
                select(ApiKeyRecord).order_by(ApiKeyRecord.created_at, ApiKeyRecord.id)
            )
            return [ApiKeyRow.of(k) for k in rows]

    async def count_api_keys(self) -> int:
        async with self.sessions() as session:
            return int(await session.scalar(select(func.count()).select_from(ApiKeyRecord)) or 0)

    async def api_keys_version(self) -> tuple[int, int, datetime | None]:
        """What changes when a key is created or revoked: (keys, revoked keys, latest revocation)."""
        stmt = select(func.count(), func.count(ApiKeyRecord.revoked_at), func.max(ApiKeyRecord.revoked_at))
        async with self.sessions() as session:
            count, revoked, latest = (await session.execute(stmt)).one()
            return int(count), int(revoked), latest

    async def api_key_by_hash(self, key_hash: str) -> ApiKeyRow | None:
        async with self.sessions() as session:
            record = await session.scalar(select(ApiKeyRecord).where(ApiKeyRecord.hash == key_hash))
            return ApiKeyRow.of(record) if record is not None else None

    async def revoke_api_key(self, key_id: str) -> ApiKeyRow | None:
        """Stamp revoked_at (kept if already revoked); None when there is no such key."""
        async with self._write() as session:
            record = await session.get(ApiKeyRecord, key_id)
            if record is None:
                return None
            if record.revoked_at is None:
                record.revoked_at = _utcnow()
            return ApiKeyRow.of(record)

    async def key_usage(self, api_key_id: str | None, *, since: datetime | None = None) -> UsageTotals:
        """A key's requests since `since` (all time when None); api_key_id None: keyless requests."""
        r = RequestRecord
        owner = r.api_key_id.is_(None) if api_key_id is None else r.api_key_id == api_key_id
        stmt = select(
            func.count(),
            func.sum(case((r.status == "succeeded", 1), else_=0)),
            func.sum(r.images),
            func.sum(r.width * r.height * r.images),
            func.sum(r.cost_usd),
        ).where(owner)
        if since is not None:
            stmt = stmt.where(r.created_at >= since)
        async with self.sessions() as session:
            count, succeeded, images, pixels, cost = (await session.execute(stmt)).one()
        return UsageTotals(
            requests=int(count or 0),
            succeeded=int(succeeded or 0),
            images=int(images or 0),
            megapixels=round(float(pixels or 0) / 1e6, 6),
            cost_usd=round(float(cost or 0.0), 6),
        )

    async def key_spend(self, api_key_id: str, *, since: datetime) -> float:
        """What a key's requests since `since` cost (dry runs record 0)."""
        r = RequestRecord
        stmt = select(func.sum(r.cost_usd)).where(r.api_key_id == api_key_id, r.created_at >= since)
        async with self.sessions() as session:
            return float(await session.scalar(stmt) or 0.0)

    # Idempotency

    async def claim_idempotency(
        self,
        *,
        api_key_id: str,
        key: str,
        body_hash: str,
        request_id: str,
        expires_at: datetime,
        stale_before: datetime,
    ) -> IdempotencyRow | None:
        """Claim (api_key_id, key) for a new request: None when claimed, else the row that holds it.

        Expired rows, and in-progress rows older than `stale_before` (their process died), give way.
        """
        for _ in range(5):
            now = _utcnow()
            async with self._write() as session:
                t = IdempotencyRecord
                await session.execute(
                    delete(t).where(
                        t.api_key_id == api_key_id,
                        t.key == key,
                        (t.expires_at <= now) | ((t.state == "in_progress") & (t.created_at < stale_before)),
                    )
                )
            try:
                async with self._write() as session:
                    session.add(
                        IdempotencyRecord(
                            api_key_id=api_key_id,
                            key=key,
                            body_hash=body_hash,
                            request_id=request_id,
                            state="in_progress",
                            created_at=now,
                            expires_at=expires_at,
                        )
                    )
                return None
            except IntegrityError:
                existing = await self.get_idempotency(api_key_id, key)
                if existing is not None:
                    return existing
        raise RuntimeError(f"could not claim idempotency key {key!r}")

    async def get_idempotency(self, api_key_id: str, key: str) -> IdempotencyRow | None:
        async with self.sessions() as session:
            record = await session.get(IdempotencyRecord, (api_key_id, key))
            return IdempotencyRow.of(record) if record is not None else None

    async def finish_idempotency(
        self, api_key_id: str, key: str, *, status_code: int, headers: dict[str, str], body: str
    ) -> None:
        async with self._write() as session:
            t = IdempotencyRecord
            await session.execute(
                update(t)
                .where(t.api_key_id == api_key_id, t.key == key)
                .values(state="done", status_code=status_code, headers=headers, body=body)
            )

    async def release_idempotency(self, api_key_id: str, key: str) -> None:
        """Forget an in-progress claim (the answer is not to be kept, e.g. a 5xx): a retry runs again."""
        async with self._write() as session:
            t = IdempotencyRecord
            await session.execute(delete(t).where(t.api_key_id == api_key_id, t.key == key))

    async def purge_idempotency(self) -> int:
        """Delete expired answers; returns how many."""
        async with self._write() as session:
            result = cast(
                CursorResult[Any],
                await session.execute(
                    delete(IdempotencyRecord).where(IdempotencyRecord.expires_at <= _utcnow())
                ),
            )
            return result.rowcount

    # Crash repair

    async def mark_interrupted(self) -> int:
        """At start-up: requests left queued/running become interrupted, running attempts failed.

        Returns how many requests were interrupted. Assumes one server per database: a second
        server starting would interrupt the first one's requests in flight.
        """
        async with self._write() as session:
            # Any attempt still running belongs to a process that is gone.
            await session.execute(
                update(AttemptRecord)
                .where(AttemptRecord.status == "running")
                .values(status="failed", error=INTERRUPTED_ERROR),
                execution_options={"synchronize_session": False},
            )
            result = cast(
                CursorResult[Any],
                await session.execute(
                    update(RequestRecord)
                    .where(RequestRecord.status.in_(_REQUEST_IN_FLIGHT))
                    .values(status="interrupted", error=INTERRUPTED_ERROR),
                    execution_options={"synchronize_session": False},
                ),
            )
            return result.rowcount

    # Link expiry and blob-store repair (see storage/repair.py)

    async def image_paths(
        self, *, created_from: datetime | None = None, created_before: datetime | None = None
    ) -> list[tuple[str, str, str, datetime, int]]:
        """(id, request_id, path, created_at, bytes) of the images created in [created_from,
        created_before)."""
        stmt = select(
            ImageRecord.id,
            ImageRecord.request_id,
            ImageRecord.path,
            ImageRecord.created_at,
            ImageRecord.bytes,
        )
        if created_from is not None:
            stmt = stmt.where(ImageRecord.created_at >= created_from)
        if created_before is not None:
            stmt = stmt.where(ImageRecord.created_at < created_before)
        async with self.sessions() as session:
            rows = await session.execute(stmt)
            return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def delete_images(self, image_ids: list[str]) -> int:
        """Remove image records (their files are gone); returns how many were removed."""
        removed = 0
        for start in range(0, len(image_ids), 500):  # stays under SQLite's bound-parameter limit
            chunk = image_ids[start : start + 500]
            async with self._write() as session:
                result = cast(
                    CursorResult[Any],
                    await session.execute(
                        delete(ImageRecord).where(ImageRecord.id.in_(chunk)),
                        execution_options={"synchronize_session": False},
                    ),
                )
                removed += result.rowcount
        return removed
