"""Pydantic models of the OpenAI Images wire shapes, with fluxport's additions."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fluxport.domain.errors import InvalidRequest
from fluxport.domain.job import OutputFormat
from fluxport.domain.request import ImageParams

MAX_SEED = 2**63 - 1
# Deepest nesting accepted in a body (the OpenAI shapes need 2; extras rarely more).
MAX_JSON_DEPTH = 32

# OpenAI-only knobs with no FLUX.2 meaning: accepted so SDK calls work, reported as ignored,
# and never forwarded to a provider (they are not the "unknown fields" that pass through).
OPENAI_ONLY_FIELDS = frozenset(
    {
        "quality",
        "moderation",
        "style",
        "user",
        "safety_identifier",
        "input_fidelity",
        "complexity",
        "frame_count",
        "frame_duration_ms",
    }
)


class ImageRequest(BaseModel):
    """Body of POST /v1/images/generations, and the text fields of /v1/images/edits."""

    # Strict: n="3" or n=true is a 400 naming n, not silently 3 or 1 (form and CLI text is typed
    # by coerce_text before it gets here).
    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str = Field(description="What to draw, or how to edit the references.")
    model: str | None = Field(default=None, description="Model id; default flux.2-dev.")
    n: int | None = Field(default=None, ge=1, le=10, description="Number of images, 1-10.")
    size: str | None = Field(default=None, description="WxH, W:H or auto.", examples=["1024x768", "16:9"])
    aspect_ratio: str | None = Field(default=None, description="Any W:H; mapped to the nearest supported.")
    resolution: str | None = Field(default=None, description="0.5K, 1K, 2K, 4K, or megapixels (0.25, 1).")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Image i uses seed + i.")
    cfg_scale: float | None = Field(default=None, ge=0, le=20, description="Guidance scale.")
    prompt_enhancement: Literal["on", "off"] | None = Field(
        default=None, description="on: the provider rewrites the prompt; it comes back as revised_prompt."
    )
    response_format: Literal["url", "b64_json"] | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(
        default=None, ge=0, le=100, description="Quality for lossy formats."
    )
    stream: bool | None = Field(
        default=None, description="Server-Sent Events: partial images as they come, then each image."
    )
    partial_images: int | None = Field(
        default=None,
        ge=0,
        le=3,
        description="With stream: partials per image, 0-3 (0: the final only).",
    )
    background: Literal["transparent", "opaque", "auto"] | None = None
    # Routing (fluxport): an explicit provider order, a strategy, hedging, or a cost estimate only.
    provider: str | list[str] | None = Field(
        default=None, description="A provider name or an ordered list: only these, in this order."
    )
    strategy: Literal["balanced", "fastest", "cheapest"] | None = Field(
        default=None, description="How to rank providers; default from FLUXPORT_ROUTER_STRATEGY."
    )
    hedge: bool | None = Field(default=None, description="Start a backup attempt when the primary is slow.")
    dry_run: bool | None = Field(default=None, description="Return the cost estimate and provider only.")

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value

    @field_validator("prompt_enhancement", mode="before")
    @classmethod
    def _enhancement_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str) and value.lower() in {"true", "false"}:
            return "on" if value.lower() == "true" else "off"
        return value

    @field_validator("output_format", mode="before")
    @classmethod
    def _jpg_alias(cls, value: object) -> object:
        return "jpeg" if isinstance(value, str) and value.lower() == "jpg" else value

    @property
    def extras(self) -> dict[str, Any]:
        """Fields fluxport does not define: provider-specific or unknown, handed on."""
        return {k: v for k, v in (self.model_extra or {}).items() if k not in OPENAI_ONLY_FIELDS}

    @property
    def ignored(self) -> list[str]:
        ignored = [
            k for k, v in (self.model_extra or {}).items() if k in OPENAI_ONLY_FIELDS and v is not None
        ]
        if self.partial_images is not None and not self.stream:  # OpenAI: it is for streaming only
            ignored.append("partial_images")
        return sorted(ignored)

    def to_params(self) -> ImageParams:
        """The gateway's view of this body: the parameters, without the wire model."""
        return ImageParams(
            prompt=self.prompt,
            model=self.model,
            n=self.n,
            size=self.size,
            aspect_ratio=self.aspect_ratio,
            resolution=self.resolution,
            seed=self.seed,
            cfg_scale=self.cfg_scale,
            prompt_enhancement=self.prompt_enhancement == "on",
            response_format=self.response_format,
            output_format=self.output_format,
            output_compression=self.output_compression,
            stream=bool(self.stream),
            partial_images=self.partial_images,
            background=self.background,
            provider=self.provider,
            strategy=self.strategy,
            hedge=self.hedge,
            dry_run=bool(self.dry_run),
            extras=self.extras,
            ignored=tuple(self.ignored),
        )


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def load_json(raw: bytes) -> object:
    """Decode a JSON body strictly: UTF-8 only, no NaN or Infinity, no lone surrogates (they cannot
    be stored), nesting at most MAX_JSON_DEPTH deep. Failures are 400s, never 500s."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid UTF-8 (byte {exc.start}: {exc.reason}).", code="invalid_json"
        ) from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidRequest(
            f"The request body nests deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json"
        ) from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError, as is _no_constant's
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    check_structure(data)
    return data


def check_structure(data: object) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings with lone surrogates (a JSON escape
    such as \\ud800), naming the top-level field they are in. Iterative: no recursion to exhaust."""
    stack: list[tuple[object, int, str | None]] = [(data, 0, None)]
    while stack:
        value, depth, top = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(
                f"Invalid value for '{top}': nested deeper than {MAX_JSON_DEPTH} levels.", param=top
            )
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidRequest(
                        f"Invalid value for '{top}': the text contains a lone surrogate (\\uD800-\\uDFFF).",
                        param=top,
                    ) from None
        elif isinstance(value, dict):
            for key, item in value.items():
                # A key may itself hold a surrogate: name it escaped, so the error can be encoded.
                name = top if top is not None else str(key).encode("utf-8", "backslashreplace").decode()
                stack.append((key, depth + 1, name))
                stack.append((item, depth + 1, name))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, top) for item in value)


