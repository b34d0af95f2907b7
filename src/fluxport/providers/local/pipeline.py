"""The pipelines: loading Flux2Pipeline, placing it, the Turbo LoRA, and running a plan on the worker.

Everything here runs on a device worker thread; torch and diffusers are imported only when called.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fluxport.domain.errors import FluxportError, InvalidRequest, ProviderFailure
from fluxport.providers.base import PartialImage, ProgressCallback, ProgressEvent
from fluxport.providers.local.partials import PartialDecoder
from fluxport.providers.local.placement import (
    encode_prompts,
    offload_mode,
    place,
    quantize,
    text_encoder_device,
)
from fluxport.providers.local.plan import _Plan
from fluxport.providers.local.worker import _Cancelled, _Task

if TYPE_CHECKING:
    from PIL.Image import Image

    from fluxport.settings import Settings

UPSAMPLE_TEMPERATURE = 0.15  # BFL's recommendation (reference §7.3)
GRID = 16  # 8x VAE times the 2x2 patch
PREVIEW_SIDE = 128
LORA_ADAPTER = "flash"

_CUDA_OOM_NAMES = ("OutOfMemoryError", "AcceleratorError")


@dataclass
class _Output:
    images: list[Image]
    revised_prompt: str | None
    generation_s: float
    finished: float


class _Pipelines:
    """The loaded pipeline per family ("dummy", "dev") and the Turbo LoRA; used from worker threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Touched only from the worker thread of the pipeline's device.
        self._pipes: dict[str, Any] = {}
        self._lora_loaded = False

    def clear(self) -> None:
        """Drop the loaded pipelines (on shutdown, once the workers have stopped)."""
        self._pipes.clear()

    # -- loading -------------------------------------------------------------------------------

    def ensure_pipeline(self, family: str, device: str, progress: ProgressCallback) -> Any:
        """The pipeline for `family` on `device`, built or loaded on first use."""
        pipe: Any = self._pipes.get(family)
        if pipe is not None:
            return pipe
        import torch

        from fluxport.providers.local.dummy import build_dummy_pipeline, ensure_processor_shape

        if family == "dummy":
            progress(ProgressEvent(stage="loading", step=0, total=3, message="building flux.2-dummy"))
            pipe = build_dummy_pipeline()
            where = "flux.2-dummy"
        else:
            # Untyped on purpose: the library's partial annotations trip mypy --strict.
            diffusers: Any = importlib.import_module("diffusers")

            weights = self.settings.local_weights
            assert weights is not None  # _check_servable made sure
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
            progress(ProgressEvent(stage="loading", step=0, total=3, message=f"reading {weights}"))
            try:
                pipe = diffusers.Flux2Pipeline.from_pretrained(
                    str(weights), torch_dtype=dtype, local_files_only=True
                )
            except Exception as exc:
                raise _failure(exc, f"loading FLUX.2 [dev] from {weights}") from exc
            where = "flux.2-dev"
        try:
            offload = offload_mode(pipe, self.settings, device)
            for done in quantize(pipe, self.settings, device, offload):
                progress(ProgressEvent(stage="loading", step=1, total=3, message=f"quantised the {done}"))
            placed = place(pipe, self.settings, device, offload)
        except FluxportError:
            raise
        except Exception as exc:
            raise _failure(exc, f"placing {where} on {device}") from exc
        progress(ProgressEvent(stage="loading", step=2, total=3, message=f"{where}: {placed}"))
        try:
            ensure_processor_shape(pipe.tokenizer)
            pipe.set_progress_bar_config(disable=True)
            # Decode a batch one image at a time: the decoder's full-resolution activations are
            # the peak of a large batch (n=8 at 2048x2048 on the dummy: 3.8 GiB at once); the
            # result is the same.
            pipe.vae.enable_slicing()
            _enable_step_cache(pipe, self.settings)
            if self.settings.local_compile:
                _compile(pipe, self.settings, progress)
        except Exception as exc:
            raise _failure(exc, f"preparing {where} (step cache, compile)") from exc
        progress(ProgressEvent(stage="loading", step=3, total=3, message=f"{where} ready"))
        self._pipes[family] = pipe
        return pipe

    def ensure_lora(self, progress: ProgressCallback) -> None:
        """Load the Turbo LoRA into the dev pipeline once, left disabled."""
        if self._lora_loaded:
            return
        pipe = self._pipes["dev"]
        path = self.settings.local_flash_lora
        assert path is not None
        progress(ProgressEvent(stage="loading", step=0, total=1, message=f"loading Turbo LoRA {path}"))
        try:
            if path.is_file():
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=LORA_ADAPTER)
            else:
                pipe.load_lora_weights(str(path), adapter_name=LORA_ADAPTER)
        except Exception as exc:
            raise _failure(exc, f"loading the Turbo LoRA from {path}") from exc
        # One transformer serves both models: the adapter is switched on per flash job only.
        pipe.disable_lora()
        self._lora_loaded = True
        progress(ProgressEvent(stage="loading", step=1, total=1, message="Turbo LoRA ready"))

    # -- execution -----------------------------------------------------------------------------

    def execute(self, plan: _Plan, task: _Task, progress: ProgressCallback) -> _Output:
        """Runs on the device worker thread."""
        return self.execute_batch([_Job(plan, task, progress)])[0]

    def execute_batch(self, jobs: list[_Job]) -> list[_Output]:
        """Several waiting jobs with the same batch key (plan.batch_key) in one pipeline call; one
        output per job. Runs on the device worker thread."""
        try:
            return self._execute_unchecked(jobs)
        except (_Cancelled, FluxportError):
            raise
        except Exception as exc:
            raise _failure(exc, f"generating with {jobs[0].plan.job.model}") from exc

    def _execute_unchecked(self, jobs: list[_Job]) -> list[_Output]:
        import PIL.Image
        import torch

        plan = jobs[0].plan  # the batch key makes the pipeline arguments the same for every job

        def tell(event: ProgressEvent) -> None:
            for one in jobs:
                one.progress(event)

        pipe = self.ensure_pipeline(plan.family, plan.device, tell)
        if plan.lora:
            self.ensure_lora(tell)
            pipe.enable_lora()
        elif plan.lora is False and self._lora_loaded:
            pipe.disable_lora()
        if all(one.task.cancel.is_set() for one in jobs):
            raise _Cancelled

        job = plan.job
        references: list[Image] = []
        for ref in job.references:  # a job with references is never batched (plan.batch_key)
            try:
                with PIL.Image.open(io.BytesIO(ref.data)) as img:
                    references.append(img.convert("RGB"))
            except Exception as exc:
                raise InvalidRequest(f"A reference image could not be decoded: {exc}", param="image") from exc

        began = time.monotonic()
        revised: str | None = None
        if len(jobs) == 1:
            prompts = [job.prompt]
            if job.prompt_enhancement:
                revised = _upsample(pipe, plan, references, self.settings) or job.prompt
                prompts = [revised]
            per_prompt = job.n
        else:  # one prompt per image, in job order; each image keeps its own seed's noise
            prompts = [one.plan.job.prompt for one in jobs for _ in range(one.plan.job.n)]
            per_prompt = 1
            message = f"batched with {len(jobs) - 1} other job(s): {len(prompts)} images in one call"
            tell(ProgressEvent(stage="step", step=0, total=plan.steps, message=message))

        latent_h, latent_w = plan.height // GRID, plan.width // GRID
        every = max(1, plan.steps // 4)
        partials: PartialDecoder | None = None
        # Under model CPU offload a VAE decode between steps would push the transformer (64 GB) off
        # the GPU and back for every partial: no partials there (the completed image still comes).
        if job.partial_images and getattr(pipe, "_offload_device", None) is None:
            step_now = [0, plan.steps]
            progress = jobs[0].progress  # a job asking for partials is never batched

            def emit(partial: PartialImage) -> None:
                progress(ProgressEvent(stage="step", step=step_now[0], total=step_now[1], partial=partial))

            partials = PartialDecoder(
                pipe, job, steps=plan.steps, width=plan.width, height=plan.height, emit=emit
            )

        def on_step(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if all(one.task.cancel.is_set() for one in jobs):
                p._interrupt = True
                raise _Cancelled
            total = p.num_timesteps
            preview = None
            if partials is not None:  # real partial images instead of the false-colour preview
                step_now[:] = [i + 1, total]
                partials.after_step(p, i, t)
            elif (i + 1) % every == 0 and i + 1 < total:
                preview = _preview_png(kwargs["latents"], latent_h, latent_w)
            tell(ProgressEvent(stage="step", step=i + 1, total=total, preview=preview))
            if i + 1 == total:
                tell(ProgressEvent(stage="decoding", step=total, total=total))
            return kwargs

        # CPU generators: the same noise on any device; torch seeds are 64-bit.
        generators = [
            torch.Generator(device="cpu").manual_seed(s % 2**64) for one in jobs for s in one.plan.seeds
        ]
        call: dict[str, Any] = {
            "height": plan.height,
            "width": plan.width,
            "num_inference_steps": plan.steps,
            "guidance_scale": plan.guidance,
            "num_images_per_prompt": per_prompt,
            "generator": generators,
            "output_type": "pil",
            "callback_on_step_end": on_step,
        }
        if plan.sigmas is not None:
            call["sigmas"] = list(plan.sigmas)
        if references:
            call["image"] = references
        try:
            with torch.inference_mode(), _step_cache_context(pipe):
                call |= encode_prompts(pipe, prompts, self.settings)
                images = [img.convert("RGB") for img in pipe(**call).images]
        finally:
            if partials is not None:
                partials.close()
        finished = time.monotonic()
        tell(ProgressEvent(stage="done", step=plan.steps, total=plan.steps))
        outputs = []
        for one in jobs:
            mine, images = images[: one.plan.job.n], images[one.plan.job.n :]
            outputs.append(
                _Output(
                    images=mine,
                    revised_prompt=revised,
                    generation_s=finished - began,
                    finished=finished,
                )
            )
        return outputs


@dataclass
class _Job:
    """One job of a pipeline call: its plan, its worker task (cancel flag) and its progress."""

    plan: _Plan
    task: _Task
    progress: ProgressCallback


def _upsample(pipe: Any, plan: _Plan, references: list[Image], settings: Settings) -> str:
    """Rewrite the prompt with the text encoder; seeded so the same job gets the same rewrite."""
    import torch

    devices: list[int] = []
    if plan.device.startswith("cuda"):
        index = torch.device(plan.device).index
        devices = [torch.cuda.current_device() if index is None else index]
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(plan.job.seed % 2**64)  # seeds the CUDA generators too
        out = pipe.upsample_prompt(
            plan.job.prompt,
            # One list of images per prompt; several are concatenated into one by the pipeline.
            images=[references] if references else None,
            temperature=UPSAMPLE_TEMPERATURE,
            device=text_encoder_device(pipe, settings),
        )
    return str(out[0]).strip()


def _failure(exc: BaseException, doing: str) -> ProviderFailure:
    """Turn a torch/diffusers exception into ProviderFailure; out-of-memory gets a clear message."""
    if isinstance(exc, MemoryError) or (
        type(exc).__name__ in _CUDA_OOM_NAMES and "out of memory" in str(exc).lower()
    ):
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # best effort: the failure itself is what matters
            pass
        return ProviderFailure(
            f"Out of memory while {doing}; try fewer images, a smaller size or fewer references."
        )
    return ProviderFailure(f"Local pipeline failed while {doing}: {type(exc).__name__}: {exc}"[:1000])


def _preview_png(latents: Any, height: int, width: int) -> bytes | None:
    """A cheap false-colour preview of the first image's latents (no VAE), as small PNG bytes."""
    import PIL.Image
    import torch

    try:
        x = latents[0].detach().float().cpu().view(height, width, -1)
        rgb = torch.stack([x[..., c::3].mean(-1) for c in range(3)], dim=-1)
        low = rgb.amin(dim=(0, 1), keepdim=True)
        high = rgb.amax(dim=(0, 1), keepdim=True)
        scaled = ((rgb - low) / (high - low).clamp_min(1e-6) * 255).to(torch.uint8)
        img = PIL.Image.fromarray(scaled.numpy())
        img.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
    except Exception:  # a preview is a nicety; never let it fail the job
        return None


def _enable_step_cache(pipe: Any, settings: Settings) -> None:
    """FLUXPORT_LOCAL_STEP_CACHE: diffusers' TaylorSeer cache hooks on the transformer. (Its
    first-block cache does not support FLUX.2's blocks in diffusers 0.42: a TypeError.)"""
    if settings.local_step_cache != "taylorseer":
        return
    import torch
    from diffusers import TaylorSeerCacheConfig

    config = TaylorSeerCacheConfig(  # type: ignore[no-untyped-call]
        cache_interval=settings.local_step_cache_interval,
        disable_cache_before_step=settings.local_step_cache_warmup_steps,
        taylor_factors_dtype=torch.float32,
    )
    pipe.transformer.enable_cache(config)


@contextlib.contextmanager
def _step_cache_context(pipe: Any) -> Iterator[None]:
    """One job's cache state: reset first (no job forecasts from another's features), then the
    context the hooks need (Flux2Pipeline does not open one itself)."""
    transformer = pipe.transformer
    if not getattr(transformer, "is_cache_enabled", False):
        yield
        return
    transformer._reset_stateful_cache()
    with transformer.cache_context("fluxport"):
        yield


def _compile(pipe: Any, settings: Settings, progress: ProgressCallback) -> None:
    """FLUXPORT_LOCAL_COMPILE: regional torch.compile of the transformer's repeated blocks, then
    one small call so the compile happens here, reported as loading, not in a user's first job."""
    import torch

    progress(ProgressEvent(stage="loading", step=0, total=1, message="compiling the transformer blocks"))
    started = time.monotonic()
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    with torch.inference_mode():
        prompt = encode_prompts(pipe, ["warm-up"], settings)
        pipe(**prompt, height=256, width=256, num_inference_steps=1, output_type="latent")
    took = time.monotonic() - started
    progress(ProgressEvent(stage="loading", step=1, total=1, message=f"compiled in {took:.0f} s"))
