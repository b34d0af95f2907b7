"""The local provider, driven directly: flux.2-dummy on the CPU, and the real loading path for
flux.2-dev / flux.2-dev-flash from a saved dummy pipeline and a tiny LoRA."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fluxport.domain.errors import InvalidRequest, ProviderFailure, RateLimited
from fluxport.domain.job import ImageJob, Operation, ReferenceImage, Size
from fluxport.providers.base import Behaviour, ProgressEvent, Provider
from fluxport.providers.local import TURBO_SIGMAS, LocalProvider
from fluxport.settings import Settings

pytest.importorskip("diffusers")

DUMMY = "flux.2-dummy"


def make_job(
    model: str = DUMMY,
    *,
    size: tuple[int, int] = (64, 64),
    prompt: str = "a red dog dancing on the beach",
    refs: tuple[ReferenceImage, ...] = (),
    **kw: Any,
) -> ImageJob:
    op = Operation.EDIT if refs else Operation.GENERATE
    return ImageJob(
        request_id="req_test",
        model=model,
        operation=op,
        prompt=prompt,
        size=Size(*size),
        references=refs,
        **kw,
    )


def ref_png(width: int, height: int, colour: tuple[int, int, int]) -> ReferenceImage:
    img = Image.new("RGB", (width, height), colour)
    # A gradient, so a reference carries more than a flat colour.
    img.putdata([(colour[0], (x * 7) % 256, (y * 5) % 256) for y in range(height) for x in range(width)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return ReferenceImage(data=buf.getvalue(), format="png", width=width, height=height)


def pixels(result_image: Any) -> np.ndarray[Any, Any]:
    assert isinstance(result_image.content, Image.Image)
    assert result_image.content.mode == "RGB"
    return np.asarray(result_image.content).astype(np.int16)


class Recorder:
    """A thread-safe progress callback that keeps every event."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []
        self._lock = threading.Lock()

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            self.events.append(event)

    def steps(self) -> list[tuple[int, int]]:
        return [(e.step, e.total) for e in self.events if e.stage == "step"]

    def stages(self) -> list[str]:
        return [e.stage for e in self.events]


