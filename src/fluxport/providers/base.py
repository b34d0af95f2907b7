"""The provider seam: what a provider can do, how it reports progress, what it returns."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Protocol, runtime_checkable

from fluxport.domain.job import GeneratedImage, ImageJob
from fluxport.domain.pricing import Rate
from fluxport.domain.sizing import SizePolicy

__all__ = ["GeneratedImage", "Rate", "SizePolicy"]  # re-exported: the adapters' vocabulary


class Behaviour(StrEnum):
    """How a parameter reached the provider."""

    PASSTHROUGH = "passthrough"  # sent as is
    RENAMED = "renamed"  # same meaning, other field name
    CONVERTED = "converted"  # value translated (e.g. size -> aspect ratio, snapped grid)
    EMULATED = "emulated"  # the service does it (e.g. n by parallel calls, url storage)


Stage = Literal["queued", "loading", "step", "decoding", "done"]


@dataclass(frozen=True)
class PartialImage:
    """A real partial image of a job still running: the current estimate of the clean image,
    decoded to pixels at a reduced size and encoded in the job's output format."""

    image_index: int  # which image of the request (0 .. n-1)
    partial_index: int  # 0 .. partial_images-1
    data: bytes
    width: int
    height: int
    output_format: str


@dataclass(frozen=True)
class ProgressEvent:
    """Progress of one provider call: step i of N, optionally a small preview image (PNG bytes)
    or a partial image (streamed requests)."""

    stage: Stage
    step: int = 0
    total: int = 0
    preview: bytes | None = None
    message: str = ""
    partial: PartialImage | None = None
    provider: str = ""  # set by the gateway: which provider's attempt reported it


# Called from any thread (the device worker too); must be cheap and thread-safe.
ProgressCallback = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    """A progress callback that ignores everything."""


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do for one model."""

    max_images_per_call: int = 1
    max_references: int = 4
    native_output_formats: frozenset[str] = frozenset({"png"})
    extras: frozenset[str] = frozenset()  # provider-specific request fields it understands
    supports_prompt_enhancement: bool = False
    supports_cfg_scale: bool = True
    partial_images: bool = False  # sends real partial images while it works (job.partial_images)
    concurrent: bool = True  # independent calls run side by side (hosted); False for one local device
    # Calls it serves at once (an upstream's max_concurrency): the router weighs its in-flight
    # calls against it; None for providers whose capacity is not ours to know (fal, Replicate).
    capacity: int | None = None
    # The size it generates for a delivered size: what is priced, ranked, dry-run, sent and billed.
    size: SizePolicy = field(default_factory=SizePolicy)
    # How each client parameter reaches it, for the model pages: param -> (behaviour, note). What
    # one request did is its ProviderResult.normalization (the x-fluxport-normalization header).
    normalization: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    # Its list price per billed megapixel (FLUXPORT_PRICES overrides it).
    rate: Rate = field(default_factory=Rate.free)


@dataclass(frozen=True)
class ProviderState:
    configured: bool
    detail: str  # how it is configured, or how to configure it


@dataclass
class AttemptTimings:
    """Seconds, measured by the provider from the start of its call."""

    queued_s: float = 0.0  # waiting for a device / in the provider's queue
    first_byte_s: float | None = None  # first byte of the result
    generation_s: float | None = None  # the model's own work
    total_s: float = 0.0
    submitted_s: float | None = None  # hosted providers: the submit call answered
    first_status_s: float | None = None  # hosted providers: the first status answer


@dataclass
class ProviderResult:
    images: list[GeneratedImage]
    timings: AttemptTimings = field(default_factory=AttemptTimings)
    revised_prompt: str | None = None
    normalization: dict[str, Behaviour] = field(default_factory=dict)
    provider_request_id: str | None = None
    billed_usd: float | None = None


@runtime_checkable
class Provider(Protocol):
    """A provider adapter. Errors are raised from `fluxport.domain.errors`:
    InvalidRequest (client's fault), ProviderFailure (retriable elsewhere), RateLimited."""

    name: str

    def state(self, model: str) -> ProviderState:
        """Whether this provider can serve `model` as configured."""
        ...

    def capabilities(self, model: str) -> Capabilities: ...

    async def generate(self, job: ImageJob, progress: ProgressCallback) -> ProviderResult:
        """Make `job.n` images for `job`; report progress while working."""
        ...

    async def aclose(self) -> None: ...


class BilledCancellation(asyncio.CancelledError):
    """Raised instead of a plain CancelledError when the provider had already finished the work
    before the cancel reached it: the call is abandoned, but the provider bills for it."""
