"""API keys: minting, hashing and lookup helpers shared by the server and the CLI."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

from fluxport.storage.db import ApiKeyRow, Database

KEY_PREFIX = "fp_"
# 32 url-safe base64 characters carry 192 bits: far beyond guessing, so one unsalted SHA-256 is
# a sound verifier (there is no dictionary to attack) and lookups stay a single indexed query.
_SECRET_BYTES = 24
PREFIX_CHARS = 10  # "fp_" + 7: what lists show


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def shown_prefix(row: ApiKeyRow) -> str:
    return f"{row.prefix}…"


def month_start(now: datetime | None = None) -> datetime:
    """Midnight UTC on the first of the current month: budgets and "this month" start here."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


async def create_key(
    db: Database,
    *,
    name: str,
    rate_limit_per_minute: int | None = None,
    monthly_budget_usd: float | None = None,
) -> tuple[ApiKeyRow, str]:
    """Mint and store a key; returns the row and the secret, which is never stored or shown again."""
    secret = new_secret()
    row = await db.create_api_key(
        id=f"key_{secrets.token_hex(6)}",
        name=name,
        prefix=secret[:PREFIX_CHARS],
        hash=hash_key(secret),
        rate_limit_per_minute=rate_limit_per_minute,
        monthly_budget_usd=monthly_budget_usd,
    )
    return row, secret


async def find_key(db: Database, ref: str) -> ApiKeyRow | None:
    """A key by id, by its shown prefix (with or without the ellipsis) or by the whole secret.

    Raises LookupError when a prefix matches more than one key.
    """
    ref = ref.strip().rstrip("…").rstrip(".")
    rows = await db.list_api_keys()
    by_id = [r for r in rows if r.id == ref]
    if by_id:
        return by_id[0]
    if ref.startswith(KEY_PREFIX) and len(ref) > PREFIX_CHARS:
        digest = hash_key(ref)
        return next((r for r in rows if secrets.compare_digest(r.hash, digest)), None)
    matches = [r for r in rows if ref and r.prefix.startswith(ref)] if len(ref) >= 4 else []
    if len(matches) > 1:
        raise LookupError(f"{ref!r} matches {len(matches)} keys: {', '.join(r.id for r in matches)}")
    return matches[0] if matches else None
