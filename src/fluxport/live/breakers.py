"""Circuit breakers shared by every replica: a hosted provider down for one is down for all.

Each replica's router decides on its own, at once, as with one process (gateway/router.py); this
spreads what it saw. Outcomes are queued, never waited on, and every `TICK_S` one pipelined round
trip to Redis writes them and reads back what every replica wrote:

- `breaker:fails:<provider>:<model>` counts consecutive failures across replicas (a success
  anywhere resets it); reaching `breaker_failures` trips the breaker for everyone;
- `breaker:open:<p>:<m>` exists while the breaker is open (its TTL is the cool-down left);
- `breaker:tripped:<p>:<m>` exists from a trip until a probe succeeds (the cool-down's length).

So a trip reaches every replica within `TICK_S` plus a round trip. The local provider is left out:
it is a different GPU on every replica. While Redis is down each router goes on alone, and what it
queued meanwhile is written when Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from fluxport.gateway.router import Router
from fluxport.live.redis import RedisLink, Unavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["TICK_S", "SharedBreakers"]

log = logging.getLogger("fluxport.live")

TICK_S: Final = 0.25
COUNT_TTL_S: Final = 3600


@dataclass
class _Pending:
    reset: bool = False  # a success came first: the shared count starts again
    failures: int = 0  # failures since the last success
    opened_s: float | None = None  # this router opened the breaker for this long
    closed: bool = False  # this router's probe succeeded

    def merge_after(self, later: _Pending) -> None:
        if later.reset:
            self.reset, self.failures = True, later.failures
        else:
            self.failures += later.failures
        if later.closed:
            self.closed, self.opened_s = True, None
        if later.opened_s is not None:
            self.opened_s, self.closed = later.opened_s, False


class SharedBreakers:
    """The router's BreakerListener, and the task that keeps its breakers in step with Redis."""

    def __init__(
        self,
        link: RedisLink,
        router: Router,
        pairs: Iterable[tuple[str, str]],
        *,
        local_only: frozenset[str] = frozenset({"local"}),
    ) -> None:
        self.link = link
        self.router = router
        self.local_only = local_only
        self._pairs: dict[tuple[str, str], None] = dict.fromkeys(p for p in pairs if p[0] not in local_only)
        self._pending: dict[tuple[str, str], _Pending] = {}
        router.listener = self

    # -- BreakerListener (called by the router, synchronously) ---------------------------------------

    def outcome(self, provider: str, model: str, *, ok: bool, opened_s: float | None, closed: bool) -> None:
        if provider in self.local_only:
            return
        self._queue(
            (provider, model), _Pending(reset=ok, failures=0 if ok else 1, opened_s=opened_s, closed=closed)
        )

    def _queue(self, pair: tuple[str, str], event: _Pending) -> None:
        self._pairs.setdefault(pair, None)
        pending = self._pending.get(pair)
        if pending is None:
            self._pending[pair] = event
        else:
            pending.merge_after(event)

    # -- the sync task -----------------------------------------------------------------------------

    async def run(self, tick_s: float = TICK_S) -> None:
        """Sync every `tick_s` until cancelled (a lifespan task)."""
        while True:
            try:
                await self.sync_once()
            except Unavailable:
                pass  # logged by the link; the routers go on alone
            except Exception:
                log.exception("sharing circuit breakers through Redis failed")
            await asyncio.sleep(tick_s)

    async def sync_once(self) -> None:
        pending, self._pending = self._pending, {}
        pairs = list(self._pairs)
        threshold = self.router.settings.breaker_failures

        async def run(client: Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for (provider, model), p in pending.items():
                fails, opened, tripped = self._keys(provider, model)
                if p.reset:
                    pipe.delete(fails)
                if p.failures:
                    pipe.incrby(fails, p.failures)
                    pipe.expire(fails, COUNT_TTL_S)
                if p.closed:
                    pipe.delete(opened, tripped, fails)
                if p.opened_s is not None:
                    pipe.set(opened, p.opened_s, px=max(1, int(p.opened_s * 1000)))
                    pipe.set(tripped, p.opened_s, ex=COUNT_TTL_S)
            for provider, model in pairs:
                fails, opened, tripped = self._keys(provider, model)
                pipe.pttl(opened)
                pipe.get(tripped)
                pipe.get(fails)
            return list(await pipe.execute())

        try:
            results = await self.link.run(run)
        except Unavailable:
            # Nothing was written: keep it for the next try, before anything queued since.
            for pair, later in self._pending.items():
                if pair in pending:
                    pending[pair].merge_after(later)
                else:
                    pending[pair] = later
            self._pending = pending
            raise
        reads = results[len(results) - 3 * len(pairs) :]
        for i, (provider, model) in enumerate(pairs):
            if (provider, model) in self._pending:
                continue  # this router changed it meanwhile: its news goes out first
            pttl, tripped, fails = reads[3 * i : 3 * i + 3]
            if tripped is not None:
                left = int(pttl) / 1000 if int(pttl) > 0 else 0.0
                self.router.apply_shared(provider, model, open_s=left, cooldown_s=float(tripped))
            elif fails is not None and int(fails) >= threshold:
                cooldown = self.router.trip(provider, model)
                self._queue((provider, model), _Pending(opened_s=cooldown))
                log.warning(
                    "%s failed %s times in a row across replicas for %s: breaker open for %.0f s",
                    provider,
                    int(fails),
                    model,
                    cooldown,
                )
            else:
                self.router.apply_shared(provider, model, open_s=None, cooldown_s=0.0)

    def _keys(self, provider: str, model: str) -> tuple[str, str, str]:
        return (
            self.link.key("breaker", "fails", provider, model),
            self.link.key("breaker", "open", provider, model),
            self.link.key("breaker", "tripped", provider, model),
        )
