"""Bearer API keys on every /v1 route, per-key rate limits and monthly budgets.

The check lives in an ASGI middleware keyed on the path, not in per-route dependencies, so a new
/v1 route cannot be added without it (tests/test_auth.py enumerates the routes to prove it).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from fluxport.domain.errors import (
    BudgetExceeded,
    FluxportError,
    InvalidApiKey,
    RateLimited,
    StorageUnavailable,
)
from fluxport.keys import hash_key, month_start, shown_prefix
from fluxport.live import LocalWindows, Windows
from fluxport.settings import Settings
from fluxport.storage.db import ApiKeyRow, Database

log = logging.getLogger("fluxport.auth")

# Key lookups are cached with no lifetime; the keys table is watched this often instead, and any
# change (a key created or revoked, by this server or the CLI) empties the cache: revocation takes
# effect within about this long, and no request reads the database to check its key.
KEY_WATCH_INTERVAL_S = 1.0
_KEY_CACHE_MAX = 10_000
RATE_WINDOW_S = 60.0


def protected(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


@dataclass
class KeyAuth:
    """Key lookups (cached until the keys table changes), the per-key sliding-window rate
    limiter and the budget check.

    The rate windows are this process's own, or with Redis shared by every replica (live/).
    """

    settings: Settings
    db: Database
    windows: Windows = field(default_factory=LocalWindows)
    _cache: dict[str, ApiKeyRow | None] = field(default_factory=dict)
    _version: tuple[object, ...] | None = None

    async def lookup(self, secret: str) -> ApiKeyRow | None:
        digest = hash_key(secret)
        if digest in self._cache:
            return self._cache[digest]
        try:
            row = await self.db.api_key_by_hash(digest)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("API key lookup failed: %r", exc)
            raise StorageUnavailable(
                "The database is unreachable, so the API key cannot be checked."
            ) from exc
        if row is not None and not hmac.compare_digest(row.hash, digest):
            row = None
        if len(self._cache) >= _KEY_CACHE_MAX:
            self._cache.clear()
        self._cache[digest] = row
        return row

    async def watch(self, interval_s: float = KEY_WATCH_INTERVAL_S) -> None:
        """Empty the lookup cache whenever the keys table changes (a lifespan task)."""
        if self.settings.auth == "none":
            return
        while True:
            try:
                version = await self.db.api_keys_version()
            except Exception:  # the check failed: trust nothing cached until it works again
                log.exception("checking the API keys failed; dropping cached keys")
                version = None
            if version is None or version != self._version:
                self._cache.clear()
            self._version = version
            await asyncio.sleep(interval_s)

    async def authenticate(self, authorization: str | None) -> ApiKeyRow | None:
        """The calling key; None when auth is off. Raises InvalidApiKey."""
        if self.settings.auth == "none":
            return None
        scheme, _, secret = (authorization or "").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise InvalidApiKey(
                "Missing API key: send 'Authorization: Bearer <key>' "
                "(create one with `fluxport keys create`)."
            )
        row = await self.lookup(secret)
        if row is None:
            raise InvalidApiKey("Incorrect API key provided.")
        if row.revoked_at is not None:
            raise InvalidApiKey(f"API key {shown_prefix(row)} was revoked.")
        return row

    async def check_rate(self, key: ApiKeyRow) -> None:
        """Count one request against the key's per-minute limit; raises RateLimited when over it."""
        limit = key.rate_limit_per_minute
        if not limit:
            return
        retry_after = await self.windows.hit("key", key.id, limit, RATE_WINDOW_S)
        if retry_after is not None:
            raise RateLimited(
                f"Rate limit reached for API key {shown_prefix(key)}: {limit} requests per minute. "
                f"Try again in {max(1, round(retry_after))} s.",
                retry_after=retry_after,
            )

    async def check_budget(self, key: ApiKeyRow | None) -> None:
        """Refuse a paid request once the key's spend this UTC month has reached its budget."""
        if key is None or key.monthly_budget_usd is None:
            return
        try:
            spent = await self.db.key_spend(key.id, since=month_start())
        except (SQLAlchemyError, OSError) as exc:
            raise StorageUnavailable("The database is unreachable, so the budget cannot be checked.") from exc
        if spent >= key.monthly_budget_usd:
            raise BudgetExceeded(
                f"API key {shown_prefix(key)} has spent ${spent:.4f} this month (UTC), which reaches its "
                f"monthly budget of ${key.monthly_budget_usd:.4f}. Raise the budget or wait for next month."
            )


def calling_key(request: Request) -> ApiKeyRow | None:
    """The key the auth middleware accepted for this request (None with auth none)."""
    key: ApiKeyRow | None = getattr(request.state, "api_key", None)
    return key


def key_auth(request: Request) -> KeyAuth:
    auth: KeyAuth = request.app.state.auth
    return auth


class ApiKeyAuth:
    """Pure ASGI middleware: every path under /v1 needs a valid key (unless auth is none)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        auth: KeyAuth = scope["app"].state.auth
        headers = dict(scope["headers"])
        try:
            raw = headers.get(b"authorization")
            key = await auth.authenticate(raw.decode("latin-1") if raw is not None else None)
            if key is not None:
                await auth.check_rate(key)
        except FluxportError as exc:
            response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)