def parse_image_request(data: object) -> ImageRequest:
    """Validate a decoded body; every failure is a 400 naming the offending field."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", param=None, code="invalid_json")
    # The SDK sends null for arguments passed as None: that means "use the default".
    data = {k: v for k, v in data.items() if v is not None}
    try:
        return ImageRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "missing":
            raise InvalidRequest(
                f"Missing required parameter: '{param}'.", param=param, code="missing_required"
            ) from None
        got = first.get("input")
        shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
        raise InvalidRequest(
            f"Invalid value for '{param}': {first['msg']} (got {shown[:100]}).", param=param
        ) from None


class ImageObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int | None = Field(default=None, description="The seed that reproduces this image.")


class ImagesResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    created: int
    data: list[ImageObject]
    model: str
    output_format: str
    size: str = Field(description="The delivered size, WxH.")
    usage: dict[str, Any] | None = Field(
        default=None,
        description="images, input_megapixels, output_megapixels and cost_usd (plus OpenAI's token keys).",
    )
    expires_at: int | None = Field(default=None, description="When url links stop working (unix seconds).")


class ProviderInfo(BaseModel):
    name: str
    configured: bool
    detail: str


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    name: str
    description: str
    noise: bool = Field(description="True when the model's output is random noise (flux.2-dummy).")
    available: bool = Field(description="At least one provider is configured.")
    providers: list[ProviderInfo]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


def coerce_text(value: str) -> Any:
    """A text value from a form or the command line: "true"/"false" and numbers become typed."""
    if value in ("true", "false"):
        return value == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
