"""The playground's per-client rate limit: a sliding one-minute window, keyed by client IP."""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque

from fastapi import Request

from fluxport.domain.errors import RateLimited


class RateLimiter:
    """A sliding one-minute window of submissions per client, bounded in clients remembered."""

    def __init__(self, per_minute: int, max_clients: int = 10_000) -> None:
        self.per_minute = per_minute
        self.max_clients = max_clients
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def hit(self, client: str, now: float | None = None) -> None:
        """Count one submission, or raise RateLimited (429, Retry-After) when over the limit."""
        if self.per_minute <= 0:
            return
        now = time.monotonic() if now is None else now
        hits = self._hits.pop(client, None) or deque()
        while hits and hits[0] <= now - 60:
            hits.popleft()
        self._hits[client] = hits
        while len(self._hits) > self.max_clients:
            self._hits.popitem(last=False)
        if len(hits) >= self.per_minute:
            retry = max(1, math.ceil(hits[0] + 60 - now))
            raise RateLimited(
                f"Playground rate limit reached: {self.per_minute} generations per minute per client. "
                f"Try again in {retry} s, or use the API with a key.",
                retry_after=retry,
            )
        hits.append(now)


def client_key(request: Request) -> str:
    """The key a client is limited by: its IP address."""
    return request.client.host if request.client else "unknown"
