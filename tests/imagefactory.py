"""Images for tests, built in memory: solid and textured images, broken files and cheap huge PNGs."""

from __future__ import annotations

import io
import struct
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image

Color = tuple[int, int, int]

__all__ = [
    "avif_bytes",
    "encode",
    "gif_bytes",
    "huge_png",
    "jpeg_bytes",
    "not_an_image",
    "png_bytes",
    "solid_image",
    "textured_image",
    "truncated_png",
    "webp_bytes",
]


def solid_image(width: int, height: int, color: Color = (200, 60, 30), mode: str = "RGB") -> Image.Image:
    """A single-colour image in `mode` (RGB, RGBA, L, LA, P, I;16, CMYK, 1, ...)."""
    if mode.startswith("I;16"):
        # 16-bit greyscale cannot be reached with convert(); build the samples directly.
        grey = round(0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2])
        return Image.fromarray(np.full((height, width), grey * 257, dtype=np.uint16))
    base = Image.new("RGB", (width, height), color)
    if mode == "P":
        return base.quantize(256)
    return base if mode == "RGB" else base.convert(mode)


def textured_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A deterministic gradient with noise: lossy encoders' output size depends on quality."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = [
        (x * 255 // max(1, width - 1)),
        (y * 255 // max(1, height - 1)),
        ((x + y) * 3) % 256,
    ]
    rgb = np.stack(channels, axis=-1) + rng.integers(-20, 21, (height, width, 3))
    im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if mode == "RGBA":
        alpha = Image.fromarray((x * 255 // max(1, width - 1)).astype(np.uint8))
        im.putalpha(alpha)
        return im
    return im if mode == "RGB" else im.convert(mode)


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    """`im` encoded as `fmt` ("png", "jpeg", "webp", "gif", "avif")."""
    buf = io.BytesIO()
    im.save(buf, fmt.upper(), **params)
    return buf.getvalue()


def png_bytes(width: int, height: int, color: Color = (200, 60, 30), mode: str = "RGB") -> bytes:
    return encode(solid_image(width, height, color, mode), "png")


def jpeg_bytes(
    width: int, height: int, color: Color = (200, 60, 30), mode: str = "RGB", **params: object
) -> bytes:
    return encode(solid_image(width, height, color, mode), "jpeg", **params)


def webp_bytes(width: int, height: int, color: Color = (200, 60, 30), mode: str = "RGB") -> bytes:
    return encode(solid_image(width, height, color, mode), "webp")


def gif_bytes(width: int, height: int, color: Color = (200, 60, 30)) -> bytes:
    return encode(solid_image(width, height, color, "P"), "gif")


def avif_bytes(width: int, height: int, color: Color = (200, 60, 30)) -> bytes:
    return encode(solid_image(width, height, color), "avif")


def truncated_png(width: int = 256, height: int = 256) -> bytes:
    """A PNG with a valid signature and header whose pixel data is cut in the middle."""
    data = encode(textured_image(width, height), "png")
    return data[: len(data) // 2]


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@lru_cache(maxsize=8)
def huge_png(width: int, height: int, *, complete: bool = True) -> bytes:
    """A valid black greyscale PNG of any size, built by streaming zlib over zero rows.

    Costs one row of memory, never the whole image. With complete=False only the header and the
    first part of the pixel data are kept: a decoder that tried to read it would fail as truncated.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    compressor = zlib.compressobj(level=1)
    row = bytes(1 + width)  # filter byte 0 + zero samples
    parts = [compressor.compress(row) for _ in range(height)]
    idat = b"".join(parts) + compressor.flush()
    if not complete:
        idat = idat[: max(1, len(idat) // 4)]
        return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def not_an_image() -> bytes:
    """Bytes that no image decoder accepts (plain text that starts like nothing known)."""
    return b"this is a text file, not an image\n" * 8
