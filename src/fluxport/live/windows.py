"""Sliding-window rate limits: in this process, or shared by every replica through Redis.

A limit is `limit` hits per `window_s` for one key within a scope (an API key's id, a client IP).
`hit` counts one hit and returns None, or refuses it and returns the seconds until the oldest
hit leaves the window (for Retry-After). A refused hit is not counted.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from fluxport.live.redis import RedisLink, Unavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["LocalWindows", "RedisWindows", "Windows"]

MAX_KEYS: Final = 100_000


class Windows(Protocol):
    async def hit(self, scope: str, key: str, limit: int, window_s: float) -> float | None: ...


class LocalWindows:
    """Hit times per key in memory; the least recently used keys are forgotten beyond max_keys."""

    def __init__(self, max_keys: int = MAX_KEYS, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_keys = max_keys
        self.clock = clock
        self._hits: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    async def hit(self, scope: str, key: str, limit: int, window_s: float) -> float | None:
        return self.hit_now(scope, key, limit, window_s)

    def hit_now(
        self, scope: str, key: str, limit: int, window_s: float, now: float | None = None
    ) -> float | None:
        now = self.clock() if now is None else now
        hits = self._hits.pop((scope, key), None) or deque()
        while hits and hits[0] <= now - window_s:
            hits.popleft()
        self._hits[(scope, key)] = hits
        while len(self._hits) > self.max_keys:
            self._hits.popitem(last=False)
        if len(hits) >= limit:
            return hits[0] + window_s - now
        hits.append(now)
        return None


# One round trip, atomic: drop the hits older than the window, refuse when `limit` remain (and
# say when the oldest leaves), else add this one. Redis's own clock, so that replicas whose
# clocks differ still share one window. Times in microseconds.
_HIT_SCRIPT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return tonumber(oldest[2]) + window - now
end
redis.call('ZADD', KEYS[1], now, now .. ':' .. ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1000)
return -1
"""


class RedisWindows:
    """Windows in Redis sorted sets, shared by every replica; this process's own while it is down."""

    def __init__(self, link: RedisLink, fallback: LocalWindows | None = None) -> None:
        self.link = link
        self.fallback = fallback or LocalWindows()
        self._script = link.client.register_script(_HIT_SCRIPT)
        self._token = secrets.token_hex(4)  # members stay unique across replicas
        self._count = 0

    async def hit(self, scope: str, key: str, limit: int, window_s: float) -> float | None:
        self._count += 1
        member = f"{self._token}{self._count}"
        redis_key = self.link.key("rate", scope, key)

        async def run(_client: Redis) -> object:
            return await self._script(keys=[redis_key], args=[int(window_s * 1e6), limit, member])

        try:
            wait_us = await self.link.run(run)
        except Unavailable:
            return await self.fallback.hit(scope, key, limit, window_s)
        wait = int(wait_us)  # type: ignore[call-overload]
        return None if wait < 0 else wait / 1e6
