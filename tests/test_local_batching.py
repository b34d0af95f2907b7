"""Batching on the local provider (flux.2-dummy on the CPU): waiting jobs with the same size,
steps, guidance and model run in one pipeline call, bounded by images and megapixels, and each
job still gets its own images, seeds and cancellation."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fluxport.domain.errors import ProviderFailure
from fluxport.domain.job import ImageJob, Operation, Size
from fluxport.providers.local import LocalProvider
from fluxport.settings import Settings

pytest.importorskip("diffusers")

STEPS = 6


def job(prompt: str, seed: int, n: int = 1, side: int = 256) -> ImageJob:
    return ImageJob(
        request_id=f"r-{prompt}-{seed}",
        model="flux.2-dummy",
        operation=Operation.GENERATE,
        prompt=prompt,
        size=Size(side, side),
        n=n,
        seed=seed,
    )


JOBS = [job("a red kite", 1), job("a blue boat", 2, n=2), job("a green hill", 3)]
BLOCKER = job("a tall tower", 9, side=512)  # another size: keeps the device busy, never batched


def pixels(result: Any) -> np.ndarray[Any, Any]:
    return np.stack([np.asarray(img.content, dtype=np.int16) for img in result.images])


class Forwards:
    """Counts the dummy transformer's forward passes (one per step per pipeline call)."""

    def __init__(self, provider: LocalProvider) -> None:
        asyncio.run(provider.load("flux.2-dummy", lambda e: None))
        self.calls = 0
        provider._pipelines._pipes["dummy"].transformer.register_forward_hook(self._hook)

    def _hook(self, *args: Any) -> None:
        self.calls += 1


@pytest.fixture(scope="module")
def alone() -> Iterator[list[np.ndarray[Any, Any]]]:
    provider = LocalProvider(Settings(dummy_steps=STEPS))
    try:
        yield [pixels(asyncio.run(provider.generate(j, lambda e: None))) for j in JOBS]
    finally:
        asyncio.run(provider.aclose())


async def behind_a_blocker(provider: LocalProvider, jobs: list[ImageJob], events: list[Any]) -> list[Any]:
    blocker = asyncio.ensure_future(provider.generate(BLOCKER, lambda e: None))
    await asyncio.sleep(0.05)  # the blocker has started: the jobs below wait together
    waiting = (provider.generate(j, events.append) for j in jobs)
    results = await asyncio.gather(*waiting, return_exceptions=True)
    await blocker
    return results


def test_waiting_jobs_with_one_shape_run_in_one_call(alone: list[np.ndarray[Any, Any]]) -> None:
    provider = LocalProvider(Settings(dummy_steps=STEPS, local_batch_images=4))
    forwards = Forwards(provider)
    events: list[Any] = []
    try:
        results = asyncio.run(behind_a_blocker(provider, JOBS, events))
        assert forwards.calls == 2 * STEPS  # the blocker's call and one call for all three jobs
        assert provider._workers["cpu"].batches == 1
        assert any("batched with 2 other job(s): 4 images in one call" in e.message for e in events)
        for result, base, j in zip(results, alone, JOBS, strict=True):
            got = pixels(result)
            assert got.shape == base.shape == (j.n, 256, 256, 3)
            assert [img.seed for img in result.images] == [j.image_seed(i) for i in range(j.n)]
            # Each image from its own prompt and seed's noise: what it would be alone, within
            # the float rounding of a batched matmul.
            assert np.abs(got - base).max() <= 2
    finally:
        asyncio.run(provider.aclose())


@pytest.mark.parametrize(
    ("settings", "calls"),
    [
        ({"local_batch_images": 1}, 4),  # batching off: one call per job
        ({"local_batch_images": 3}, 3),  # 1 + 2 images fit; the third job waits for the next call
        ({"local_batch_images": 4, "local_batch_megapixels": 0.2}, 3),  # 3 x 65536 px fit 0.2 MP
    ],
)
def test_batches_are_bounded_by_images_and_megapixels(settings: dict[str, Any], calls: int) -> None:
    provider = LocalProvider(Settings(dummy_steps=STEPS, **settings))
    forwards = Forwards(provider)
    try:
        results = asyncio.run(behind_a_blocker(provider, JOBS, []))
        assert all(not isinstance(r, BaseException) for r in results)
        assert forwards.calls == calls * STEPS
    finally:
        asyncio.run(provider.aclose())


