"""Shared live state on a real Redis: rate windows and circuit breakers across replicas, and what
happens when Redis goes away mid-run (requests go on, limits fall back to per process)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fluxport.gateway.router import BreakerState, Router
from fluxport.live.breakers import SharedBreakers
from fluxport.live.redis import RedisLink
from fluxport.live.windows import LocalWindows, RedisWindows
from fluxport.settings import Settings
from tests.services import private_redis, redis_or_skip, start_redis, unique_prefix


@pytest.fixture
async def links() -> AsyncIterator[tuple[RedisLink, RedisLink]]:
    """Two replicas' connections to the test Redis, on keys of this test's own."""
    url = redis_or_skip()
    prefix = unique_prefix()
    a, b = RedisLink(url, prefix=prefix), RedisLink(url, prefix=prefix)
    yield a, b
    keys = [k async for k in a.client.scan_iter(match=f"{prefix}*")]
    if keys:
        await a.client.delete(*keys)
    await a.aclose()
    await b.aclose()


async def test_one_window_across_replicas_is_exact(links: tuple[RedisLink, RedisLink]) -> None:
    a, b = (RedisWindows(link) for link in links)
    # 20 concurrent hits through two "replicas" against a limit of 5: exactly 5 get through.
    results = await asyncio.gather(*(w.hit("key", "k1", 5, 60) for w in (a, b) for _ in range(10)))
    allowed = [r for r in results if r is None]
    assert len(allowed) == 5
    waits = [r for r in results if r is not None]
    assert all(0 < w <= 60 for w in waits)
    # Another key, and another scope, have windows of their own.
    assert await a.hit("key", "k2", 5, 60) is None
    assert await b.hit("playground", "k1", 5, 60) is None


async def test_window_slides(links: tuple[RedisLink, RedisLink]) -> None:
    a, b = (RedisWindows(link) for link in links)
    assert await a.hit("key", "slide", 2, 0.5) is None
    assert await b.hit("key", "slide", 2, 0.5) is None
    wait = await a.hit("key", "slide", 2, 0.5)
    assert wait is not None and 0 < wait <= 0.5
    await asyncio.sleep(wait + 0.05)
    assert await b.hit("key", "slide", 2, 0.5) is None  # the oldest hit has left the window


async def test_unreachable_redis_falls_back_per_process(caplog: pytest.LogCaptureFixture) -> None:
    from tests.services import free_port

    link = RedisLink(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    windows = RedisWindows(link, LocalWindows())
    with caplog.at_level(logging.ERROR, logger="fluxport.live"):
        results = [await windows.hit("key", "k", 3, 60) for _ in range(5)]
    # Still limited, by this process's own window.
    assert [r is None for r in results] == [True, True, True, False, False]
    assert not link.up and "unreachable" in link.status()["redis"]
    # Logged once, not once per request.
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1
    await link.aclose()


async def test_redis_going_away_mid_run_and_coming_back(tmp_path: Path) -> None:
    with private_redis(tmp_path) as (url, proc, port):
        link = RedisLink(url, prefix=unique_prefix())
        windows = RedisWindows(link)
        assert await windows.hit("key", "k", 100, 60) is None and link.up
        proc.kill()
        proc.wait()
        # Served from this process's window while Redis is gone, without waiting on it.
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await windows.hit("key", "k", 100, 60) is None
        assert await windows.hit("key", "k", 100, 60) is None
        assert loop.time() - started < 2.0
        assert not link.up
        restarted = start_redis(None, port, tmp_path)
        try:
            await asyncio.sleep(1.1)  # the link leaves a dead server alone for a second
            assert await windows.hit("key", "k", 100, 60) is None
            assert link.up
        finally:
            restarted.kill()
            restarted.wait()
        await link.aclose()


def _router() -> Router:
    return Router(Settings(breaker_failures=3, breaker_cooldown_s=30.0))


async def test_breaker_tripped_on_one_replica_opens_on_the_other(
    links: tuple[RedisLink, RedisLink],
) -> None:
    ra, rb = _router(), _router()
    sa = SharedBreakers(links[0], ra, [("fal", "flux.2-dev")])
    sb = SharedBreakers(links[1], rb, [("fal", "flux.2-dev")])
    for _ in range(3):
        ra.record("fal", "flux.2-dev", ok=False, seconds=1.0)
    assert ra.breaker("fal", "flux.2-dev") is BreakerState.OPEN
    assert rb.breaker("fal", "flux.2-dev") is BreakerState.CLOSED
    await sa.sync_once()
    await sb.sync_once()
    assert rb.breaker("fal", "flux.2-dev") is BreakerState.OPEN
    assert not rb.admit("fal", "flux.2-dev")
    # Its cool-down ends with the first replica's (the time left, not a fresh 30 s).
    h = rb.health("fal", "flux.2-dev")
    assert 29 <= h.opened_at + h.cooldown_s - rb.clock() <= 30.01


async def test_failures_spread_over_replicas_add_up(links: tuple[RedisLink, RedisLink]) -> None:
    ra, rb = _router(), _router()
    sa = SharedBreakers(links[0], ra, [("replicate", "flux.2-dev")])
    sb = SharedBreakers(links[1], rb, [("replicate", "flux.2-dev")])
    ra.record("replicate", "flux.2-dev", ok=False, seconds=1.0)
    rb.record("replicate", "flux.2-dev", ok=False, seconds=1.0)
    await sa.sync_once()
    await sb.sync_once()
    assert ra.breaker("replicate", "flux.2-dev") is BreakerState.CLOSED  # 2 of 3 so far
    ra.record("replicate", "flux.2-dev", ok=False, seconds=1.0)
    await sa.sync_once()  # the third, counted across replicas: this replica trips it
    assert ra.breaker("replicate", "flux.2-dev") is BreakerState.OPEN
    await sa.sync_once()  # ...and says so
    await sb.sync_once()
    assert rb.breaker("replicate", "flux.2-dev") is BreakerState.OPEN
    # A success in between starts the count again.
    rc = _router()
    sc = SharedBreakers(links[0], rc, [("fal", "flux.2-dev-flash")])
    for ok in (False, False, True, False, False):
        rc.record("fal", "flux.2-dev-flash", ok=ok, seconds=1.0)
        await sc.sync_once()
    assert rc.breaker("fal", "flux.2-dev-flash") is BreakerState.CLOSED


async def test_a_probe_that_succeeds_anywhere_closes_it_everywhere(
    links: tuple[RedisLink, RedisLink],
) -> None:
    now = [0.0]
    settings = Settings(breaker_failures=2, breaker_cooldown_s=1.0)
    ra, rb = Router(settings, clock=lambda: now[0]), Router(settings, clock=lambda: now[0])
    sa = SharedBreakers(links[0], ra, [("fal", "flux.2-dev")])
    sb = SharedBreakers(links[1], rb, [("fal", "flux.2-dev")])
    for _ in range(2):
        ra.record("fal", "flux.2-dev", ok=False, seconds=1.0)
    await sa.sync_once()
    await sb.sync_once()
    assert rb.breaker("fal", "flux.2-dev") is BreakerState.OPEN
    await asyncio.sleep(1.05)  # the cool-down (Redis's TTL, in real time) runs out
    now[0] = 1.05
    await sb.sync_once()
    assert rb.admit("fal", "flux.2-dev")  # half-open: B probes
    rb.record("fal", "flux.2-dev", ok=True, seconds=1.0)
    await sb.sync_once()
    await sa.sync_once()
    assert ra.breaker("fal", "flux.2-dev") is BreakerState.CLOSED
    assert rb.breaker("fal", "flux.2-dev") is BreakerState.CLOSED


async def test_the_local_provider_is_never_shared(links: tuple[RedisLink, RedisLink]) -> None:
    ra, rb = _router(), _router()
    sa = SharedBreakers(links[0], ra, [("local", "flux.2-dev")])
    sb = SharedBreakers(links[1], rb, [("local", "flux.2-dev")])
    for _ in range(3):
        ra.record("local", "flux.2-dev", ok=False, seconds=1.0)
    await sa.sync_once()
    await sb.sync_once()
    assert ra.breaker("local", "flux.2-dev") is BreakerState.OPEN
    assert rb.breaker("local", "flux.2-dev") is BreakerState.CLOSED  # another GPU


async def test_outcomes_queued_while_redis_is_down_are_written_later(tmp_path: Path) -> None:
    from fluxport.live.redis import Unavailable

    with private_redis(tmp_path) as (url, proc, port):
        prefix = unique_prefix()
        la, lb = RedisLink(url, prefix=prefix), RedisLink(url, prefix=prefix)
        ra, rb = _router(), _router()
        sa = SharedBreakers(la, ra, [("fal", "flux.2-dev")])
        sb = SharedBreakers(lb, rb, [("fal", "flux.2-dev")])
        proc.kill()
        proc.wait()
        for _ in range(3):
            ra.record("fal", "flux.2-dev", ok=False, seconds=1.0)
        with pytest.raises(Unavailable):
            await sa.sync_once()
        assert ra.breaker("fal", "flux.2-dev") is BreakerState.OPEN  # alone, as one process
        restarted = start_redis(None, port, tmp_path)
        try:
            await asyncio.sleep(1.1)
            await sa.sync_once()
            await sb.sync_once()
            assert rb.breaker("fal", "flux.2-dev") is BreakerState.OPEN
        finally:
            restarted.kill()
            restarted.wait()
        await la.aclose()
        await lb.aclose()
