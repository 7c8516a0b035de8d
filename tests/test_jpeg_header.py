"""analysis.jpeg_header against Pillow's parser: wherever the fast path answers, Pillow gives the same header."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data as skdata

from imgstream.analysis.imaging import ImageError, pillow_jpeg_header, read_jpeg_header
from imgstream.analysis.jpeg_header import JpegHeader, scan
from imgstream.schemas.config import DecodeConfig

CONFIG = DecodeConfig()
LIMIT = CONFIG.max_pixels
ORIENTATION = 0x0112


def pillow(data: bytes) -> JpegHeader | None:
    """Pillow's answer; a refusal of any kind (a broken file, one too large) is None."""
    try:
        return pillow_jpeg_header(data, CONFIG)
    except ImageError:
        return None


def jpeg(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **params)
    return buffer.getvalue()


def with_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """`data` with an extra segment right after SOI."""
    return data[:2] + bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def exif(entries: list[tuple[int, int, int, bytes]], *, big_endian: bool = False) -> bytes:
    """An APP1 EXIF payload with one IFD of (tag, type, count, 4-byte value or offset) entries."""
    e = ">" if big_endian else "<"
    ifd = struct.pack(e + "H", len(entries)) + b"".join(
        struct.pack(e + "HHI", tag, kind, count) + value.ljust(4, b"\0") for tag, kind, count, value in entries)
    return b"Exif\0\0" + (b"MM\0*" if big_endian else b"II*\0") + struct.pack(e + "I", 8) + ifd + b"\0\0\0\0"


def short(value: int, big_endian: bool = False) -> bytes:
    return struct.pack(">H" if big_endian else "<H", value)


PHOTO = Image.fromarray(skdata.astronaut()).resize((96, 64))
PLAIN = jpeg(PHOTO)


def real_files() -> dict[str, bytes]:
    """Files the fast path answers: real photos as encoders write them."""
    exif_object = Image.Exif()
    exif_object[ORIENTATION] = 6
    exif_object[0x010F] = "a camera maker, long enough to be stored out of line"
    return {
        "astronaut": jpeg(Image.fromarray(skdata.astronaut())),
        "coffee, progressive": jpeg(Image.fromarray(skdata.coffee()), progressive=True),
        "camera, greyscale": jpeg(Image.fromarray(skdata.camera())),
        "chelsea, 4:4:4 with a comment": jpeg(Image.fromarray(skdata.chelsea()), subsampling=0, comment=b"hello"),
        "with Pillow's EXIF (orientation 6, a maker string)": jpeg(PHOTO, exif=exif_object.tobytes()),
        "with an ICC profile": jpeg(PHOTO, icc_profile=b"\0" * 300),
        "with restart markers": jpeg(PHOTO, restart_marker_blocks=2),
        "with a 16-bit quantisation table": with_segment(PLAIN, 0xDB, bytes([0x12]) + bytes(128)),
        **{f"orientation {o}, {'big' if big else 'little'}-endian": with_segment(
            PLAIN, 0xE1, exif([(0x0100, 3, 1, short(96, big)), (ORIENTATION, 3, 1, short(o, big))], big_endian=big))
           for o in range(0, 10) for big in (False, True)},
        "orientation as a LONG": with_segment(PLAIN, 0xE1, exif([(ORIENTATION, 4, 1, struct.pack("<I", 8))])),
        "EXIF without an orientation": with_segment(PLAIN, 0xE1, exif([(0x0100, 3, 1, short(96))])),
        "an Adobe segment": with_segment(PLAIN, 0xEE, b"Adobe\0\x64\0\0\0\0\x01"),
        "an unknown APP segment": with_segment(PLAIN, 0xE9, b"whatever"),
    }


@pytest.mark.parametrize("name", list(real_files()))
def test_the_fast_path_answers_common_files_as_pillow_does(name):
    data = real_files()[name]
    header = scan(data, LIMIT)
    assert header is not None, f"{name}: left to Pillow"
    assert header == pillow(data)
    assert read_jpeg_header(data, CONFIG) == header


def test_orientations_are_read_from_the_exif():
    for orientation in range(1, 9):
        data = with_segment(PLAIN, 0xE1, exif([(ORIENTATION, 3, 1, short(orientation))]))
        assert scan(data, LIMIT) == JpegHeader(96, 64, orientation, "RGB")