def test_a_job_cancelled_while_waiting_is_left_out_of_the_batch(alone: list[np.ndarray[Any, Any]]) -> None:
    provider = LocalProvider(Settings(dummy_steps=STEPS, local_batch_images=4))
    Forwards(provider)

    async def scenario() -> tuple[Any, Any]:
        blocker = asyncio.ensure_future(provider.generate(BLOCKER, lambda e: None))
        await asyncio.sleep(0.05)
        first = asyncio.ensure_future(provider.generate(JOBS[0], lambda e: None))
        second = asyncio.ensure_future(provider.generate(JOBS[1], lambda e: None))
        await asyncio.sleep(0.05)
        second.cancel()  # its caller left while it waited: the batch forms without it
        with pytest.raises(asyncio.CancelledError):
            await second
        await blocker
        done = await first
        worker = provider._workers["cpu"]
        for _ in range(100):  # the cancelled job is answered (and dropped) just after
            if worker.depth() == 0:
                break
            await asyncio.sleep(0.05)
        return done, worker

    result, worker = asyncio.run(scenario())
    try:
        assert np.abs(pixels(result) - alone[0]).max() <= 2
        assert worker.depth() == 0
    finally:
        asyncio.run(provider.aclose())


def test_a_job_cancelled_during_its_batch_leaves_the_others_running(
    alone: list[np.ndarray[Any, Any]],
) -> None:
    provider = LocalProvider(Settings(dummy_steps=STEPS, local_batch_images=4))
    forwards = Forwards(provider)

    async def scenario() -> Any:
        loop = asyncio.get_running_loop()
        blocker = asyncio.ensure_future(provider.generate(BLOCKER, lambda e: None))
        await asyncio.sleep(0.05)
        leaving: asyncio.Future[Any] | None = None

        def progress(event: Any) -> None:  # on the worker thread, inside the batched call
            if event.stage == "step" and event.step == 2 and leaving is not None:
                loop.call_soon_threadsafe(leaving.cancel)

        staying = asyncio.ensure_future(provider.generate(JOBS[0], lambda e: None))
        leaving = asyncio.ensure_future(provider.generate(JOBS[1], progress))
        await blocker
        with pytest.raises(asyncio.CancelledError):
            await leaving
        return await staying

    try:
        result = asyncio.run(scenario())
        assert provider._workers["cpu"].batches == 1
        assert forwards.calls == 2 * STEPS  # the batch ran to its end for the job that stayed
        assert np.abs(pixels(result) - alone[0]).max() <= 2
    finally:
        asyncio.run(provider.aclose())


def test_jobs_with_references_or_partials_are_never_batched() -> None:
    from fluxport.providers.local.plan import plan_job

    provider = LocalProvider(Settings(dummy_steps=STEPS, local_batch_images=4))
    caps = provider.capabilities("flux.2-dummy")
    plain = plan_job(JOBS[0], caps, provider.settings, provider._device_for)
    assert plain.batch_key() == plan_job(JOBS[2], caps, provider.settings, provider._device_for).batch_key()
    streamed = ImageJob(**{**JOBS[0].__dict__, "partial_images": 2})
    enhanced = ImageJob(**{**JOBS[0].__dict__, "prompt_enhancement": True})
    for one in (streamed, enhanced):
        assert plan_job(one, caps, provider.settings, provider._device_for).batch_key() is None
    other = plan_job(BLOCKER, caps, provider.settings, provider._device_for)
    assert other.batch_key() != plain.batch_key()
    with pytest.raises(ProviderFailure):  # a closed provider takes no more jobs
        asyncio.run(provider.aclose())
        asyncio.run(provider.generate(JOBS[0], lambda e: None))
