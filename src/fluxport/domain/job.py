"""ImageJob: the normalised request every provider receives (pure data, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from PIL.Image import Image


class Operation(StrEnum):
    GENERATE = "generate"
    EDIT = "edit"


@dataclass(frozen=True, order=True)
class Size:
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def megapixels(self) -> float:
        """Megapixels with 1 MP = 1024 x 1024 px, the providers' billing unit."""
        return self.pixels / (1024 * 1024)


@dataclass(frozen=True)
class ReferenceImage:
    """A validated reference image: bytes as the provider should receive them."""

    data: bytes
    format: str  # "png" | "jpeg" | "webp"
    width: int
    height: int

    @property
    def mime(self) -> str:
        return f"image/{self.format}"

    @property
    def size(self) -> Size:
        return Size(self.width, self.height)


# The output formats, listed once: the wire model, the pages and the encoder read them from here.
OutputFormat = Literal["png", "jpeg", "gif", "webp", "avif"]
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
LOSSY_FORMATS = frozenset({"jpeg", "webp", "avif"})
# A format's file extension differs from its name only for JPEG.
_EXTENSIONS = {"jpeg": "jpg"}


def file_extension(output_format: str) -> str:
    """The file extension of an output format: jpeg -> jpg, the others their own name."""
    return _EXTENSIONS.get(output_format, output_format)


def format_of_extension(extension: str) -> str | None:
    """The output format a file extension names (jpg and jpeg -> jpeg), or None."""
    ext = extension.lower().lstrip(".")
    fmt = next((f for f, e in _EXTENSIONS.items() if e == ext), ext)
    return fmt if fmt in OUTPUT_FORMATS else None


@dataclass
class GeneratedImage:
    """One image from a provider: pixels (in-process providers) or encoded bytes (hosted ones)."""

    content: bytes | Image
    width: int
    height: int
    format: str | None = None  # for bytes: "png" | "jpeg" | "webp"; None for pixels
    seed: int | None = None

    @property
    def size(self) -> Size:
        return Size(self.width, self.height)


@dataclass(frozen=True)
class ImageJob:
    """Everything a provider needs to make the images of one request (or one slice of it)."""

    request_id: str
    model: str
    operation: Operation
    prompt: str
    size: Size  # the size the client receives; providers may generate on their own grid
    n: int = 1
    seed: int = 0  # image i of this job uses seed + i
    seed_given: bool = False
    cfg_scale: float | None = None
    prompt_enhancement: bool = False
    output_format: str = "png"
    output_compression: int | None = None
    response_format: str = "url"
    references: tuple[ReferenceImage, ...] = ()
    # Provider-specific and unknown fields, handed on untouched.
    extras: Mapping[str, Any] = field(default_factory=dict)
    # Someone follows the step-by-step progress (playground, CLI); a plain API call does not, so
    # a hosted provider need not send its progress logs.
    report_steps: bool = True
    # Streamed: partial images per image the provider sends while it works (0-3), where it can.
    partial_images: int = 0

    def image_seed(self, index: int) -> int:
        return self.seed + index
