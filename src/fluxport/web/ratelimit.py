"""The playground's per-client rate limit: a sliding one-minute window, keyed by client IP."""

from __future__ import annotations

import math

from fastapi import Request

from fluxport.domain.errors import RateLimited
from fluxport.live import LocalWindows, Windows

WINDOW_S = 60.0


class RateLimiter:
    """Submissions per client per minute, in the windows every replica shares (or this process's)."""

    def __init__(self, per_minute: int, windows: Windows | None = None) -> None:
        self.per_minute = per_minute
        self.windows = windows or LocalWindows()

    async def hit(self, client: str) -> None:
        """Count one submission, or raise RateLimited (429, Retry-After) when over the limit."""
        if self.per_minute <= 0:
            return
        wait = await self.windows.hit("playground", client, self.per_minute, WINDOW_S)
        if wait is not None:
            retry = max(1, math.ceil(wait))
            raise RateLimited(
                f"Playground rate limit reached: {self.per_minute} generations per minute per client. "
                f"Try again in {retry} s, or use the API with a key.",
                retry_after=retry,
            )


def client_key(request: Request) -> str:
    """The key a client is limited by: its IP address."""
    return request.client.host if request.client else "unknown"
