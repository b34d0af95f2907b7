"""The typed records the storage hands out (frozen snapshots of rows), their statuses, and totals."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Final, Literal, Self

from sqlalchemy.engine import RowMapping

__all__ = [
    "ATTEMPT_STATUSES",
    "INTERRUPTED_ERROR",
    "OPERATIONS",
    "REQUEST_STATUSES",
    "ApiKeyRow",
    "AttemptRow",
    "AttemptStats",
    "AttemptStatus",
    "IdempotencyRow",
    "ImageRow",
    "Operation",
    "RequestRow",
    "RequestStatus",
    "UsageTotals",
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
REQUEST_FINAL: Final = frozenset({"succeeded", "failed", "rejected", "dry_run", "interrupted", "cancelled"})
REQUEST_IN_FLIGHT: Final = ("queued", "running")
ATTEMPT_STATUSES: Final = frozenset({"running", "succeeded", "failed", "cancelled"})
ATTEMPT_FINAL: Final = frozenset({"succeeded", "failed", "cancelled"})

INTERRUPTED_ERROR: Final[dict[str, Any]] = {
    "status": 500,
    "type": "server_error",
    "code": "interrupted",
    "param": None,
    "message": "The server stopped before this request finished.",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def check(value: str, allowed: frozenset[str], what: str) -> None:
    """Refuse a status or operation the schema does not know, before anything is written."""
    if value not in allowed:
        raise ValueError(f"invalid {what} {value!r}; expected one of {sorted(allowed)}")


class _Snapshot:
    """`Row.of(row)`: a frozen copy of a fetched row's columns, so callers never hold a live result
    (each record's fields are named exactly like its table's columns)."""

    __slots__ = ()

    @classmethod
    def of(cls, row: RowMapping) -> Self:
        return cls(**{f.name: row[f.name] for f in fields(cls)})  # type: ignore[arg-type]

    def columns(self) -> dict[str, Any]:
        """The snapshot as column values, e.g. for an insert."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


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
