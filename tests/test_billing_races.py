"""A call abandoned after the provider already finished is billed, and says so."""

from __future__ import annotations

import asyncio

import pytest

from fluxport.domain.job import ImageJob, Operation, Size
from fluxport.providers._hosted import HttpPolicy
from fluxport.providers.base import BilledCancellation, no_progress
from fluxport.providers.fal import FalProvider
from fluxport.providers.replicate import ReplicateProvider
from fluxport.settings import Settings
from tests.emulators import EmulatorConfig, FalEmulator, ReplicateEmulator

JOB = ImageJob(
    request_id="req_race", model="flux.2-dev", operation=Operation.GENERATE, prompt="p", size=Size(512, 512)
)
SLOW_POLLS = HttpPolicy(poll_interval_s=1.0, max_poll_interval_s=1.0)


async def test_fal_cancel_after_completion_raises_billed_cancellation() -> None:
    with FalEmulator(EmulatorConfig(run=0.05), key="k") as fal:
        # Polling only: with the status stream fluxport notices completion at once, leaving no window.
        provider = FalProvider(
            Settings(fal_key="k", fal_url=fal.base_url), policy=SLOW_POLLS, status_stream=False
        )
        task = asyncio.create_task(provider.generate(JOB, no_progress))
        await asyncio.sleep(0.4)  # fal finished at 0.05 s; the adapter waits for its next poll
        task.cancel()
        with pytest.raises(BilledCancellation):
            await task
        await provider.aclose()
        assert len(fal.ledger) == 1
        assert len(fal.requests_to("PUT", "/cancel")) == 1


async def test_fal_cancel_before_completion_is_not_billed() -> None:
    with FalEmulator(EmulatorConfig(run=5.0), key="k") as fal:
        # Polling only: with the status stream fluxport notices completion at once, leaving no window.
        provider = FalProvider(
            Settings(fal_key="k", fal_url=fal.base_url), policy=SLOW_POLLS, status_stream=False
        )
        task = asyncio.create_task(provider.generate(JOB, no_progress))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as info:
            await task
        assert not isinstance(info.value, BilledCancellation)
        await provider.aclose()
        assert fal.ledger == []


async def test_replicate_cancel_after_success_raises_billed_cancellation() -> None:
    with ReplicateEmulator(EmulatorConfig(run=1.2), token="t") as rep:
        settings = Settings(replicate_api_token="t", replicate_url=rep.base_url)
        provider = ReplicateProvider(settings, policy=SLOW_POLLS, wait_s=1)
        task = asyncio.create_task(provider.generate(JOB, no_progress))
        await asyncio.sleep(1.6)  # created at ~1 s (still processing), succeeded at 1.2 s, next poll ~2 s
        task.cancel()
        with pytest.raises(BilledCancellation):
            await task
        await provider.aclose()
        assert len(rep.ledger) == 1
