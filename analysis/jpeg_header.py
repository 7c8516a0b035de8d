"""A JPEG's size, colour layers and EXIF orientation read from its markers, for the common well-formed file.

Pillow's `Image.open` gives the same answer but parses every segment into Python objects (the
quantisation tables into lists, the EXIF into a directory): on a 64 px thumbnail that was a third of
the decode. `scan` walks the markers up to the first scan and reads only what the answer needs. It is
a fast path, not a second decoder: wherever Pillow might answer differently or refuse the file (a
marker out of place, a segment cut short, a malformed JFIF, Adobe or ICC segment, XMP that may carry the
orientation, an MPO, EXIF that is not one plain IFD, more than one frame header, a size over a
limit), it returns None and the caller asks Pillow. tests/test_jpeg_header.py holds the two to the
same answer on real and mutated files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

_SOF: Final = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended, progressive: what libjpeg and nvJPEG take
_SKIPPED: Final = frozenset({0xC4, 0xDD, 0xFE})  # DHT, DRI, COM: Pillow only skips or keeps them
_SOS: Final = 0xDA
_DQT: Final = 0xDB
_EXIF: Final = b"Exif\0\0"
_ORIENTATION: Final = 0x0112
_SHORT: Final = 3
_LONG: Final = 4
# Bytes per value of each TIFF type Pillow reads (its _load_dispatch); values over 4 bytes lie elsewhere.
_UNIT_BYTES: Final = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's header says, read without decoding its pixels."""

    width: int  # as stored, before the EXIF orientation
    height: int
    orientation: int  # EXIF orientation 1..8 (1: as stored)
    mode: str


def scan(data: bytes, max_pixels: int) -> JpegHeader | None:
    """The header of an 8-bit RGB or greyscale JPEG of at most `max_pixels`, or None where Pillow must decide."""
    size = len(data)
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, frame, exif = 2, None, None
    while True:
        if pos + 4 > size or data[pos] != 0xFF:
            return None
        while data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
            if pos + 4 > size:
                return None
        marker = data[pos + 1]
        start, end = pos + 4, pos + 2 + (data[pos + 2] << 8 | data[pos + 3])
        if end < start or end > size:
            return None
        if marker == _SOS:
            break
        if 0xE0 <= marker <= 0xEF:
            segment = data[start:end]
            if marker == 0xE1 and segment.startswith(_EXIF):
                if exif is not None:
                    return None  # Pillow joins them
                exif = segment[6:]
            elif not _plain_app(marker, segment):
                return None
        elif marker in _SOF:
            if frame is not None or end - start < 6:
                return None
            frame = data[start:end]
        elif marker == _DQT:
            if not _tables_whole(data, start, end):
                return None
        elif marker not in _SKIPPED:
            return None
        pos = end
    if frame is None or frame[0] != 8 or frame[5] not in (1, 3):
        return None
    height, width = frame[1] << 8 | frame[2], frame[3] << 8 | frame[4]
    if width == 0 or height == 0 or width * height > max_pixels:
        return None
    orientation = 1 if exif is None else _orientation(exif)
    if orientation is None:
        return None
    return JpegHeader(width, height, orientation if 1 <= orientation <= 8 else 1, "L" if frame[5] == 1 else "RGB")


def _plain_app(marker: int, segment: bytes) -> bool:
    """An APPn segment Pillow reads without error and without a say in the answer."""
    if marker == 0xE0 and segment.startswith(b"JFIF"):
        return len(segment) >= 7  # the version Pillow reads
    if marker == 0xEE and segment.startswith(b"Adobe"):
        return len(segment) >= 7
    if marker == 0xE1 and segment.startswith(b"http://ns.adobe.com/xap/1.0/\x00"):
        return False  # XMP: Pillow takes the orientation from it when the EXIF has none
    if marker == 0xE2 and segment.startswith(b"ICC_PROFILE\0"):
        return len(segment) >= 14  # Pillow reads the fragment count at byte 13
    if marker == 0xE2 and segment.startswith(b"MPF\0"):
        return False  # a multi-picture file: Pillow opens it as MPO
    return not (marker == 0xED and segment.startswith(b"Photoshop 3.0\x00"))  # resource blocks Pillow parses


def _tables_whole(data: bytes, pos: int, end: int) -> bool:
    """Every quantisation table in the segment is whole, as Pillow checks."""
    while pos < end:
        pos += 1 + (64 if data[pos] < 16 else 128)
        if pos > end:
            return False
    return True


def _orientation(exif: bytes) -> int | None:
    """The orientation tag of IFD0 (1 without one), or None unless the IFD is whole and the tag plain."""
    order = exif[:4]
    if order == b"II*\0":
        little = True
    elif order == b"MM\0*":
        little = False
    else:
        return None
    endian = "little" if little else "big"
    ifd = int.from_bytes(exif[4:8], endian)
    if ifd < 8 or ifd + 2 > len(exif):
        return None
    count = int.from_bytes(exif[ifd:ifd + 2], endian)
    entries = ifd + 2
    if entries + 12 * count > len(exif):
        return None
    for at in range(entries, entries + 12 * count, 12):
        kind, n = int.from_bytes(exif[at + 2:at + 4], endian), int.from_bytes(exif[at + 4:at + 8], endian)
        if int.from_bytes(exif[at:at + 2], endian) == _ORIENTATION:
            if n != 1 or kind not in (_SHORT, _LONG):
                return None
            return int.from_bytes(exif[at + 8:at + (10 if kind == _SHORT else 12)], endian)
        length = n * _UNIT_BYTES.get(kind, 0)
        if length > 4 and int.from_bytes(exif[at + 8:at + 12], endian) + length > len(exif):
            return None  # Pillow stops reading the directory at a value past the end
    return 1