LEFT_TO_PILLOW = {
    "CMYK": jpeg(PHOTO.convert("CMYK")),
    "XMP, which may hold the orientation": with_segment(
        PLAIN, 0xE1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta tiff:Orientation=\"6\"/>"),
    "two EXIF segments": with_segment(with_segment(PLAIN, 0xE1, exif([])), 0xE1, exif([(ORIENTATION, 3, 1, short(3))])),
    "an orientation of two values": with_segment(PLAIN, 0xE1, exif([(ORIENTATION, 3, 2, short(6) + short(1))])),
    "an orientation of an odd type": with_segment(PLAIN, 0xE1, exif([(ORIENTATION, 7, 1, b"\x06")])),
    "a value past the EXIF's end before the orientation": with_segment(
        PLAIN, 0xE1, exif([(0x010F, 2, 40, struct.pack("<I", 4000)), (ORIENTATION, 3, 1, short(6))])),
    "a cut EXIF directory": with_segment(PLAIN, 0xE1, exif([(ORIENTATION, 3, 1, short(6))])[:-10]),
    "a BigTIFF header": with_segment(PLAIN, 0xE1, b"Exif\0\0II+\0" + bytes(16)),
    "a short JFIF segment": with_segment(PLAIN[:2] + PLAIN[20:], 0xE0, b"JFIF\0"),
    "a short ICC segment": with_segment(PLAIN, 0xE2, b"ICC_PROFILE\0\x01"),
    "an MPO index": with_segment(PLAIN, 0xE2, b"MPF\0" + bytes(16)),
    "a Photoshop segment": with_segment(PLAIN, 0xED, b"Photoshop 3.0\0" + b"8BIM"),
    "a cut quantisation table": with_segment(PLAIN, 0xDB, bytes([0x01]) + bytes(30)),
    "junk between segments": PLAIN[:2] + b"\x00\x00" + PLAIN[2:],
    "a segment running past the end": PLAIN[:2] + b"\xff\xe0\xff\xff" + bytes(10),
    "not a JPEG": b"\x89PNG\r\n\x1a\n" + bytes(40),
}


@pytest.mark.parametrize("name", list(LEFT_TO_PILLOW))
def test_anything_unusual_is_left_to_pillow(name):
    data = LEFT_TO_PILLOW[name]
    assert scan(data, LIMIT) is None
    if data.startswith(b"\xff\xd8\xff"):
        assert read_jpeg_header(data, CONFIG) == pillow(data)  # the answer is Pillow's, whatever it is


def test_pillow_reads_the_orientation_the_fast_path_leaves_to_it():
    """The cases left over are not thrown away: Pillow still turns the image (XMP here)."""
    data = LEFT_TO_PILLOW["XMP, which may hold the orientation"]
    assert read_jpeg_header(data, CONFIG) == JpegHeader(96, 64, 6, "RGB")


def test_the_pixel_limit_is_pillows_to_word():
    assert scan(PLAIN, 96 * 64 - 1) is None
    with pytest.raises(ImageError, match="over the limit"):
        read_jpeg_header(PLAIN, DecodeConfig(max_pixels=96 * 64 - 1))
    empty = PLAIN.replace(b"\xff\xc0\x00\x11\x08\x00\x40\x00\x60", b"\xff\xc0\x00\x11\x08\x00\x00\x00\x60")
    assert empty != PLAIN and scan(empty, LIMIT) is None


SEEDS = [PLAIN, *list(real_files().values())[4:9], LEFT_TO_PILLOW["XMP, which may hold the orientation"]]


def header_end(data: bytes) -> int:
    return data.find(b"\xff\xda") + 16


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
)


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_headers_get_pillows_answer_or_none(seed, mutations):
    data = bytearray(seed)
    for kind, at, value in mutations:
        at %= header_end(bytes(data)) if b"\xff\xda" in data else len(data)
        if kind == "flip":
            data[at] = value
        elif kind == "cut":
            data = data[:at] + b"\xff\xd9"
        else:
            data.insert(at, value)
    data = bytes(data)
    fast = scan(data, LIMIT)
    assert fast is None or fast == pillow(data), (fast, pillow(data))
