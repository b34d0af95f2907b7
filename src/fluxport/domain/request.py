"""ImageParams: what a client asked for, as the API layer parsed it (no wire shapes, no I/O).

The gateway takes these, not the API's Pydantic models: `api/` owns the wire, and turns each
request body into ImageParams; the gateway turns ImageParams into an ImageJob.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ImageParams:
    """One request's parameters, as sent (None: not sent)."""

    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    aspect_ratio: str | None = None
    resolution: str | None = None
    seed: int | None = None
    cfg_scale: float | None = None
    prompt_enhancement: bool = False
    response_format: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    stream: bool = False
    partial_images: int | None = None  # streamed partial images per image, 0-3 (with stream)
    background: str | None = None
    provider: str | list[str] | None = None  # an explicit provider order
    strategy: str | None = None
    hedge: bool | None = None
    dry_run: bool = False
    # Provider-specific and unknown fields, handed on; OpenAI-only fields fluxport ignores.
    extras: Mapping[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
