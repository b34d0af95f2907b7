"""Live state: what the replicas of one gateway must agree on from second to second.

Without `FLUXPORT_REDIS_URL` (the embedded default) it lives in this process's memory, as with
one server. With it, the per-key and per-IP rate limits (live/windows.py) and the hosted
providers' circuit breakers (live/breakers.py) are shared by every replica through Redis.
Revocation and Idempotency-Key answers need no Redis: they live in the database, which every
replica already shares (api/auth.py watches the keys table; api/idempotency.py claims a row).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fluxport.gateway.router import Router
from fluxport.live.redis import RedisLink, Unavailable
from fluxport.live.windows import LocalWindows, RedisWindows, Windows
from fluxport.settings import Settings

__all__ = ["LiveState", "LocalWindows", "RedisLink", "Unavailable", "Windows"]


@dataclass
class LiveState:
    """The rate-limit windows every limiter uses, and (with Redis) the breaker sync task."""

    windows: Windows
    link: RedisLink | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: Settings) -> LiveState:
        if not settings.redis_url:
            return cls(LocalWindows())
        link = RedisLink(settings.redis_url, prefix=settings.redis_prefix)
        return cls(RedisWindows(link), link)

    @property
    def mode(self) -> str:
        return "redis" if self.link is not None else "memory"

    def status(self) -> dict[str, Any]:
        if self.link is None:
            return {"live_state": "memory"}
        return self.link.status()

    async def start(self, router: Router, pairs: Iterable[tuple[str, str]]) -> None:
        """Share `router`'s breakers for `pairs` (provider, model); say at once if Redis is down."""
        if self.link is None:
            return
        from fluxport.live.breakers import SharedBreakers

        await self.link.ping()  # logs the outage now, rather than on the first request
        breakers = SharedBreakers(self.link, router, pairs)
        self._tasks.append(asyncio.create_task(breakers.run(), name="fluxport-shared-breakers"))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.link is not None:
            await self.link.aclose()