@pytest.fixture(scope="module")
def provider() -> Iterator[LocalProvider]:
    p = LocalProvider(Settings(dummy_steps=3, local_queue_size=8))
    yield p
    asyncio.run(p.aclose())


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dummy saved in the diffusers layout: stands in for a FLUX.2 [dev] download."""
    from fluxport.providers.local.dummy import build_dummy_pipeline

    path = tmp_path_factory.mktemp("flux2-dev")
    pipe: Any = build_dummy_pipeline()
    pipe.save_pretrained(path)
    return path


def save_lora(path: Path, *, random: bool) -> Path:
    """A LoRA on the dummy transformer's attention projections, saved like fal's Turbo LoRA.
    With random=False it is the identity (peft's default zero-initialised B)."""
    import torch
    from diffusers import Flux2Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from fluxport.providers.local.dummy import build_dummy_pipeline

    pipe: Any = build_dummy_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        pipe.transformer.add_adapter(
            LoraConfig(
                r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=not random
            )
        )
    Flux2Pipeline.save_lora_weights(
        str(path), transformer_lora_layers=get_peft_model_state_dict(pipe.transformer)
    )
    (lora,) = path.glob("*.safetensors")
    return lora


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lora(tmp_path_factory.mktemp("turbo"), random=True)


def test_is_a_provider(provider: LocalProvider) -> None:
    assert isinstance(provider, Provider)
    assert provider.name == "local"
    caps = provider.capabilities(DUMMY)
    assert caps.max_images_per_call >= 4
    assert caps.max_references == 4
    assert caps.native_output_formats == {"png", "jpeg", "gif", "webp", "avif"}
    assert caps.extras == {"num_inference_steps", "guidance_scale"}
    assert caps.supports_prompt_enhancement


def test_states_without_weights(provider: LocalProvider) -> None:
    assert provider.state(DUMMY).configured
    dev = provider.state("flux.2-dev")
    assert not dev.configured and "FLUXPORT_LOCAL_WEIGHTS" in dev.detail
    assert not provider.state("flux.2-dev-flash").configured
    assert not provider.state("gpt-image-1").configured


def test_import_without_local_extra() -> None:
    code = (
        "import sys\n"
        "for m in ('torch', 'diffusers', 'transformers'): sys.modules[m] = None\n"
        "from fluxport.providers.local import LocalProvider\n"
        "from fluxport.settings import Settings\n"
        "s = LocalProvider(Settings()).state('flux.2-dummy')\n"
        "print(s.configured, s.detail)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False not configured: install fluxport[local]"


@pytest.mark.parametrize(
    ("asked", "made", "behaviour"),
    [
        ((64, 64), (64, 64), Behaviour.PASSTHROUGH),
        ((100, 72), (96, 80), Behaviour.CONVERTED),  # 6.25 -> 6 cells, 4.5 -> 5 cells
        ((1000, 520), (1008, 528), Behaviour.CONVERTED),
    ],
)
async def test_dummy_sizes_snap_to_grid(
    provider: LocalProvider, asked: tuple[int, int], made: tuple[int, int], behaviour: Behaviour
) -> None:
    result = await provider.generate(make_job(size=asked, seed=3), Recorder())
    (image,) = result.images
    assert (image.width, image.height) == made
    assert pixels(image).shape == (made[1], made[0], 3)
    assert image.seed == 3
    assert result.normalization["size"] is behaviour
    t = result.timings
    assert t.generation_s is not None and t.first_byte_s is not None
    assert 0 <= t.queued_s <= t.first_byte_s <= t.total_s
    assert 0 < t.generation_s <= t.total_s


async def test_batch_images_differ_and_match_single_calls(provider: LocalProvider) -> None:
    batch = await provider.generate(make_job(n=3, seed=10), Recorder())
    assert [img.seed for img in batch.images] == [10, 11, 12]
    a, b, c = (pixels(img) for img in batch.images)
    assert np.abs(a - b).mean() > 5 and np.abs(b - c).mean() > 5 and np.abs(a - c).mean() > 5
    # Image i of a batch uses seed + i, so a single call with that seed makes the same image
    # (batched float GEMMs may round a pixel by a level).
    single = await provider.generate(make_job(seed=11), Recorder())
    assert np.abs(pixels(single.images[0]) - b).max() <= 2


async def test_same_seed_same_pixels(provider: LocalProvider) -> None:
    first = await provider.generate(make_job(seed=42), Recorder())
    again = await provider.generate(make_job(seed=42), Recorder())
    other = await provider.generate(make_job(seed=43), Recorder())
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))
    assert np.abs(pixels(first.images[0]) - pixels(other.images[0])).mean() > 5
    prompt = await provider.generate(make_job(seed=42, prompt="a blue cat in the snow"), Recorder())
    assert not np.array_equal(pixels(first.images[0]), pixels(prompt.images[0]))


@pytest.mark.parametrize("count", [1, 4])
async def test_edit_with_references(provider: LocalProvider, count: int) -> None:
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90)]
    refs = tuple(ref_png(64 + 16 * i, 96, colours[i]) for i in range(count))
    job = make_job(size=(80, 64), seed=5, refs=refs)
    assert job.operation is Operation.EDIT
    edit = await provider.generate(job, Recorder())
    plain = await provider.generate(make_job(size=(80, 64), seed=5), Recorder())
    assert (edit.images[0].width, edit.images[0].height) == (80, 64)
    assert edit.normalization["image"] is Behaviour.PASSTHROUGH
    # The references reach the transformer: same seed and prompt, different image.
    assert not np.array_equal(pixels(edit.images[0]), pixels(plain.images[0]))


async def test_too_many_or_bad_references(provider: LocalProvider) -> None:
    refs = tuple(ref_png(64, 64, (i * 40, 0, 0)) for i in range(5))
    with pytest.raises(InvalidRequest) as exc:
        await provider.generate(make_job(refs=refs), Recorder())
    assert exc.value.param == "image"
    with pytest.raises(InvalidRequest) as exc:
        await provider.generate(make_job(refs=(ref_png(64, 600, (1, 2, 3)),)), Recorder())
    assert exc.value.param == "image"


