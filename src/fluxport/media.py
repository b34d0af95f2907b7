"""Decode, validate and resize input images; encode output images.

Everything here is synchronous and CPU-bound: call it with `asyncio.to_thread`, never on the event
loop. Decoding is guarded: the pixel count is read from the header and checked before any pixel
data is decompressed, and truncated or corrupt data fails instead of being silently padded.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Final

from PIL import ExifTags, Image, ImageFile

from fluxport.domain.errors import InvalidRequest, PayloadTooLarge
from fluxport.domain.job import LOSSY_FORMATS, OUTPUT_FORMATS, GeneratedImage, ReferenceImage, Size

__all__ = [
    "DEFAULT_QUALITY",
    "MAX_REFERENCE_PIXELS",
    "MAX_RESULT_PIXELS",
    "MIN_REFERENCE_SIDE",
    "REFERENCE_FORMATS",
    "EncodedImage",
    "decode_image",
    "finalize_image",
    "load_reference",
    "sniff_format",
]

# The formats fluxport reads: references, and provider results it can pass through untouched.
REFERENCE_FORMATS: Final = frozenset({"png", "jpeg", "webp"})
MIN_REFERENCE_SIDE: Final = 64
MAX_REFERENCE_ASPECT: Final = 8
# FLUX.2 [dev] conditions on at most about 4 MP per reference; larger ones only cost upload time.
MAX_REFERENCE_PIXELS: Final = 4 * 1024 * 1024
# Guard for provider results when the caller passes no limit; matches the settings' default.
MAX_RESULT_PIXELS: Final = 50_000_000
# Encoder quality when the client sends no output_compression.
DEFAULT_QUALITY: Final[dict[str, int]] = {"jpeg": 90, "webp": 90, "avif": 75}
# Quality for re-encoding a reference: it is an input to the model, so keep it close to the original.
REFERENCE_QUALITY: Final = 95

_PIL_FORMAT: Final = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "avif": "AVIF"}
_NAME: Final = {"png": "PNG", "jpeg": "JPEG", "webp": "WebP", "gif": "GIF", "avif": "AVIF"}
_AVIF_BRANDS: Final = (b"avif", b"avis")
_ORIENTATION: Final = ExifTags.Base.Orientation
# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class EncodedImage:
    """An image encoded for delivery to the client."""

    data: bytes
    format: str  # one of OUTPUT_FORMATS
    width: int
    height: int

    @property
    def mime(self) -> str:
        return f"image/{self.format}"

    @property
    def size(self) -> Size:
        return Size(self.width, self.height)


class _Unreadable(Exception):
    """The data is not a decodable image (garbage, unreadable header, truncated, corrupt)."""


class _TooManyPixels(Exception):
    """The header declares more pixels than allowed (message: "W x H is N megapixels; ...")."""


# --------------------------------------------------------------------------------------------
# Sniffing and guarded decoding


def sniff_format(data: bytes) -> str | None:
    """The image format named by the magic bytes at the start of `data`, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if len(data) >= 12 and data[4:8] == b"ftyp":
        # An ISO-BMFF file is AVIF when "avif"/"avis" is its major brand or a compatible brand.
        box_size = int.from_bytes(data[:4], "big")
        end = min(box_size, len(data)) if box_size >= 16 else 12
        brands = [data[8:12]] + [data[i : i + 4] for i in range(16, end - 3, 4)]
        if any(brand in _AVIF_BRANDS for brand in brands):
            return "avif"
    return None


def _open_header(data: bytes, fmt: str, max_pixels: int) -> ImageFile.ImageFile:
    """Parse the header only (no pixel data is decompressed) and enforce the pixel limit."""
    try:
        im = Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]])
    except Image.DecompressionBombError as exc:
        # Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS) tripped before ours could: still too big.
        raise _TooManyPixels(f"{exc}; the limit is {_megapixels(max_pixels)} megapixels") from exc
    except Exception as exc:  # Pillow's parsers raise many exception types on malformed input.
        raise _Unreadable(str(exc) or type(exc).__name__) from exc
    width, height = im.size
    if width <= 0 or height <= 0:
        raise _Unreadable(f"the header gives an empty size {width}x{height}")
    if width * height > max_pixels:
        im.close()
        raise _TooManyPixels(
            f"{width}x{height} is {_megapixels(width * height)} megapixels; "
            f"the limit is {_megapixels(max_pixels)} megapixels"
        )
    return im


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f}".removesuffix(".0")


def _load_fully(data: bytes, im: ImageFile.ImageFile, fmt: str) -> None:
    """Decode all pixel data, failing on truncation or corruption."""
    try:
        if fmt == "png":
            # load() stops once it has all rows, so it misses bad CRCs and a missing IEND; verify()
            # walks every chunk's CRC without decompressing, which is cheap next to the decode.
            with Image.open(io.BytesIO(data), formats=["PNG"]) as checker:
                checker.verify()
        # LOAD_TRUNCATED_IMAGES must stay False (Pillow's default): then load() raises on short data.
        im.load()
    except Exception as exc:  # Pillow's decoders raise many exception types on corrupt input.
        raise _Unreadable(str(exc) or type(exc).__name__) from exc


