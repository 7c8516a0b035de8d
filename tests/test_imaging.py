"""analysis.imaging on real encoded bytes: formats, orientation, alpha, bombs, junk."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from imgstream.analysis import imaging
from imgstream.analysis.imaging import (
    DecodedImage,
    ImageError,
    JpegHeader,
    apply_orientation,
    clamp_box,
    crop,
    decode_image,
    pixels_of,
    png_base64,
    png_bytes,
    read_jpeg_header,
    sniff_format,
)
from imgstream.schemas.config import DecodeConfig

CONFIG = DecodeConfig()
RED = (220, 30, 30)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def solid(size: tuple[int, int] = (32, 24), color: tuple[int, ...] = RED, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, color)


def rgb_at(image: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    pixel = image.getpixel(xy)
    assert isinstance(pixel, tuple) and len(pixel) == 3
    return (pixel[0], pixel[1], pixel[2])


def png_header_only(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of any size, built row by row so memory stays tiny."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --- formats ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "name", "params"),
    [
        ("JPEG", "jpeg", {"quality": 95}),
        ("PNG", "png", {}),
        ("WEBP", "webp", {"lossless": True}),
        ("GIF", "gif", {}),
        ("BMP", "bmp", {}),
        ("TIFF", "tiff", {}),
        ("TIFF", "tiff", {"compression": "tiff_lzw"}),
    ],
)
def test_each_format_decodes_to_rgb(fmt: str, name: str, params: dict[str, object]) -> None:
    data = encode(solid(), fmt, **params)
    assert sniff_format(data) == name
    decoded = decode_image(data, CONFIG)
    assert isinstance(decoded, DecodedImage)
    assert decoded.format == name
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == decoded.image.size == (32, 24)
    assert decoded.sha256 == hashlib.sha256(data).hexdigest()
    r, g, b = rgb_at(decoded.image, (16, 12))
    assert abs(r - RED[0]) <= 6 and abs(g - RED[1]) <= 6 and abs(b - RED[2]) <= 6


def test_big_endian_tiff_is_recognised() -> None:
    data = encode(solid(), "TIFF")
    # Pillow writes little-endian; a big-endian signature must sniff the same.
    assert sniff_format(b"MM\x00*" + data[4:]) == "tiff"


def test_gif_uses_the_first_frame() -> None:
    frames = [solid(color=(255, 0, 0)), solid(color=(0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert rgb_at(decode_image(data, CONFIG).image, (0, 0)) == (255, 0, 0)


def test_exif_orientation_6_swaps_width_and_height() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95), CONFIG)
    assert (decoded.width, decoded.height) == (20, 40)
    # The stored left edge is displayed at the top after a clockwise turn.
    assert sum(rgb_at(decoded.image, (10, 2))) > 600
    assert sum(rgb_at(decoded.image, (10, 37))) < 100


def test_transparent_rgba_pixel_becomes_white() -> None:
    image = solid(color=(255, 0, 0, 255), mode="RGBA")
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 0, 128))
    decoded = decode_image(encode(image, "PNG"), CONFIG)
    assert decoded.image.mode == "RGB"
    assert rgb_at(decoded.image, (0, 0)) == (255, 255, 255)
    assert rgb_at(decoded.image, (1, 0)) in {(127, 127, 127), (128, 128, 128)}
    assert rgb_at(decoded.image, (5, 5)) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(fmt: str) -> None:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 128, 0, 10, 10, 10] + [0, 0, 0] * 254)
    image.putpixel((0, 0), 1)
    decoded = decode_image(encode(image, fmt, transparency=1), CONFIG)
    assert rgb_at(decoded.image, (0, 0)) == (255, 255, 255)
    assert rgb_at(decoded.image, (3, 3)) == (0, 128, 0)


def test_la_is_composited_and_cmyk_converted() -> None:
    la = Image.new("LA", (8, 8), (0, 0))
    assert rgb_at(decode_image(encode(la, "PNG"), CONFIG).image, (1, 1)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = rgb_at(decode_image(encode(cmyk, "JPEG", quality=95), CONFIG).image, (4, 4))
    assert r > 200 and g < 50 and b < 50


def test_sixteen_bit_gray_is_scaled_not_clipped() -> None:
    values = np.full((4, 4), 32896, dtype=np.uint16)  # 50% gray in 16 bits
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    r, g, b = rgb_at(decode_image(data, CONFIG).image, (0, 0))
    assert r == g == b and 126 <= r <= 130


# --- refusals -------------------------------------------------------------------------------


def assert_code(data: bytes, code: str, config: DecodeConfig = CONFIG) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, config)
    assert info.value.code == code
    assert info.value.message == str(info.value)
    return info.value


def test_html_is_undecodable_with_a_clear_message() -> None:
    err = assert_code(b"<!DOCTYPE html>\n<html><body>Not found</body></html>", "image_undecodable")
    assert "HTML" in err.message


def test_empty_and_unknown_bytes_are_undecodable() -> None:
    assert "empty" in assert_code(b"", "image_undecodable").message
    assert "unrecognised" in assert_code(bytes(range(256)), "image_undecodable").message
    assert "text" in assert_code(b"just some words", "image_undecodable").message
    assert "text" in assert_code(b"BMW is a car, not a bitmap", "image_undecodable").message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_truncated_files_are_undecodable(fmt: str) -> None:
    noise = Image.effect_noise((128, 128), 64).convert("RGB")
    data = encode(noise, fmt)
    assert_code(data[: len(data) // 2], "image_undecodable")


def test_magic_bytes_with_garbage_are_undecodable() -> None:
    assert_code(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "image_undecodable")
    assert_code(b"\xff\xd8\xff" + b"garbage" * 10, "image_undecodable")


def test_huge_png_header_is_refused_without_decoding() -> None:
    data = png_header_only(20_000, 20_000)
    assert len(data) < 200_000  # 400 MP that would take 50 MB even at 1 bit per pixel
    err = assert_code(data, "image_too_large")
    assert "pixels" in err.message  # Pillow's own guard may word it, at twice its MAX_IMAGE_PIXELS


def test_pixel_limit_is_ours_not_pillows_global() -> None:
    # 9000x9000 = 81 MP: under Pillow's MAX_IMAGE_PIXELS (89 MP), over our 40 MP default.
    assert Image.MAX_IMAGE_PIXELS is not None and 9000 * 9000 < Image.MAX_IMAGE_PIXELS
    err = assert_code(png_header_only(9000, 9000), "image_too_large")
    assert "40000000" in err.message
    assert_code(encode(solid((20, 20)), "PNG"), "image_too_large", DecodeConfig(max_pixels=399))
    assert decode_image(encode(solid((20, 20)), "PNG"), DecodeConfig(max_pixels=400)).width == 20


# --- boxes and crops ------------------------------------------------------------------------


def test_clamp_box_rounds_and_clamps() -> None:
    assert clamp_box([-5.2, 3.5, 120.7, 80.49], 100, 60) == [0, 4, 100, 60]
    assert clamp_box([10.4, 10.6, 20.5, 30.0], 100, 100) == [10, 11, 21, 30]
    assert clamp_box([float("-inf"), 0, float("inf"), 5], 10, 10) == [0, 0, 10, 5]


@pytest.mark.parametrize(
    "box",
    [[5, 5, 5, 9], [9, 5, 3, 9], [200, 0, 300, 10], [-10, -10, -1, -1], [0, 0, float("nan"), 5], [1.2, 1, 1.4, 5]],
)
def test_clamp_box_empty_is_none(box: list[float]) -> None:
    assert clamp_box(box, 100, 100) is None


def test_clamp_box_needs_four_values() -> None:
    with pytest.raises(ValueError):
        clamp_box([1, 2, 3], 10, 10)


def test_crop_and_png_round_trip() -> None:
    image = Image.new("RGB", (50, 40), (0, 0, 0))
    image.paste((0, 255, 0), (10, 5, 30, 25))
    box = clamp_box([10.2, 4.8, 29.6, 25.1], 50, 40)
    assert box == [10, 5, 30, 25]
    region = crop(pixels_of(image), box)
    assert tuple(region.shape) == (3, 20, 20)  # a view of the pixels: no copy
    raw = png_bytes(region)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    encoded = png_base64(region)
    assert not encoded.startswith("data:")
    assert base64.b64decode(encoded) == raw
    decoded = decode_image(raw, CONFIG)
    assert decoded.format == "png"
    assert set(decoded.image.getdata()) == {(0, 255, 0)}


# --- the decode path a GPU takes, run here with torchvision's CPU decoder ---------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_on_tensors_matches_pil(orientation: int) -> None:
    image = Image.effect_noise((24, 16), 80).convert("RGB")  # not square, no symmetry
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = encode(image, "PNG", exif=exif.tobytes())
    upright = decode_image(stored, CONFIG)  # PIL's exif_transpose
    assert torch.equal(apply_orientation(pixels_of(image), orientation), upright.pixels)


def test_jpeg_header_is_read_without_decoding_and_enforces_the_pixel_limit() -> None:
    image = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    header = read_jpeg_header(encode(image, "JPEG", exif=exif.tobytes()), CONFIG)
    assert header == JpegHeader(width=40, height=20, orientation=6, mode="RGB")
    assert read_jpeg_header(encode(image, "PNG"), CONFIG) is None  # other formats take the CPU path
    assert read_jpeg_header(encode(image.convert("CMYK"), "JPEG"), CONFIG) is None
    assert read_jpeg_header(b"\xff\xd8\xff garbage", CONFIG) is None  # the CPU path reports it
    with pytest.raises(ImageError) as info:
        read_jpeg_header(encode(image, "JPEG"), DecodeConfig(max_pixels=799))
    assert info.value.code == "image_too_large"


def test_torchvision_decode_with_orientation_matches_the_pil_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.io import ImageReadMode, decode_jpeg

    image = Image.fromarray(np.asarray(Image.effect_noise((64, 48), 60).convert("RGB")))
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    header = read_jpeg_header(data, CONFIG)
    on_device = apply_orientation(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                              mode=ImageReadMode.RGB), header.orientation)
    monkeypatch.setattr(imaging, "_JPEG_DECODER", [None])  # Pillow's route
    reference = decode_image(data, CONFIG).pixels
    assert on_device.shape == reference.shape == (3, 64, 48)
    # Two JPEG decoders (libjpeg-turbo in both, maybe other IDCTs): within a few levels.
    assert (on_device.int() - reference.int()).abs().max() <= 3


# --- JPEGs on the CPU: libjpeg-turbo straight into a tensor, Pillow for the rest -------------------


def _pillow_decode(data: bytes, monkeypatch: pytest.MonkeyPatch) -> DecodedImage:
    with monkeypatch.context() as patch:
        patch.setattr(imaging, "_JPEG_DECODER", [None])  # as where torchvision has no JPEG decoder
        return decode_image(data, CONFIG)


def _photo(size: int) -> Image.Image:
    from skimage import data as skdata

    image = Image.fromarray(skdata.astronaut())
    image.thumbnail((size, size))
    return image


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("kind", ["photo 64 px", "noise 4:4:4", "grey", "progressive 300 px"])
def test_the_direct_jpeg_route_gives_pillows_pixels(kind: str, orientation: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    params: dict[str, object] = {"quality": 90, "exif": exif.tobytes()}
    if kind == "photo 64 px":
        image = _photo(64)
    elif kind == "noise 4:4:4":
        image, params["subsampling"] = Image.effect_noise((37, 21), 70).convert("RGB"), 0
    elif kind == "grey":
        image = Image.effect_noise((30, 17), 50)  # mode L: one channel, three in the result
    else:
        image, params["progressive"] = _photo(300), True
    data = encode(image, "JPEG", **params)
    assert imaging._decode_jpeg_direct(data, CONFIG, None) is not None, "the direct route took this JPEG"

    direct, pillow = decode_image(data, CONFIG), _pillow_decode(data, monkeypatch)
    assert (direct.width, direct.height, direct.format, direct.sha256) == \
        (pillow.width, pillow.height, "jpeg", hashlib.sha256(data).hexdigest())
    assert direct.pixels.shape == pillow.pixels.shape
    # libjpeg-turbo in both (its integer IDCT is exact); a level of slack for other builds of it.
    assert (direct.pixels.int() - pillow.pixels.int()).abs().max() <= 1


def test_jpegs_the_direct_route_cannot_take_are_pillows(monkeypatch: pytest.MonkeyPatch) -> None:
    photo = encode(_photo(64), "JPEG", quality=90)
    bogus_marker = bytearray(encode(_photo(256), "JPEG", quality=90))
    bogus_marker[len(bogus_marker) // 2:len(bogus_marker) // 2 + 40] = b"\xff" * 40  # torchvision: "Bogus marker"
    refused = {
        "truncated": photo[: len(photo) // 2],
        "cmyk": encode(_photo(64).convert("CMYK"), "JPEG"),
        "trailing bytes": photo + b"trailing junk",
        "corrupt": bytes(bogus_marker),
    }
    for name, data in refused.items():
        assert imaging._decode_jpeg_direct(data, CONFIG, None) is None, name
        try:
            expected: object = _pillow_decode(data, monkeypatch).pixels
        except ImageError as exc:
            expected = (exc.code, str(exc))
        try:
            got: object = decode_image(data, CONFIG).pixels
        except ImageError as exc:
            got = (exc.code, str(exc))
        if isinstance(expected, torch.Tensor):
            assert isinstance(got, torch.Tensor) and torch.equal(got, expected), name
        else:
            assert got == expected, name
    with pytest.raises(ImageError) as info:  # the pixel limit holds before either decoder runs
        decode_image(photo, DecodeConfig(max_pixels=63 * 64))
    assert info.value.code == "image_too_large"