async def test_progress_events(provider: LocalProvider) -> None:
    events = Recorder()
    await provider.generate(make_job(size=(128, 128), extras={"num_inference_steps": 8}), events)
    assert events.steps() == [(i, 8) for i in range(1, 9)]
    stages = events.stages()
    assert stages[0] == "queued"
    assert stages[-2:] == ["decoding", "done"]
    assert stages.index("decoding") > max(i for i, s in enumerate(stages) if s == "step")
    previews = [e.preview for e in events.events if e.preview is not None]
    assert 1 <= len(previews) < 8
    with Image.open(io.BytesIO(previews[0])) as img:
        assert img.format == "PNG" and img.size == (8, 8)  # one preview pixel per latent cell


async def test_queue_full_is_rate_limited() -> None:
    p = LocalProvider(Settings(local_queue_size=1, dummy_steps=2))
    try:
        jobs = [p.generate(make_job(size=(256, 256), seed=i), Recorder()) for i in range(4)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        done = [r for r in results if not isinstance(r, BaseException)]
        limited = [r for r in results if isinstance(r, RateLimited)]
        # One job runs and one waits; the rest are refused at once, with a sensible Retry-After.
        assert len(done) == 2 and len(limited) == 2, results
        for err in limited:
            assert 0 < err.retry_after <= 120
            assert err.status == 429 and "retry-after" in err.headers
        # The queue drains: the next job is accepted.
        assert (await p.generate(make_job(seed=9), Recorder())).images
    finally:
        await p.aclose()


async def test_cancelled_job_frees_the_device() -> None:
    p = LocalProvider(Settings(local_queue_size=4))
    try:
        events = Recorder()
        started = asyncio.Event()
        loop = asyncio.get_running_loop()

        def progress(event: ProgressEvent) -> None:
            events(event)
            if event.stage == "step":
                loop.call_soon_threadsafe(started.set)

        long_job = asyncio.create_task(
            p.generate(make_job(size=(256, 256), extras={"num_inference_steps": 100}), progress)
        )
        await asyncio.wait_for(started.wait(), 60)
        long_job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long_job
        after = await asyncio.wait_for(p.generate(make_job(seed=1), Recorder()), 60)
        assert after.images
        steps = [s for s, _ in events.steps()]
        assert steps and max(steps) < 100
        assert "done" not in events.stages()
    finally:
        await p.aclose()
    with pytest.raises(ProviderFailure):
        await p.generate(make_job(), Recorder())


async def test_prompt_enhancement(provider: LocalProvider) -> None:
    job = make_job(seed=7, prompt_enhancement=True)
    result = await provider.generate(job, Recorder())
    assert isinstance(result.revised_prompt, str)
    assert result.revised_prompt.strip() and result.revised_prompt != job.prompt
    assert "<" not in result.revised_prompt and "[" not in result.revised_prompt  # no special tokens
    assert result.normalization["prompt_enhancement"] is Behaviour.PASSTHROUGH
    again = await provider.generate(job, Recorder())
    assert again.revised_prompt == result.revised_prompt
    assert (await provider.generate(make_job(seed=7), Recorder())).revised_prompt is None
    # With references the image-to-image upsampling path runs too.
    edit = make_job(seed=7, prompt_enhancement=True, refs=(ref_png(64, 64, (9, 9, 9)),))
    assert (await provider.generate(edit, Recorder())).revised_prompt


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"extras": {"num_inference_steps": 0}}, "num_inference_steps"),
        ({"extras": {"num_inference_steps": 2.5}}, "num_inference_steps"),
        ({"extras": {"num_inference_steps": "many"}}, "num_inference_steps"),
        ({"extras": {"num_inference_steps": 101}}, "num_inference_steps"),
        ({"extras": {"guidance_scale": -1}}, "guidance_scale"),
        ({"extras": {"guidance_scale": True}}, "guidance_scale"),
        ({"extras": {"guidance_scale": float("nan")}}, "guidance_scale"),
        ({"cfg_scale": 50.0}, "cfg_scale"),
        ({"n": 9}, "n"),
    ],
)
async def test_bad_parameters(provider: LocalProvider, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        await provider.generate(make_job(**fields), Recorder())
    assert exc.value.param == param


async def test_extras_and_cfg_scale_reach_the_pipeline(provider: LocalProvider) -> None:
    events = Recorder()
    # Multipart forms send text: "2" is accepted.
    result = await provider.generate(make_job(seed=1, extras={"num_inference_steps": "2"}), events)
    assert events.steps() == [(1, 2), (2, 2)]
    assert result.normalization["num_inference_steps"] is Behaviour.PASSTHROUGH
    low = await provider.generate(make_job(seed=1, cfg_scale=1.0), Recorder())
    high = await provider.generate(make_job(seed=1, cfg_scale=8.0), Recorder())
    assert low.normalization["cfg_scale"] is Behaviour.RENAMED
    assert not np.array_equal(pixels(low.images[0]), pixels(high.images[0]))
    same = await provider.generate(make_job(seed=1, extras={"guidance_scale": 8}), Recorder())
    assert np.array_equal(pixels(high.images[0]), pixels(same.images[0]))


async def test_dev_and_flash_from_disk(dev_dir: Path, lora_file: Path, tmp_path: Path) -> None:
    p = LocalProvider(Settings(local_weights=dev_dir, local_flash_lora=lora_file, local_device="cpu"))
    reference = LocalProvider(Settings(dummy_steps=2))
    try:
        assert p.state("flux.2-dev").configured
        assert p.state("flux.2-dev-flash").configured
        assert p.capabilities("flux.2-dev-flash").extras == {"guidance_scale"}

        loading = Recorder()
        await p.load("flux.2-dev", loading)
        assert "loading" in loading.stages()

        steps2 = {"num_inference_steps": 2}
        dev = await p.generate(make_job("flux.2-dev", seed=4, extras=steps2), Recorder())
        # The weights on disk are the dummy's, so the same job gives the same pixels.
        dummy = await reference.generate(make_job(seed=4, extras=steps2), Recorder())
        assert np.array_equal(pixels(dev.images[0]), pixels(dummy.images[0]))

        events = Recorder()
        flash = await p.generate(make_job("flux.2-dev-flash", seed=4, extras={"guidance_scale": 4.0}), events)
        assert events.steps() == [(i, len(TURBO_SIGMAS)) for i in range(1, 9)]
        assert np.abs(pixels(flash.images[0]) - pixels(dev.images[0])).mean() > 1

        dev_again = await p.generate(make_job("flux.2-dev", seed=4, extras=steps2), Recorder())
        assert np.array_equal(pixels(dev_again.images[0]), pixels(dev.images[0]))

        # Prompt upsampling works on the reloaded tokenizer (no processor around it) too.
        enhanced = await p.generate(
            make_job("flux.2-dev", extras=steps2, prompt_enhancement=True), Recorder()
        )
        assert enhanced.revised_prompt and enhanced.revised_prompt != make_job().prompt

        with pytest.raises(InvalidRequest) as exc:
            await p.generate(make_job("flux.2-dev-flash", extras=steps2), Recorder())
        assert exc.value.param == "num_inference_steps"
    finally:
        await p.aclose()
        await reference.aclose()

    # The adapter is really on for flash: an identity LoRA on the same schedule gives another image.
    identity = save_lora(tmp_path / "identity", random=False)
    p0 = LocalProvider(Settings(local_weights=dev_dir, local_flash_lora=identity, local_device="cpu"))
    try:
        flash0 = await p0.generate(
            make_job("flux.2-dev-flash", seed=4, extras={"guidance_scale": 4.0}), Recorder()
        )
        assert not np.array_equal(pixels(flash0.images[0]), pixels(flash.images[0]))
    finally:
        await p0.aclose()


async def test_dev_with_a_broken_directory(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    p = LocalProvider(Settings(local_weights=tmp_path, local_device="cpu"))
    try:
        assert p.state("flux.2-dev").configured
        with pytest.raises(ProviderFailure, match=r"loading FLUX\.2"):
            await p.generate(make_job("flux.2-dev"), Recorder())
    finally:
        await p.aclose()


async def test_a_finished_job_keeps_nothing_alive_in_the_worker(provider: LocalProvider) -> None:
    # The device worker's thread used to hold its last job (and so its images) until the next
    # one arrived: 120 MiB after n=10 at 2048x2048.
    import gc
    import weakref

    result = await provider.generate(make_job(n=2, seed=21), Recorder())
    refs = [weakref.ref(img.content) for img in result.images]
    del result
    for _ in range(50):  # the worker thread lets go once it is back waiting for the next job
        gc.collect()
        if all(r() is None for r in refs):
            break
        await asyncio.sleep(0.05)
    assert all(r() is None for r in refs)