def _check_complete(data: bytes, fmt: str) -> None:
    """Catch a truncated or damaged file without decoding its pixels: PNG chunk CRCs through IEND,
    JPEG's end-of-image marker, WebP's RIFF length. (A pass-through result never needs its pixels.)"""
    if fmt == "png":
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as checker:
                checker.verify()
        except Exception as exc:  # Pillow raises many exception types on corrupt chunks
            raise _Unreadable(str(exc) or type(exc).__name__) from exc
    elif fmt == "jpeg":
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise _Unreadable("the JPEG data ends before its end-of-image marker (truncated)")
    elif fmt == "webp":
        declared = int.from_bytes(data[4:8], "little") + 8
        if len(data) < declared:
            raise _Unreadable(f"the WebP file is {len(data)} bytes of {declared} (truncated)")
    else:
        raise _Unreadable(f"no completeness check for {fmt}; decode it instead")


def check_image(data: bytes, *, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) of a provider's PNG, JPEG or WebP result that is whole and within the
    pixel limit, from its header and structure only; raise ValueError otherwise."""
    fmt = sniff_format(data)
    if fmt not in REFERENCE_FORMATS:
        raise ValueError("not a PNG, JPEG or WebP image")
    try:
        with _open_header(data, fmt, max_pixels) as im:
            width, height = im.size
        _check_complete(data, fmt)
    except _TooManyPixels as exc:
        raise ValueError(f"image too large: {exc}") from exc
    except _Unreadable as exc:
        raise ValueError(f"unreadable {fmt} image: {exc}") from exc
    return fmt, width, height


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode a provider's result bytes with the bomb guard; raise ValueError if it is not an image."""
    fmt = sniff_format(data)
    if fmt is None:
        raise ValueError("not a PNG, JPEG, WebP, GIF or AVIF image")
    try:
        im = _open_header(data, fmt, max_pixels)
    except _TooManyPixels as exc:
        raise ValueError(f"image too large: {exc}") from exc
    except _Unreadable as exc:
        raise ValueError(f"unreadable {fmt} image: {exc}") from exc
    try:
        _load_fully(data, im, fmt)
    except _Unreadable as exc:
        im.close()
        raise ValueError(f"unreadable {fmt} image: {exc}") from exc
    return im


# --------------------------------------------------------------------------------------------
# Mode handling and resizing


def _has_alpha(im: Image.Image) -> bool:
    return "A" in im.getbands() or "a" in im.mode or "transparency" in im.info


