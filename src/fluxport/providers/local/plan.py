"""The plan: a local job validated and every pipeline argument resolved, on the event loop."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fluxport.domain.errors import InvalidRequest
from fluxport.domain.job import ImageJob, Size
from fluxport.providers.base import Behaviour, Capabilities

if TYPE_CHECKING:
    from fluxport.settings import Settings

DEV = "flux.2-dev"
FLASH = "flux.2-dev-flash"
DUMMY = "flux.2-dummy"
MODELS = (DEV, FLASH, DUMMY)

# fal's Turbo LoRA recipe (reference §6.1): 8 steps on a fixed, pre-shifted schedule.
TURBO_SIGMAS = (1.0, 0.6509, 0.4374, 0.2932, 0.1893, 0.1108, 0.0495, 0.00031)
FLASH_GUIDANCE = 2.5
DEV_GUIDANCE = 4.0
MAX_STEPS = 100
GUIDANCE_RANGE = (0.0, 20.0)
MIN_REFERENCE_SIDE = 64
MAX_REFERENCE_ASPECT = 8.0


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

    def batch_key(self) -> tuple[object, ...] | None:
        """What waiting jobs must share to run in one pipeline call (None: this one runs alone).
        References, prompt enhancement and partial images are per job, so they run alone."""
        job = self.job
        if job.references or job.prompt_enhancement or job.partial_images:
            return None
        shape = (self.width, self.height, self.steps, self.guidance, self.sigmas)
        return (self.family, self.device, *shape, self.lora)


def plan_job(
    job: ImageJob, caps: Capabilities, settings: Settings, device_for: Callable[[str], str]
) -> _Plan:
    """Validate a servable job against `caps` and resolve every pipeline argument."""
    if not 1 <= job.n <= caps.max_images_per_call:
        raise InvalidRequest(
            f"n must be between 1 and {caps.max_images_per_call} for {job.model} locally.", param="n"
        )
    if len(job.references) > caps.max_references:
        raise InvalidRequest(f"At most {caps.max_references} reference images are supported.", param="image")
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
            f"{FLASH} runs a fixed {len(TURBO_SIGMAS)}-step schedule; num_inference_steps is not accepted.",
            param="num_inference_steps",
        )
    steps = {DUMMY: settings.dummy_steps, DEV: settings.local_steps, FLASH: len(TURBO_SIGMAS)}[job.model]
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
    elif job.model == DEV and settings.local_flash_lora is not None:
        lora = False
    return _Plan(
        job=job,
        family=family,
        device=device_for(family),
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        sigmas=TURBO_SIGMAS if job.model == FLASH else None,
        lora=lora,
        seeds=tuple(job.image_seed(i) for i in range(job.n)),
        normalization=norm,
    )


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
