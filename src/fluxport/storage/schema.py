"""The tables: one SQLAlchemy Core declaration each, on one `metadata`.

The schema is owned by the Alembic migrations in `storage/migrations/`; `Database.open` runs them to
head, so these tables must stay in step with the latest revision (a test checks this).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
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
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeEngine

__all__ = [
    "UTCDateTime",
    "api_keys",
    "attempts",
    "idempotency",
    "images",
    "json_type",
    "metadata",
    "requests",
]


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


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# One client request, whatever happened to it.
requests = Table(
    "requests",
    metadata,
    Column("id", String, primary_key=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("model", String, nullable=False),
    Column("operation", String, nullable=False),
    Column("prompt", Text, nullable=False),
    Column("params", json_type(), nullable=False),
    Column("provider", String),
    Column("status", String, nullable=False),
    Column("error", json_type()),
    Column("queued_ms", Double),
    Column("generation_ms", Double),
    Column("ttfb_ms", Double),
    Column("total_ms", Double),
    Column("width", Integer),
    Column("height", Integer),
    Column("n", Integer, nullable=False),
    Column("images", Integer, nullable=False, default=0, server_default=text("0")),
    Column("revised_prompt", Text),
    # Everything the providers billed for this request: winner, hedge losers, billed failures.
    Column("cost_usd", Double),
    Column("client_disconnected", Boolean, nullable=False, default=False, server_default=false()),
    Column("finished_at", UTCDateTime()),
    # The API key that made the request; None for keyless requests (auth none, playground).
    Column("api_key_id", String),
    Index("ix_requests_model_created_at", "model", "created_at"),
    Index("ix_requests_status", "status"),
    Index("ix_requests_api_key_id_created_at", "api_key_id", "created_at"),
)

# One call to one provider on behalf of a request (failover and hedging make several).
attempts = Table(
    "attempts",
    metadata,
    # BIGINT on PostgreSQL; SQLite only autoincrements a column declared exactly INTEGER.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("request_id", String, ForeignKey("requests.id", ondelete="CASCADE"), nullable=False),
    Column("provider", String, nullable=False),
    Column("model", String, nullable=False),
    Column("status", String, nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime()),
    Column("queued_ms", Double),
    # Hosted providers: milliseconds from the attempt's start to the submit answer / first status.
    Column("submitted_ms", Double),
    Column("first_status_ms", Double),
    Column("ttfb_ms", Double),
    Column("generation_ms", Double),
    Column("total_ms", Double),
    Column("error", json_type()),
    Column("provider_request_id", String),
    Column("normalization", json_type()),
    Column("billed_usd", Double),
    Index("ix_attempts_model_provider_started_at", "model", "provider", "started_at"),
    Index("ix_attempts_request_id", "request_id"),
)

# One stored image file; `id` is the unguessable token that appears in image URLs.
images = Table(
    "images",
    metadata,
    Column("id", String, primary_key=True),
    Column("request_id", String, ForeignKey("requests.id", ondelete="CASCADE"), nullable=False),
    Column("index", Integer, nullable=False),
    Column("path", String, nullable=False),
    Column("format", String, nullable=False),
    Column("mime", String, nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    UniqueConstraint("request_id", "index"),
    Index("ix_images_request_id", "request_id"),
)

# An API key: only the SHA-256 of the secret is kept; `prefix` is its first characters, for lists.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String, primary_key=True),
    Column("name", String, nullable=False),
    Column("prefix", String, nullable=False),
    Column("hash", String, nullable=False),
    Column("rate_limit_per_minute", Integer),
    Column("monthly_budget_usd", Double),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime()),
    UniqueConstraint("hash"),
)

# The answer to one Idempotency-Key of one API key ("" without auth): in progress, then stored.
idempotency = Table(
    "idempotency",
    metadata,
    Column("api_key_id", String, primary_key=True),
    Column("key", String, primary_key=True),
    Column("body_hash", String, nullable=False),
    Column("request_id", String, nullable=False),
    Column("state", String, nullable=False),  # in_progress | done
    Column("status_code", Integer),
    Column("headers", json_type()),
    Column("body", Text),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Index("ix_idempotency_expires_at", "expires_at"),
)