def _to_rgb_or_rgba(im: Image.Image) -> Image.Image:
    """Return `im` itself when it is RGB or RGBA, else a converted copy."""
    if im.mode in ("RGB", "RGBA"):
        return im
    if im.mode.startswith("I"):
        # 16-bit greyscale: Pillow's convert() clips values above 255, so scale to 8 bits first.
        return im.point(lambda v: v / 256).convert("L").convert("RGB")
    if im.mode == "F":
        return im.convert("L").convert("RGB")
    return im.convert("RGBA" if _has_alpha(im) else "RGB")


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # A broken EXIF block must not sink an otherwise good image.
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _fit_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size of the same aspect ratio with at most `max_pixels` pixels."""
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    while w * h > max_pixels:  # guards float rounding at the boundary
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h


def _resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    if im.size == size:
        return im
    if im.mode not in ("RGB", "RGBA", "L", "LA"):
        im = _to_rgb_or_rgba(im)
    # reducing_gap first shrinks by an integer factor (fast), then LANCZOS does the rest.
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


# --------------------------------------------------------------------------------------------
# References


def _ref_error(index: int, text: str) -> InvalidRequest:
    return InvalidRequest(f"Image {index + 1} of the request {text}", param="image")


def load_reference(data: bytes, *, index: int, max_bytes: int, max_pixels: int) -> ReferenceImage:
    """Validate one uploaded reference image and normalise it for the providers.

    Returns the original bytes when nothing needed changing; otherwise a re-encoded image that is
    upright, RGB or RGBA, and at most 4 MP.
    """
    if not data:
        raise _ref_error(index, "is an empty file.")
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"Image {index + 1} of the request is {len(data)} bytes; the limit is {max_bytes} bytes.",
            param="image",
        )
    fmt = sniff_format(data)
    if fmt is None or fmt not in REFERENCE_FORMATS:
        found = f"in {_NAME[fmt]} format" if fmt else "not in a recognised image format"
        raise _ref_error(index, f"is {found}; reference images must be PNG, JPEG or WebP.")
    name = _NAME[fmt]

    try:
        im = _open_header(data, fmt, max_pixels)
    except _TooManyPixels as exc:
        raise _ref_error(index, f"has too many pixels: {exc}.") from exc
    except _Unreadable as exc:
        raise _ref_error(
            index, f"is not a readable {name} file; it may be truncated or corrupt ({exc})."
        ) from exc

    with im:
        width, height = im.size
        if min(width, height) < MIN_REFERENCE_SIDE:
            raise _ref_error(
                index, f"is {width}x{height}; each side must be at least {MIN_REFERENCE_SIDE} pixels."
            )
        if max(width, height) > MAX_REFERENCE_ASPECT * min(width, height):
            raise _ref_error(
                index,
                f"is {width}x{height}; the aspect ratio must be at most {MAX_REFERENCE_ASPECT}:1.",
            )

        target: tuple[int, int] | None = None
        if width * height > MAX_REFERENCE_PIXELS:
            target = _fit_pixels(width, height, MAX_REFERENCE_PIXELS)
            if fmt == "jpeg":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below the target): far less memory.
                im.draft(None, target)

        try:
            _load_fully(data, im, fmt)
        except _Unreadable as exc:
            raise _ref_error(index, f"is a truncated or corrupt {name} file ({exc}).") from exc

        orientation = _orientation(im)
        animated = bool(getattr(im, "is_animated", False))
        if target is None and orientation == 1 and im.mode in ("RGB", "RGBA") and not animated:
            return ReferenceImage(data=data, format=fmt, width=width, height=height)

        icc = im.info.get("icc_profile") if im.mode in ("RGB", "RGBA") else None
        # Shrink first so the mode conversion and the rotation work on the small image.
        out = _to_rgb_or_rgba(_resize(im, target) if target is not None else im)
        if out is not im:
            im.close()  # frees the full-size pixels now; the with-block would hold them until return
        if orientation != 1:
            # Transposed pixels, and the re-encode below carries no EXIF, so nothing rotates twice.
            out = out.transpose(_UPRIGHT[orientation])
        encoded = _encode(out, fmt, REFERENCE_QUALITY, icc_profile=icc)
        return ReferenceImage(data=encoded, format=fmt, width=out.width, height=out.height)


# --------------------------------------------------------------------------------------------
# Outputs


def _encode(im: Image.Image, fmt: str, quality: int | None, *, icc_profile: object = None) -> bytes:
    """Encode an RGB or RGBA image; `quality` is used by the lossy formats only."""
    buf = io.BytesIO()
    params: dict[str, object] = {}
    if isinstance(icc_profile, bytes) and fmt != "gif":
        params["icc_profile"] = icc_profile
    if fmt == "png":
        im.save(buf, "PNG", **params)
    elif fmt == "jpeg":
        if im.mode == "RGBA":
            flat = Image.new("RGB", im.size, (255, 255, 255))
            flat.paste(im, mask=im.getchannel("A"))
            im = flat
        elif im.mode != "RGB":
            im = im.convert("RGB")
        im.save(buf, "JPEG", quality=quality, **params)
    elif fmt == "webp":
        im.save(buf, "WEBP", quality=quality, **params)
    elif fmt == "avif":
        # speed 8 (libavif's default is 6) is 4-6x faster for files a few percent larger: latency
        # matters more here than the last bytes.
        im.save(buf, "AVIF", quality=quality, speed=8, **params)
    elif fmt == "gif":
        if im.mode != "RGBA":
            # Pillow's default palette (median cut) is ~100x slower than octree for no visible gain.
            im = im.quantize(256, method=Image.Quantize.FASTOCTREE)
        # RGBA is left to Pillow, which keeps fully transparent pixels as the GIF transparent index.
        im.save(buf, "GIF")
    else:
        raise ValueError(f"unsupported output format {fmt!r}")
    return buf.getvalue()


def finalize_image(
    image: GeneratedImage,
    size: Size,
    output_format: str,
    compression: int | None,
    *,
    max_pixels: int = MAX_RESULT_PIXELS,
) -> EncodedImage:
    """Resample `image` to exactly `size` and encode it as `output_format`.

    `compression` is OpenAI's output_compression (0-100, used as encoder quality, 100 = best); it
    is ignored for png and gif. Bytes already in the right format and size are checked by decoding
    and returned untouched. Raises ValueError when the provider's bytes are not a decodable image.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unsupported output format {output_format!r}")
    if compression is not None and not 0 <= compression <= 100:
        raise ValueError(f"compression must be between 0 and 100, not {compression}")
    lossy = output_format in LOSSY_FORMATS
    quality = (DEFAULT_QUALITY[output_format] if compression is None else compression) if lossy else None
    target = (size.width, size.height)

    content = image.content
    if isinstance(content, bytes):
        if (
            sniff_format(content) == output_format
            and output_format in REFERENCE_FORMATS
            and (compression is None or not lossy)
            and (image.width, image.height) == target
        ):
            # Passed through untouched: checked whole (a truncated or corrupt result must fail
            # here, and be retried elsewhere, not reach the client) without decoding its pixels.
            _, width, height = check_image(content, max_pixels=max_pixels)
            if (width, height) == target:
                return EncodedImage(content, output_format, size.width, size.height)
        pixels: Image.Image = decode_image(content, max_pixels=max_pixels)
    else:
        pixels = content

    pixels = _to_rgb_or_rgba(_resize(pixels, target))
    data = _encode(pixels, output_format, quality)
    return EncodedImage(data, output_format, size.width, size.height)
