"""media: sniffing, guarded reference loading, output resampling and encoding."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from fluxport.domain.errors import InvalidRequest, PayloadTooLarge
from fluxport.domain.job import LOSSY_FORMATS, OUTPUT_FORMATS, ReferenceImage, Size
from fluxport.media import (
    MAX_REFERENCE_PIXELS,
    EncodedImage,
    decode_image,
    finalize_image,
    load_reference,
    sniff_format,
)
from fluxport.providers.base import GeneratedImage
from tests.imagefactory import (
    avif_bytes,
    encode,
    gif_bytes,
    huge_png,
    jpeg_bytes,
    not_an_image,
    png_bytes,
    solid_image,
    textured_image,
    truncated_png,
    webp_bytes,
)

MB = 1024 * 1024
LIMIT_BYTES = 50 * MB
LIMIT_PIXELS = 50_000_000


def load(
    data: bytes, index: int = 0, *, max_bytes: int = LIMIT_BYTES, max_pixels: int = LIMIT_PIXELS
) -> ReferenceImage:
    return load_reference(data, index=index, max_bytes=max_bytes, max_pixels=max_pixels)


def decoded(data: bytes) -> Image.Image:
    """Decode with Pillow alone, as a client would."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def pixels_image(width: int, height: int, mode: str = "RGB") -> GeneratedImage:
    return GeneratedImage(content=textured_image(width, height, mode), width=width, height=height)


def bytes_image(data: bytes) -> GeneratedImage:
    w, h = decoded(data).size
    return GeneratedImage(content=data, width=w, height=h, format=sniff_format(data))


# ---------------------------------------------------------------------------------------------
# sniff_format


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    payload = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return (8 + len(payload)).to_bytes(4, "big") + b"ftyp" + payload + b"\x00" * 16


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (png_bytes(8, 8), "png"),
        (jpeg_bytes(8, 8), "jpeg"),
        (webp_bytes(8, 8), "webp"),
        (gif_bytes(8, 8), "gif"),
        (avif_bytes(8, 8), "avif"),
        (_ftyp(b"avis"), "avif"),
        (_ftyp(b"mif1", b"mif1", b"avif"), "avif"),
        (_ftyp(b"heic", b"mif1", b"heic"), None),
        (b"RIFF\x10\x00\x00\x00WAVEfmt ", None),
        (not_an_image(), None),
        (b"", None),
        (b"\x89PNG", None),
    ],
    ids=lambda v: v if isinstance(v, str | None) else None,
)
def test_sniff_format(data: bytes, expected: str | None) -> None:
    assert sniff_format(data) == expected


# ---------------------------------------------------------------------------------------------
# finalize_image


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
@pytest.mark.parametrize("source", ["pixels", "png-bytes", "jpeg-bytes"])
@pytest.mark.parametrize(
    ("generated", "requested"),
    [((1024, 768), (1024, 768)), ((1184, 880), (1183, 887)), ((512, 512), (300, 301))],
    ids=["exact", "grid-to-odd", "downscale"],
)
def test_finalize_delivers_exact_size_and_format(
    output_format: str, source: str, generated: tuple[int, int], requested: tuple[int, int]
) -> None:
    im = textured_image(*generated)
    image = (
        GeneratedImage(content=im, width=im.width, height=im.height)
        if source == "pixels"
        else bytes_image(encode(im, source.removesuffix("-bytes")))
    )
    result = finalize_image(image, Size(*requested), output_format, None)

    assert isinstance(result, EncodedImage)
    assert (result.format, result.width, result.height) == (output_format, *requested)
    assert result.mime == f"image/{output_format}"
    assert sniff_format(result.data) == output_format
    out = decoded(result.data)
    assert out.size == requested
    assert out.format == output_format.upper()


@pytest.mark.parametrize("output_format", sorted(LOSSY_FORMATS))
def test_compression_sets_lossy_quality(output_format: str) -> None:
    image = pixels_image(256, 256)
    sizes = [len(finalize_image(image, Size(256, 256), output_format, q).data) for q in (5, 50, 95)]
    assert sizes[0] < sizes[1] < sizes[2]


