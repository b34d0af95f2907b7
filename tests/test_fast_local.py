"""The local provider's speed-ups, on flux.2-dummy on the CPU: each one's output shape, its
determinism for a seed, and how close it stays to the plain pipeline."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fluxport.domain.job import ImageJob, Operation, Size
from fluxport.providers.base import no_progress
from fluxport.providers.local import LocalProvider
from fluxport.settings import Settings

pytest.importorskip("diffusers")

STEPS = 12


def job(seed: int = 4) -> ImageJob:
    return ImageJob(
        request_id="r",
        model="flux.2-dummy",
        operation=Operation.GENERATE,
        prompt="a paper boat",
        size=Size(512, 512),
        n=2,
        seed=seed,
    )


def pixels(provider: LocalProvider, seed: int = 4) -> np.ndarray[Any, Any]:
    result = asyncio.run(provider.generate(job(seed), no_progress))
    return np.stack([np.asarray(img.content, dtype=np.int16) for img in result.images])


@pytest.fixture(scope="module")
def plain() -> Iterator[LocalProvider]:
    provider = LocalProvider(Settings(dummy_steps=STEPS))
    yield provider
    asyncio.run(provider.aclose())


@pytest.fixture(scope="module")
def taylorseer() -> Iterator[LocalProvider]:
    provider = LocalProvider(
        Settings(dummy_steps=STEPS, local_step_cache="taylorseer", local_step_cache_interval=3)
    )
    yield provider
    asyncio.run(provider.aclose())


def test_taylorseer_is_deterministic_and_close_to_the_plain_pipeline(
    plain: LocalProvider, taylorseer: LocalProvider
) -> None:
    base = pixels(plain)
    cached = pixels(taylorseer)
    assert cached.shape == base.shape == (2, 512, 512, 3)
    assert np.array_equal(pixels(taylorseer), cached)  # same seed, same image; no state kept between jobs
    difference = np.abs(cached - base)
    assert difference.max() > 0  # the cache really skipped work: not the plain result
    assert difference.mean() < 1.0  # ...and stays close to it (0-255 scale)
    # Another seed after that job: the cache's state is reset per job, so it matches a fresh run.
    other = pixels(taylorseer, seed=9)
    fresh = LocalProvider(
        Settings(dummy_steps=STEPS, local_step_cache="taylorseer", local_step_cache_interval=3)
    )
    try:
        assert np.array_equal(pixels(fresh, seed=9), other)
    finally:
        asyncio.run(fresh.aclose())


def test_regional_compile_matches_the_plain_pipeline(plain: LocalProvider) -> None:
    """torch.compile of the repeated blocks (inductor, on the CPU here): the same images, within
    float rounding; compiled once at load (reported as loading), reused for the next job."""
    compiled = LocalProvider(Settings(dummy_steps=STEPS, local_compile=True))
    events: list[Any] = []
    try:
        result = asyncio.run(compiled.generate(job(), events.append))
        got = np.stack([np.asarray(img.content, dtype=np.int16) for img in result.images])
        assert any("compiled in" in e.message for e in events if e.stage == "loading")
        assert np.abs(got - pixels(plain)).max() <= 1
        assert np.array_equal(pixels(compiled), got)
    finally:
        asyncio.run(compiled.aclose())


def test_compile_and_step_cache_are_refused_together() -> None:
    with pytest.raises(ValueError, match="do not combine"):
        Settings(local_compile=True, local_step_cache="taylorseer")


def test_the_banner_says_where_flux2_dev_runs(tmp_path: Any) -> None:
    from fluxport.providers.local.placement import placement_note, stored_bytes

    for name, gib in (("transformer", 60), ("text_encoder", 45), ("vae", 1)):
        (tmp_path / name).mkdir()
        with (tmp_path / name / "model.safetensors").open("wb") as f:
            f.truncate(gib * 1024**3)  # sparse: the size is what counts
    assert sum(stored_bytes(tmp_path).values()) == 106 * 1024**3
    note = placement_note(Settings(local_weights=tmp_path, local_device="cpu"))
    assert note == "FLUX.2 [dev] on the CPU (about 212 GB in fp32): minutes per image."
    assert placement_note(Settings()) is None
