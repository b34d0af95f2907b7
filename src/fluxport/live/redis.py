"""The Redis connection behind the shared live state, and what happens when it goes away.

Every caller goes through `RedisLink.run`: while Redis answers, the replicas share their limits
and breakers through it; when it stops answering, `run` raises `Unavailable` at once for the next
`RETRY_AFTER_S` (no request waits on a dead server) and the callers fall back to this process's
own state. The change is logged once each way, and `/healthz` reports it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from fluxport.settings import redact_url

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["KEY_PREFIX", "RedisLink", "Unavailable"]

log = logging.getLogger("fluxport.live")

KEY_PREFIX: Final = "fluxport:"
# After a failure, Redis is left alone this long before the next try.
RETRY_AFTER_S: Final = 1.0
# A command that takes longer than this counts as Redis being down (requests wait on it).
COMMAND_TIMEOUT_S: Final = 0.5

T = TypeVar("T")


class Unavailable(Exception):
    """Redis did not answer; use this process's own state."""


class RedisLink:
    """One asyncio Redis client (its own connection pool) and its health."""

    def __init__(self, url: str, *, prefix: str = KEY_PREFIX) -> None:
        try:
            from redis.asyncio import Redis
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise RuntimeError(
                "FLUXPORT_REDIS_URL is set but the redis package is not installed: "
                "pip install 'fluxport[redis]'"
            ) from exc
        self.url = url
        self.prefix = prefix
        self.client: Redis = Redis.from_url(
            url,
            socket_timeout=COMMAND_TIMEOUT_S,
            socket_connect_timeout=COMMAND_TIMEOUT_S,
            health_check_interval=30,
        )
        self._down_since: float | None = None
        self._retry_at = 0.0
        self.last_error: str | None = None

    @property
    def up(self) -> bool:
        return self._down_since is None

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def run(self, command: Callable[[Redis], Awaitable[T]]) -> T:
        """Run `command(client)`; raises Unavailable (and notes the outage) when Redis fails."""
        from redis.exceptions import RedisError

        if self._down_since is not None and time.monotonic() < self._retry_at:
            raise Unavailable(self.last_error)
        try:
            result = await command(self.client)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            raise Unavailable(self.last_error) from exc
        if self._down_since is not None:
            log.warning(
                "Redis at %s is back after %.1f s: limits and breakers are shared again",
                redact_url(self.url),
                time.monotonic() - self._down_since,
            )
            self._down_since, self.last_error = None, None
        return result

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._retry_at = now + RETRY_AFTER_S
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self._down_since is None:
            self._down_since = now
            log.error(
                "Redis at %s is unreachable (%s): rate limits and circuit breakers fall back to this "
                "process's own until it is back; requests go on being served",
                redact_url(self.url),
                self.last_error,
            )

    async def ping(self) -> bool:
        try:
            await self.run(lambda r: _ping(r))
        except Unavailable:
            return False
        return True

    def status(self) -> dict[str, Any]:
        if self.up:
            return {"live_state": "redis", "redis": "ok"}
        return {
            "live_state": "redis",
            "redis": f"unreachable since {time.monotonic() - (self._down_since or 0):.0f} s "
            f"({self.last_error}); limits and breakers per process meanwhile",
        }

    async def aclose(self) -> None:
        await self.client.aclose()


async def _ping(client: Redis) -> Any:
    return await client.ping()