@pytest.mark.parametrize("output_format", ["png", "gif"])
def test_compression_is_ignored_for_lossless(output_format: str) -> None:
    image = pixels_image(128, 96)
    plain = finalize_image(image, Size(128, 96), output_format, None).data
    assert finalize_image(image, Size(128, 96), output_format, 10).data == plain


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_correct_bytes_pass_through_untouched(output_format: str) -> None:
    data = encode(textured_image(320, 240), output_format)
    result = finalize_image(bytes_image(data), Size(320, 240), output_format, None)
    assert result.data is data


def test_lossless_passthrough_even_with_compression() -> None:
    data = png_bytes(320, 240)
    assert finalize_image(bytes_image(data), Size(320, 240), "png", 10).data is data


def test_explicit_compression_reencodes_lossy_bytes() -> None:
    data = encode(textured_image(320, 240), "jpeg", quality=95)
    result = finalize_image(bytes_image(data), Size(320, 240), "jpeg", 20)
    assert result.data != data
    assert len(result.data) < len(data)
    assert decoded(result.data).size == (320, 240)


def test_bytes_of_other_size_or_format_are_converted() -> None:
    data = png_bytes(1184, 880)
    resized = finalize_image(bytes_image(data), Size(1183, 887), "png", None)
    assert resized.data != data and decoded(resized.data).size == (1183, 887)
    converted = finalize_image(bytes_image(data), Size(1184, 880), "webp", None)
    assert sniff_format(converted.data) == "webp" and decoded(converted.data).size == (1184, 880)


def test_finalize_trusts_the_magic_not_the_declared_format() -> None:
    data = encode(textured_image(64, 64), "jpeg")
    image = GeneratedImage(content=data, width=64, height=64, format="png")
    assert sniff_format(finalize_image(image, Size(64, 64), "png", None).data) == "png"


def test_jpeg_composites_alpha_on_white() -> None:
    im = solid_image(64, 64, (10, 20, 30), "RGBA")
    im.putalpha(0)
    result = finalize_image(GeneratedImage(im, 64, 64), Size(64, 64), "jpeg", 95)
    r, g, b = decoded(result.data).convert("RGB").getpixel((32, 32))  # type: ignore[misc]
    assert min(r, g, b) >= 250


def test_gif_keeps_transparency_and_colour() -> None:
    im = solid_image(64, 64, (200, 60, 30), "RGBA")
    im.paste((0, 0, 0, 0), (0, 0, 16, 16))
    out = decoded(finalize_image(GeneratedImage(im, 64, 64), Size(64, 64), "gif", None).data)
    assert out.mode == "P"
    rgba = out.convert("RGBA")
    assert rgba.getpixel((4, 4))[3] == 0  # type: ignore[index]
    r, g, b, a = rgba.getpixel((40, 40))  # type: ignore[misc]
    assert a == 255 and abs(r - 200) + abs(g - 60) + abs(b - 30) < 20


@pytest.mark.parametrize("mode", ["L", "LA", "P", "I;16", "CMYK", "1", "RGBA"])
@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
def test_finalize_accepts_any_mode(mode: str, output_format: str) -> None:
    im = solid_image(100, 80, (128, 128, 128), mode)
    result = finalize_image(GeneratedImage(im, 100, 80), Size(96, 96), output_format, None)
    out = decoded(result.data)
    assert out.size == (96, 96)
    if mode != "1":  # mid grey survives (16-bit samples are scaled, not clipped to white)
        grey = out.convert("L").getpixel((48, 48))
        assert isinstance(grey, int) and abs(grey - 128) < 12, grey


def test_finalize_rejects_garbage_bytes() -> None:
    with pytest.raises(ValueError, match="not a PNG"):
        finalize_image(GeneratedImage(not_an_image(), 64, 64, "png"), Size(64, 64), "png", None)


def test_finalize_rejects_truncated_bytes() -> None:
    with pytest.raises(ValueError, match="unreadable png"):
        finalize_image(GeneratedImage(truncated_png(), 256, 256, "png"), Size(256, 256), "png", None)


def test_finalize_guards_result_pixels() -> None:
    image = GeneratedImage(huge_png(10000, 7000), 10000, 7000, "png")
    with pytest.raises(ValueError, match="too large"):
        finalize_image(image, Size(1024, 1024), "png", None, max_pixels=LIMIT_PIXELS)


