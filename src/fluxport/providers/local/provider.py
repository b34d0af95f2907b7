"""LocalProvider: what it serves, warming pipelines, and generating on one worker thread per device."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from typing import TYPE_CHECKING

from fluxport.catalog import SizeLimits, find_model
from fluxport.domain.errors import InvalidRequest, ProviderFailure
from fluxport.domain.job import OUTPUT_FORMATS, ImageJob
from fluxport.providers.base import (
    AttemptTimings,
    Capabilities,
    GeneratedImage,
    ProgressCallback,
    ProgressEvent,
    ProviderResult,
    ProviderState,
    SizePolicy,
)
from fluxport.providers.local.pipeline import _Job, _Output, _Pipelines
from fluxport.providers.local.placement import missing_library
from fluxport.providers.local.plan import DEV, DUMMY, FLASH, MODELS, _Plan, plan_job
from fluxport.providers.local.worker import BatchLimits, _DeviceWorker, _Task

if TYPE_CHECKING:
    from fluxport.settings import Settings

INSTALL_HINT = "not configured: install fluxport[local]"
NORMALIZATION: dict[str, tuple[str, str]] = {
    "prompt": ("passthrough", ""),
    "size": ("passthrough", "converted when not a multiple of 16: generated on the grid, resampled"),
    "n": ("passthrough", "batched, up to 4 per call (8 for flux.2-dummy); more by parallel calls"),
    "seed": ("passthrough", ""),
    "partial_images": (
        "passthrough",
        "streamed: real partials, the clean-image estimate decoded by the VAE at up to 512 px",
    ),
    "cfg_scale": ("renamed", "FLUX.2's embedded guidance_scale"),
    "prompt_enhancement": ("passthrough", ""),
    "image": ("passthrough", "decoded references go straight to the pipeline"),
    "output_format": ("passthrough", "fluxport encodes the pixels in every format"),
    "output_compression": ("passthrough", ""),
    "response_format": ("emulated", "fluxport stores the image or inlines it"),
}


def local_extra_installed() -> bool:
    """Whether torch, diffusers and transformers can be imported (without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers", "transformers"))


class LocalProvider:
    """FLUX.2 [dev] (plus the Turbo LoRA as flux.2-dev-flash) and flux.2-dummy via diffusers."""

    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._installed = local_extra_installed()
        self._workers: dict[str, _DeviceWorker] = {}
        self._workers_lock = threading.Lock()
        self._pipelines = _Pipelines(settings)
        self._closed = False
        self._capabilities: dict[str, Capabilities] = {}  # per model: fixed at start-up
        self._device: str | None = None  # resolved from settings.local_device on first use

    # -- what it serves ------------------------------------------------------------------------

    def state(self, model: str) -> ProviderState:
        """Whether `model` can be served as configured, and how to configure it if not."""
        if model not in MODELS:
            return ProviderState(False, f"the local provider does not serve {model!r}")
        if not self._installed:
            return ProviderState(False, INSTALL_HINT)
        missing = missing_library(self.settings.local_quantize)
        if missing:
            return ProviderState(False, missing)
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
        """Batching, references, every output format (the service encodes pixels), two extras.
        Built once per model: the router asks several times per request."""
        found = self._capabilities.get(model)
        if found is None:
            found = self._capabilities[model] = self._build_capabilities(model)
        return found

    def _build_capabilities(self, model: str) -> Capabilities:
        extras = {"guidance_scale"} if model == FLASH else {"num_inference_steps", "guidance_scale"}
        spec = find_model(model)
        return Capabilities(
            max_images_per_call=8 if model == DUMMY else 4,
            max_references=4,
            native_output_formats=frozenset(OUTPUT_FORMATS),
            extras=frozenset(extras),
            supports_prompt_enhancement=True,
            supports_cfg_scale=True,
            partial_images=True,
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
            self._pipelines.ensure_pipeline(family, device, progress)
            if model == FLASH:
                self._pipelines.ensure_lora(progress)

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
                limits = BatchLimits(
                    images=self.settings.local_batch_images,
                    pixels=int(self.settings.local_batch_megapixels * 1_000_000),
                )
                worker = _DeviceWorker(device, self.settings.local_queue_size, limits)
                self._workers[device] = worker
            return worker

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, job: ImageJob, progress: ProgressCallback) -> ProviderResult:
        """Make `job.n` images in one batched pipeline call on the model's device worker."""
        start = time.monotonic()
        plan = self._plan(job)
        worker = self._worker(plan.device)
        task, ahead = worker.submit(  # the worker batches only where its limits allow it
            lambda t: self._pipelines.execute(plan, t, progress),
            batch_key=plan.batch_key(),
            images=job.n,
            pixels=job.n * plan.width * plan.height,
            run_batch=self._run_batch,
            payload=(plan, progress),
        )
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

    def _run_batch(self, tasks: list[_Task]) -> list[_Output]:
        """Several waiting jobs with one batch key in one pipeline call (on the worker thread)."""
        return self._pipelines.execute_batch([_Job(t.payload[0], t, t.payload[1]) for t in tasks])

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
        return plan_job(job, self.capabilities(job.model), self.settings, self._device_for)

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
        self._pipelines.clear()
