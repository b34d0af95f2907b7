"""The local provider: diffusers' Flux2Pipeline on this machine, one worker thread per device.

torch and diffusers are imported lazily, so this module imports (and reports itself unconfigured)
on an install without the `local` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fluxport.catalog import SizeLimits, find_model
from fluxport.domain.errors import FluxportError, InvalidRequest, ProviderFailure, RateLimited
from fluxport.domain.job import OUTPUT_FORMATS, ImageJob, Size
from fluxport.providers.base import (
    AttemptTimings,
    Behaviour,
    Capabilities,
    GeneratedImage,
    ProgressCallback,
    ProgressEvent,
    ProviderResult,
    ProviderState,
    SizePolicy,
)

if TYPE_CHECKING:
    from PIL.Image import Image

    from fluxport.settings import Settings

DEV = "flux.2-dev"
FLASH = "flux.2-dev-flash"
DUMMY = "flux.2-dummy"
MODELS = (DEV, FLASH, DUMMY)

# fal's Turbo LoRA recipe (reference §6.1): 8 steps on a fixed, pre-shifted schedule.
TURBO_SIGMAS = (1.0, 0.6509, 0.4374, 0.2932, 0.1893, 0.1108, 0.0495, 0.00031)
FLASH_GUIDANCE = 2.5
DEV_GUIDANCE = 4.0
UPSAMPLE_TEMPERATURE = 0.15  # BFL's recommendation (reference §7.3)
GRID = 16  # 8x VAE times the 2x2 patch
MAX_STEPS = 100
GUIDANCE_RANGE = (0.0, 20.0)
MIN_REFERENCE_SIDE = 64
MAX_REFERENCE_ASPECT = 8.0
PREVIEW_SIDE = 128
LORA_ADAPTER = "flash"
INSTALL_HINT = "not configured: install fluxport[local]"
NORMALIZATION: dict[str, tuple[str, str]] = {
    "prompt": ("passthrough", ""),
    "size": ("passthrough", "converted when not a multiple of 16: generated on the grid, resampled"),
    "n": ("passthrough", "batched, up to 4 per call (8 for flux.2-dummy); more by parallel calls"),
    "seed": ("passthrough", ""),
    "cfg_scale": ("renamed", "FLUX.2's embedded guidance_scale"),
    "prompt_enhancement": ("passthrough", ""),
    "image": ("passthrough", "decoded references go straight to the pipeline"),
    "output_format": ("passthrough", "fluxport encodes the pixels in every format"),
    "output_compression": ("passthrough", ""),
    "response_format": ("emulated", "fluxport stores the image or inlines it"),
}
# Guesses for Retry-After before any job has finished on a device.
FIRST_GUESS_S = {"cpu": 5.0, "cuda": 30.0}

_CUDA_OOM_NAMES = ("OutOfMemoryError", "AcceleratorError")


def local_extra_installed() -> bool:
    """Whether torch, diffusers and transformers can be imported (without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers", "transformers"))


class _Cancelled(Exception):
    """Raised inside the pipeline callback to abandon a job whose caller went away."""


@dataclass(frozen=True)
class _Plan:
    """One job, validated and resolved on the event loop; the worker only executes it."""

    job: ImageJob
    family: str  # "dummy" | "dev": which pipeline object serves it
    device: str
    width: int
    height: int
    steps: int
    guidance: float
    sigmas: tuple[float, ...] | None
    lora: bool | None  # True: enable the Turbo adapter; False: disable it; None: no adapter at all
    seeds: tuple[int, ...]
    normalization: dict[str, Behaviour]


@dataclass
class _Output:
    images: list[Image]
    revised_prompt: str | None
    generation_s: float
    finished: float


@dataclass(eq=False)
class _Task:
    fn: Callable[[_Task], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    reason: str = "cancelled"


class _DeviceWorker:
    """One thread that runs a device's jobs one at a time, behind a bounded queue."""

    def __init__(self, device: str, queue_size: int) -> None:
        self.device = device
        self.queue_size = queue_size
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: list[_Task] = []  # waiting or running, in order
        self._durations: deque[float] = deque(maxlen=16)
        self._thread = threading.Thread(target=self._run, name=f"fluxport-local-{device}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[_Task], Any], *, admit_always: bool = False) -> tuple[_Task, int]:
        """Queue `fn`; returns the task and how many jobs are ahead of it. Raises RateLimited when full."""
        loop = asyncio.get_running_loop()
        task = _Task(fn=fn, loop=loop, future=loop.create_future())
        with self._lock:
            ahead = len(self._pending)
            # One job runs and `queue_size` wait; counting both keeps admission independent of
            # whether the thread has picked up its next job yet.
            if not admit_always and ahead >= self.queue_size + 1:
                raise RateLimited(
                    f"The local {self.device} queue is full ({self.queue_size} waiting); retry shortly.",
                    retry_after=self._estimate_locked(),
                )
            self._pending.append(task)
        self._queue.put(task)
        return task, ahead

    def depth(self) -> int:
        """Jobs waiting or running on this device."""
        with self._lock:
            return len(self._pending)

    def _estimate_locked(self) -> float:
        # A slot frees when the running job finishes: about one recent job duration.
        if self._durations:
            return max(1.0, sum(self._durations) / len(self._durations))
        return FIRST_GUESS_S.get(self.device.split(":")[0], 30.0)

    def shutdown(self, reason: str) -> None:
        with self._lock:
            for task in self._pending:
                task.reason = reason
                task.cancel.set()
        self._queue.put(None)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            result: Any = None
            error: BaseException | None = None
            if task.cancel.is_set():
                error = ProviderFailure(f"Local job {task.reason} before it started.")
            else:
                task.started = time.monotonic()
                try:
                    result = task.fn(task)
                except _Cancelled:
                    error = ProviderFailure(f"Local job {task.reason}.")
                except BaseException as exc:  # delivered to the awaiting coroutine
                    error = exc
                with self._lock:
                    self._durations.append(time.monotonic() - task.started)
            with self._lock:
                self._pending.remove(task)
            self._deliver(task, result, error)

    @staticmethod
    def _deliver(task: _Task, result: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if task.future.done():  # the caller was cancelled
                return
            if error is not None:
                task.future.set_exception(error)
            else:
                task.future.set_result(result)

        # RuntimeError: the caller's loop is closed, so nobody is waiting.
        with contextlib.suppress(RuntimeError):
            task.loop.call_soon_threadsafe(settle)


class LocalProvider:
    """FLUX.2 [dev] (plus the Turbo LoRA as flux.2-dev-flash) and flux.2-dummy via diffusers."""

    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._installed = local_extra_installed()
        self._workers: dict[str, _DeviceWorker] = {}
        self._workers_lock = threading.Lock()
        # Touched only from the worker thread of the pipeline's device.
        self._pipes: dict[str, Any] = {}
        self._lora_loaded = False
        self._closed = False
        self._device: str | None = None  # resolved from settings.local_device on first use

    # -- what it serves ------------------------------------------------------------------------

    def state(self, model: str) -> ProviderState:
        """Whether `model` can be served as configured, and how to configure it if not."""
        if model not in MODELS:
            return ProviderState(False, f"the local provider does not serve {model!r}")
        if not self._installed:
            return ProviderState(False, INSTALL_HINT)
        if model == DUMMY:
            return ProviderState(True, "built in: FLUX.2 at tiny size with random weights, on cpu (noise)")
        problem = self._weights_problem()
        if problem and model == FLASH and self.settings.local_flash_lora is None:
            problem += " and FLUXPORT_LOCAL_FLASH_LORA to the Turbo LoRA"
        if problem:
            return ProviderState(False, problem)
        if model == DEV:
            where: str = self.settings.local_device
            if where == "auto":
                where = "cuda if available, else cpu"
            return ProviderState(True, f"FLUX.2 [dev] from {self.settings.local_weights} on {where}")
        lora = self.settings.local_flash_lora
        if lora is None:
            return ProviderState(
                False, "set FLUXPORT_LOCAL_FLASH_LORA to the FLUX.2 [dev] Turbo LoRA (fal/FLUX.2-dev-Turbo)"
            )
        if not lora.exists():
            return ProviderState(False, f"FLUXPORT_LOCAL_FLASH_LORA={lora} does not exist")
        return ProviderState(True, f"FLUX.2 [dev] from {self.settings.local_weights} + Turbo LoRA {lora}")

    def _weights_problem(self) -> str | None:
        weights = self.settings.local_weights
        if weights is None:
            return "set FLUXPORT_LOCAL_WEIGHTS to a FLUX.2 [dev] directory (diffusers layout)"
        if not weights.is_dir():
            return f"FLUXPORT_LOCAL_WEIGHTS={weights} is not a directory"
        if not (weights / "model_index.json").is_file():
            return f"FLUXPORT_LOCAL_WEIGHTS={weights} has no model_index.json (expected a diffusers layout)"
        return None

    def capabilities(self, model: str) -> Capabilities:
        """Batching, references, every output format (the service encodes pixels), two extras."""
        extras = {"guidance_scale"} if model == FLASH else {"num_inference_steps", "guidance_scale"}
        spec = find_model(model)
        return Capabilities(
            max_images_per_call=8 if model == DUMMY else 4,
            max_references=4,
            native_output_formats=frozenset(OUTPUT_FORMATS),
            extras=frozenset(extras),
            supports_prompt_enhancement=True,
            supports_cfg_scale=True,
            concurrent=False,  # one job at a time per device: a hedge on it would only queue
            size=SizePolicy.grid(spec.limits if spec else SizeLimits()),
            normalization=NORMALIZATION,
        )

    # -- loading -------------------------------------------------------------------------------

    async def load(self, model: str, progress: ProgressCallback) -> None:
        """Warm the pipeline for `model` on its device (reports stage="loading")."""
        self._check_servable(model)
        family = "dummy" if model == DUMMY else "dev"
        device = self._device_for(family)
        worker = self._worker(device)

        def run(task: _Task) -> None:
            self._ensure_pipeline(family, device, progress)
            if model == FLASH:
                self._ensure_lora(progress)

        task, _ = worker.submit(run, admit_always=True)
        try:
            await task.future
        except asyncio.CancelledError:
            task.cancel.set()
            raise
        progress(ProgressEvent(stage="done", message=f"{model} loaded"))

    def _device_for(self, family: str) -> str:
        # The dummy stays on the CPU: the same pixels everywhere, and it never queues behind a GPU job.
        if family == "dummy":
            return "cpu"
        if self._device is None:
            wanted = self.settings.local_device
            if wanted == "auto":
                import torch  # once: the first call pays for the import

                wanted = "cuda" if torch.cuda.is_available() else "cpu"
            self._device = wanted
        return self._device

    def queue_depths(self) -> dict[str, int]:
        """Jobs waiting or running per device that has had work (read-only; safe from any thread)."""
        with self._workers_lock:
            workers = list(self._workers.values())
        return {worker.device: worker.depth() for worker in workers}

    def _worker(self, device: str) -> _DeviceWorker:
        with self._workers_lock:
            worker = self._workers.get(device)
            if worker is None:
                worker = _DeviceWorker(device, self.settings.local_queue_size)
                self._workers[device] = worker
            return worker

    def _ensure_pipeline(self, family: str, device: str, progress: ProgressCallback) -> Any:
        pipe: Any = self._pipes.get(family)
        if pipe is not None:
            return pipe
        import torch

        from fluxport.providers.dummy import build_dummy_pipeline, ensure_processor_shape

        if family == "dummy":
            progress(ProgressEvent(stage="loading", step=0, total=1, message="building flux.2-dummy"))
            pipe = build_dummy_pipeline()
            progress(ProgressEvent(stage="loading", step=1, total=1, message="flux.2-dummy ready"))
        else:
            # Untyped on purpose: the library's partial annotations trip mypy --strict.
            diffusers: Any = importlib.import_module("diffusers")

            weights = self.settings.local_weights
            assert weights is not None  # _check_servable made sure
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
            progress(ProgressEvent(stage="loading", step=0, total=2, message=f"reading {weights}"))
            try:
                pipe = diffusers.Flux2Pipeline.from_pretrained(
                    str(weights), torch_dtype=dtype, local_files_only=True
                )
                progress(ProgressEvent(stage="loading", step=1, total=2, message=f"moving to {device}"))
                self._place(pipe, device)
            except Exception as exc:
                raise self._failure(exc, f"loading FLUX.2 [dev] from {weights}") from exc
            progress(ProgressEvent(stage="loading", step=2, total=2, message="flux.2-dev ready"))
        ensure_processor_shape(pipe.tokenizer)
        pipe.set_progress_bar_config(disable=True)
        self._pipes[family] = pipe
        return pipe

    @staticmethod
    def _place(pipe: Any, device: str) -> None:
        """Keep everything resident when it fits (H200); otherwise offload per component (H100)."""
        import torch

        if not device.startswith("cuda"):
            pipe.to(device)
            return
        need = sum(
            p.numel() * p.element_size()
            for name in ("transformer", "text_encoder", "vae")
            for p in getattr(pipe, name).parameters()
        )
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        # Leave room for activations at 1-4 MP and a few references.
        if need < free - 8 * 1024**3:
            pipe.to(device)
        else:
            pipe.enable_model_cpu_offload(device=device)

    def _ensure_lora(self, progress: ProgressCallback) -> None:
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
            raise self._failure(exc, f"loading the Turbo LoRA from {path}") from exc
        # One transformer serves both models: the adapter is switched on per flash job only.
        pipe.disable_lora()
        self._lora_loaded = True
        progress(ProgressEvent(stage="loading", step=1, total=1, message="Turbo LoRA ready"))

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, job: ImageJob, progress: ProgressCallback) -> ProviderResult:
        """Make `job.n` images in one batched pipeline call on the model's device worker."""
        start = time.monotonic()
        plan = self._plan(job)
        worker = self._worker(plan.device)
        task, ahead = worker.submit(lambda t: self._execute(plan, t, progress))
        progress(ProgressEvent(stage="queued", step=0, total=0, message=f"{ahead} job(s) ahead"))
        try:
            output: _Output = await task.future
        except asyncio.CancelledError:
            task.cancel.set()  # the pipeline stops at its next step and frees the device
            raise
        end = time.monotonic()
        started = task.started if task.started is not None else start
        images = [
            GeneratedImage(content=img, width=img.width, height=img.height, seed=seed)
            for img, seed in zip(output.images, plan.seeds, strict=True)
        ]
        return ProviderResult(
            images=images,
            timings=AttemptTimings(
                queued_s=max(0.0, started - start),
                first_byte_s=output.finished - start,
                generation_s=output.generation_s,
                total_s=end - start,
            ),
            revised_prompt=output.revised_prompt,
            normalization=plan.normalization,
        )

    def _check_servable(self, model: str) -> None:
        if self._closed:
            raise ProviderFailure("The local provider is shut down.")
        if model not in MODELS:
            raise InvalidRequest(f"The local provider does not serve model {model!r}.", param="model")
        state = self.state(model)
        if not state.configured:
            raise ProviderFailure(f"Local model {model} is {state.detail}"[:500])

    def _plan(self, job: ImageJob) -> _Plan:
        """Validate the job against this provider and resolve every pipeline argument."""
        self._check_servable(job.model)
        caps = self.capabilities(job.model)
        if not 1 <= job.n <= caps.max_images_per_call:
            raise InvalidRequest(
                f"n must be between 1 and {caps.max_images_per_call} for {job.model} locally.", param="n"
            )
        if len(job.references) > caps.max_references:
            raise InvalidRequest(
                f"At most {caps.max_references} reference images are supported.", param="image"
            )
        for ref in job.references:
            short, long = sorted((ref.width, ref.height))
            if short < MIN_REFERENCE_SIDE or long > MAX_REFERENCE_ASPECT * short:
                raise InvalidRequest(
                    f"Each reference image needs a shortest side of at least {MIN_REFERENCE_SIDE} px and an "
                    f"aspect ratio of at most {MAX_REFERENCE_ASPECT:g}:1; got {ref.width}x{ref.height}.",
                    param="image",
                )
        if job.size.width < 1 or job.size.height < 1:
            raise InvalidRequest(f"Invalid size {job.size}.", param="size")

        norm: dict[str, Behaviour] = {}
        extras = job.extras
        if job.model == FLASH and "num_inference_steps" in extras:
            raise InvalidRequest(
                f"{FLASH} runs a fixed {len(TURBO_SIGMAS)}-step schedule; "
                "num_inference_steps is not accepted.",
                param="num_inference_steps",
            )
        steps = {DUMMY: self.settings.dummy_steps, DEV: self.settings.local_steps, FLASH: len(TURBO_SIGMAS)}[
            job.model
        ]
        if "num_inference_steps" in extras:
            steps = _int_extra(extras, "num_inference_steps", 1, MAX_STEPS)
            norm["num_inference_steps"] = Behaviour.PASSTHROUGH

        guidance = FLASH_GUIDANCE if job.model == FLASH else DEV_GUIDANCE
        if job.cfg_scale is not None:
            guidance = _check_guidance(job.cfg_scale, "cfg_scale")
            norm["cfg_scale"] = Behaviour.RENAMED  # FLUX.2's embedded guidance, not real CFG
        if "guidance_scale" in extras:
            guidance = _float_extra(extras, "guidance_scale")
            norm["guidance_scale"] = Behaviour.PASSTHROUGH

        # The size the service prices: the nearest multiple of 16 within the 4 MP cap.
        grid = caps.size.generated(job.size)
        width, height = grid.width, grid.height
        norm["size"] = Behaviour.PASSTHROUGH if Size(width, height) == job.size else Behaviour.CONVERTED
        norm["seed"] = Behaviour.PASSTHROUGH
        norm["n"] = Behaviour.PASSTHROUGH
        if job.references:
            norm["image"] = Behaviour.PASSTHROUGH
        if job.prompt_enhancement:
            norm["prompt_enhancement"] = Behaviour.PASSTHROUGH

        family = "dummy" if job.model == DUMMY else "dev"
        lora: bool | None = None
        if job.model == FLASH:
            lora = True
        elif job.model == DEV and self.settings.local_flash_lora is not None:
            lora = False
        return _Plan(
            job=job,
            family=family,
            device=self._device_for(family),
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            sigmas=TURBO_SIGMAS if job.model == FLASH else None,
            lora=lora,
            seeds=tuple(job.image_seed(i) for i in range(job.n)),
            normalization=norm,
        )

    def _execute(self, plan: _Plan, task: _Task, progress: ProgressCallback) -> _Output:
        """Runs on the device worker thread."""
        try:
            return self._execute_unchecked(plan, task, progress)
        except (_Cancelled, FluxportError):
            raise
        except Exception as exc:
            raise self._failure(exc, f"generating with {plan.job.model}") from exc

    def _execute_unchecked(self, plan: _Plan, task: _Task, progress: ProgressCallback) -> _Output:
        import PIL.Image
        import torch

        pipe = self._ensure_pipeline(plan.family, plan.device, progress)
        if plan.lora:
            self._ensure_lora(progress)
            pipe.enable_lora()
        elif plan.lora is False and self._lora_loaded:
            pipe.disable_lora()
        if task.cancel.is_set():
            raise _Cancelled

        job = plan.job
        references: list[Image] = []
        for ref in job.references:
            try:
                with PIL.Image.open(io.BytesIO(ref.data)) as img:
                    references.append(img.convert("RGB"))
            except Exception as exc:
                raise InvalidRequest(f"A reference image could not be decoded: {exc}", param="image") from exc

        began = time.monotonic()
        prompt = job.prompt
        revised: str | None = None
        if job.prompt_enhancement:
            revised = self._upsample(pipe, plan, references) or prompt
            prompt = revised

        latent_h, latent_w = plan.height // GRID, plan.width // GRID
        every = max(1, plan.steps // 4)

        def on_step(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if task.cancel.is_set():
                p._interrupt = True
                raise _Cancelled
            total = p.num_timesteps
            preview = None
            if (i + 1) % every == 0 and i + 1 < total:
                preview = _preview_png(kwargs["latents"], latent_h, latent_w)
            progress(ProgressEvent(stage="step", step=i + 1, total=total, preview=preview))
            if i + 1 == total:
                progress(ProgressEvent(stage="decoding", step=total, total=total))
            return kwargs

        # CPU generators: the same noise on any device; torch seeds are 64-bit.
        generators = [torch.Generator(device="cpu").manual_seed(s % 2**64) for s in plan.seeds]
        call: dict[str, Any] = {
            "prompt": prompt,
            "height": plan.height,
            "width": plan.width,
            "num_inference_steps": plan.steps,
            "guidance_scale": plan.guidance,
            "num_images_per_prompt": job.n,
            "generator": generators,
            "output_type": "pil",
            "callback_on_step_end": on_step,
        }
        if plan.sigmas is not None:
            call["sigmas"] = list(plan.sigmas)
        if references:
            call["image"] = references
        with torch.inference_mode():
            images = pipe(**call).images
        finished = time.monotonic()
        progress(ProgressEvent(stage="done", step=plan.steps, total=plan.steps))
        return _Output(
            images=[img.convert("RGB") for img in images],
            revised_prompt=revised,
            generation_s=finished - began,
            finished=finished,
        )

    @staticmethod
    def _upsample(pipe: Any, plan: _Plan, references: list[Image]) -> str:
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
                device=pipe._execution_device,
            )
        return str(out[0]).strip()

    @staticmethod
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

    async def aclose(self) -> None:
        """Stop the worker threads; queued and running jobs fail with ProviderFailure."""
        self._closed = True
        with self._workers_lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            worker.shutdown("was cancelled: the local provider shut down")
        for worker in workers:
            await asyncio.to_thread(worker.join, 30.0)
        self._pipes.clear()


def _number(extras: Mapping[str, Any], name: str) -> float:
    value = extras[name]
    # Multipart forms send every field as text.
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InvalidRequest(f"{name} must be a number; got {value!r}.", param=name) from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a number; got {value!r}.", param=name)
    return float(value)


def _int_extra(extras: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = _number(extras, name)
    if value != int(value) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}; got {value:g}.", param=name)
    return int(value)


def _float_extra(extras: Mapping[str, Any], name: str) -> float:
    return _check_guidance(_number(extras, name), name)


def _check_guidance(value: float, name: str) -> float:
    low, high = GUIDANCE_RANGE
    if isinstance(value, bool) or not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be from {low:g} to {high:g}; got {value!r}.", param=name)
    return float(value)


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