@pytest.mark.parametrize(("fmt", "compression"), [("bmp", None), ("jpeg", 101), ("webp", -1)])
def test_finalize_rejects_bad_arguments(fmt: str, compression: int | None) -> None:
    with pytest.raises(ValueError):
        finalize_image(pixels_image(32, 32), Size(32, 32), fmt, compression)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(16, 600),
    height=st.integers(16, 600),
    output_format=st.sampled_from(OUTPUT_FORMATS),
    compression=st.one_of(st.none(), st.integers(0, 100)),
    as_bytes=st.booleans(),
)
def test_finalize_always_returns_the_requested_size(
    width: int, height: int, output_format: str, compression: int | None, as_bytes: bool
) -> None:
    image = bytes_image(_SOURCE_PNG) if as_bytes else pixels_image(320, 224)
    result = finalize_image(image, Size(width, height), output_format, compression)
    assert (result.width, result.height) == (width, height)
    assert sniff_format(result.data) == output_format
    assert decoded(result.data).size == (width, height)


_SOURCE_PNG = encode(textured_image(320, 224), "png")


# ---------------------------------------------------------------------------------------------
# decode_image


def test_decode_image_loads_pixels() -> None:
    im = decode_image(webp_bytes(130, 70), max_pixels=LIMIT_PIXELS)
    assert im.size == (130, 70)
    assert im.getpixel((1, 1)) is not None


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (not_an_image(), "not a PNG"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "unreadable png"),
        (truncated_png(), "unreadable png"),
        (huge_png(10000, 7000, complete=False), "too large"),
    ],
    ids=["garbage", "bad-header", "truncated", "huge"],
)
def test_decode_image_rejects(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_image(data, max_pixels=LIMIT_PIXELS)


# ---------------------------------------------------------------------------------------------
# load_reference


@pytest.mark.parametrize("maker", [png_bytes, jpeg_bytes, webp_bytes], ids=["png", "jpeg", "webp"])
def test_clean_reference_is_returned_untouched(maker: Callable[[int, int], bytes]) -> None:
    data = maker(640, 480)
    ref = load(data)
    assert ref.data is data
    assert (ref.format, ref.width, ref.height) == (sniff_format(data), 640, 480)


@pytest.mark.parametrize(
    ("size", "ok"),
    [
        ((64, 64), True),
        ((63, 200), False),
        ((200, 63), False),
        ((512, 64), True),  # 8:1
        ((64, 512), True),
        ((576, 64), False),  # 9:1
        ((64, 576), False),
        ((1025, 128), False),  # just over 8:1
    ],
)
def test_reference_side_and_aspect_limits(size: tuple[int, int], ok: bool) -> None:
    data = png_bytes(*size)
    if ok:
        assert load(data).size == Size(*size)
    else:
        with pytest.raises(
            InvalidRequest, match=r"at least 64 pixels|aspect ratio must be at most 8:1"
        ) as err:
            load(data, index=2)
        assert err.value.param == "image"
        assert "Image 3 of the request" in err.value.message


def _corrupt_jpeg() -> bytes:
    data = encode(textured_image(256, 256), "jpeg")
    return data[: len(data) // 2]


def _corrupt_webp() -> bytes:
    data = encode(textured_image(256, 256), "webp")
    return data[: len(data) // 2]


def _bad_png_crc() -> bytes:
    data = bytearray(encode(textured_image(128, 128), "png"))
    data[len(data) // 2] ^= 0xFF  # inside IDAT: zlib may still inflate it, the CRC cannot match
    return bytes(data)


def _png_without_iend() -> bytes:
    data = encode(textured_image(128, 128), "png")
    assert data.endswith(b"IEND\xaeB`\x82")
    return data[:-12]  # every pixel is there; the end marker is not


def _png_bad_idat_checksum() -> bytes:
    data = bytearray(encode(textured_image(128, 128), "png"))
    crc_at = data.index(b"IEND") - 8  # the last 4 bytes of the IDAT chunk before IEND
    data[crc_at] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty file"),
        (not_an_image(), "must be PNG, JPEG or WebP"),
        (gif_bytes(128, 128), "in GIF format"),
        (avif_bytes(128, 128), "in AVIF format"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not a readable PNG file"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "not a readable JPEG file"),
        (truncated_png(), "truncated or corrupt PNG"),
        (_bad_png_crc(), "truncated or corrupt PNG"),
        (_png_without_iend(), "truncated or corrupt PNG"),
        (_png_bad_idat_checksum(), "truncated or corrupt PNG"),
        (_corrupt_jpeg(), "truncated or corrupt JPEG"),
        (_corrupt_webp(), "truncated or corrupt"),
        (huge_png(10000, 7000), "too many pixels: 10000x7000 is 70 megapixels"),
    ],
    ids=[
        "empty",
        "text",
        "gif",
        "avif",
        "png-garbage-header",
        "jpeg-garbage-header",
        "png-truncated",
        "png-bad-crc",
        "png-no-iend",
        "png-idat-checksum",
        "jpeg-truncated",
        "webp-truncated",
        "70-megapixels",
    ],
)
def test_bad_reference_is_rejected(data: bytes, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        load(data, index=1)
    assert err.value.param == "image"
    assert err.value.status == 400
    assert err.value.message.startswith("Image 2 of the request ")
    assert fragment in err.value.message


def test_oversized_reference_is_payload_too_large() -> None:
    data = png_bytes(128, 128)
    with pytest.raises(PayloadTooLarge) as err:
        load(data, max_bytes=len(data) - 1)
    assert err.value.param == "image" and err.value.status == 413
    assert load(data, max_bytes=len(data)).data is data


def test_huge_reference_is_rejected_from_the_header_alone() -> None:
    # Its pixel data is cut short: had it been decoded, the error would name truncation instead.
    with pytest.raises(InvalidRequest, match="too many pixels: 10000x7000"):
        load(huge_png(10000, 7000, complete=False))


def test_max_pixels_is_the_callers_limit() -> None:
    data = png_bytes(300, 300)
    assert load(data, max_pixels=90_000).data is data
    with pytest.raises(InvalidRequest, match="too many pixels"):
        load(data, max_pixels=89_999)


@pytest.mark.parametrize(
    ("fmt", "size"), [("png", (2600, 2000)), ("jpeg", (3000, 1500)), ("webp", (1500, 3000))]
)
def test_large_reference_is_downscaled_to_4mp(fmt: str, size: tuple[int, int]) -> None:
    data = encode(solid_image(*size, (40, 160, 90)), fmt)
    ref = load(data)
    assert ref.format == fmt and sniff_format(ref.data) == fmt
    assert ref.width * ref.height <= MAX_REFERENCE_PIXELS
    assert ref.width * ref.height > 0.99 * MAX_REFERENCE_PIXELS  # fits 4 MP, not far below it
    assert math.isclose(ref.width / ref.height, size[0] / size[1], rel_tol=0.002)
    out = decoded(ref.data)
    assert out.size == (ref.width, ref.height)
    r, g, b = out.convert("RGB").getpixel((ref.width // 2, ref.height // 2))  # type: ignore[misc]
    assert abs(r - 40) + abs(g - 160) + abs(b - 90) < 12


def _split_jpeg(width: int, height: int, orientation: int) -> bytes:
    """Left half red, right half blue, stored with an EXIF orientation tag."""
    im = solid_image(width, height, (220, 0, 0))
    im.paste((0, 0, 220), (width // 2, 0, width, height))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "jpeg", quality=95, exif=exif)


def _is_red(rgb: object) -> bool:
    assert isinstance(rgb, tuple)
    return bool(rgb[0] > 150 and rgb[2] < 80)


def _is_blue(rgb: object) -> bool:
    assert isinstance(rgb, tuple)
    return bool(rgb[2] > 150 and rgb[0] < 80)


def test_exif_rotated_jpeg_comes_out_upright() -> None:
    # Orientation 6: the stored image must turn 90° clockwise, so its left (red) half goes on top.
    ref = load(_split_jpeg(200, 100, orientation=6))
    assert (ref.width, ref.height) == (100, 200)
    out = decoded(ref.data)
    assert out.size == (100, 200)
    assert out.getexif().get(0x0112, 1) == 1  # nothing left that would rotate it again
    assert _is_red(out.getpixel((50, 20))) and _is_blue(out.getpixel((50, 180)))


def test_exif_orientation_3_and_1() -> None:
    upside_down = decoded(load(_split_jpeg(200, 100, orientation=3)).data)
    assert _is_blue(upside_down.getpixel((20, 50))) and _is_red(upside_down.getpixel((180, 50)))
    upright = _split_jpeg(200, 100, orientation=1)
    assert load(upright).data is upright


def test_rotated_and_downscaled_reference() -> None:
    ref = load(_split_jpeg(3000, 1500, orientation=8))
    assert ref.height > ref.width  # portrait after rotation
    assert ref.width * ref.height <= MAX_REFERENCE_PIXELS
    assert math.isclose(ref.height / ref.width, 2.0, rel_tol=0.002)
    out = decoded(ref.data)
    # Orientation 8 turns it 90° anticlockwise: the right (blue) half goes on top.
    assert _is_blue(out.getpixel((ref.width // 2, 50))) and _is_red(
        out.getpixel((ref.width // 2, ref.height - 50))
    )


@pytest.mark.parametrize(
    ("fmt", "mode", "expected_mode"),
    [
        ("png", "P", "RGB"),
        ("png", "L", "RGB"),
        ("png", "LA", "RGBA"),
        ("png", "I;16", "RGB"),
        ("png", "1", "RGB"),
        ("jpeg", "L", "RGB"),
        ("jpeg", "CMYK", "RGB"),
    ],
)
def test_odd_modes_are_normalised(fmt: str, mode: str, expected_mode: str) -> None:
    colour = (
        (128, 128, 128) if mode in ("L", "LA", "I;16") else (255, 255, 255) if mode == "1" else (30, 90, 200)
    )
    data = encode(solid_image(96, 80, colour, mode), fmt)
    ref = load(data)
    assert ref.data != data and ref.format == fmt and ref.size == Size(96, 80)
    out = decoded(ref.data)
    assert out.mode == expected_mode
    r, g, b = out.convert("RGB").getpixel((48, 40))  # type: ignore[misc]
    assert abs(r - colour[0]) + abs(g - colour[1]) + abs(b - colour[2]) < 20, (r, g, b)


def test_palette_with_transparency_becomes_rgba() -> None:
    im = solid_image(96, 96, (30, 90, 200), "RGBA")
    im.paste((0, 0, 0, 0), (0, 0, 48, 96))
    data = encode(im.quantize(16, method=Image.Quantize.FASTOCTREE), "png")
    assert decoded(data).mode == "P"
    out = decoded(load(data).data)
    assert out.mode == "RGBA"
    assert out.getpixel((10, 10))[3] == 0 and out.getpixel((80, 10))[3] == 255  # type: ignore[index]


def test_truncated_images_are_not_padded_globally() -> None:
    # The guard depends on Pillow's default; something switching it on would disable it everywhere.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("data", "fmt", "side"),
    [
        (truncated_png(), "png", 256),
        (_bad_png_crc(), "png", 128),
        (_png_without_iend(), "png", 128),
        (_png_bad_idat_checksum(), "png", 128),
        (_corrupt_jpeg(), "jpeg", 256),
        (_corrupt_webp(), "webp", 256),
    ],
    ids=[
        "png-truncated",
        "png-bad-crc",
        "png-no-iend",
        "png-idat-checksum",
        "jpeg-truncated",
        "webp-truncated",
    ],
)
def test_a_damaged_result_is_not_passed_through(data: bytes, fmt: str, side: int) -> None:
    """A result already in the asked format and size is passed through without decoding its pixels,
    but only once it is checked whole: a damaged one fails (and the request goes elsewhere)."""
    with pytest.raises(ValueError, match=f"unreadable {fmt}"):
        finalize_image(GeneratedImage(data, side, side, fmt), Size(side, side), fmt, None)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_a_whole_result_is_passed_through_byte_for_byte(fmt: str) -> None:
    data = encode(textured_image(160, 96), fmt)
    result = finalize_image(GeneratedImage(data, 160, 96, fmt), Size(160, 96), fmt, None)
    assert result.data is data
    assert (result.width, result.height, result.format) == (160, 96, fmt)
