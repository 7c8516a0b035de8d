"""Image bytes -> a safe, upright RGB picture, plus crop and PNG helpers (SPEC §5).

No network and no Kafka here: `consumer.fetch` gets the bytes, this module judges them.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Final, Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from imgstream.analysis import jpeg_header
from imgstream.analysis.jpeg_header import JpegHeader
from imgstream.schemas.config import DecodeConfig

ImageErrorCode = Literal["image_fetch_failed", "image_too_large", "image_undecodable"]

FETCH_FAILED: Final = "image_fetch_failed"
TOO_LARGE: Final = "image_too_large"
UNDECODABLE: Final = "image_undecodable"

# Our format name -> the one Pillow plugin allowed to open it. Restricting Pillow to the
# sniffed plugin keeps it from trying every decoder it has (EPS would run Ghostscript).
_PIL_FORMATS: Final[dict[str, str]] = {
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "gif": "GIF",
    "bmp": "BMP",
    "tiff": "TIFF",
}

# BITMAPINFOHEADER and its variants: "BM" alone is too weak a signature (text can start with it).
_BMP_DIB_HEADER_SIZES: Final = frozenset({12, 16, 40, 52, 56, 64, 108, 124})

_HTML_MARKERS: Final = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<svg")

_ALPHA_MODES: Final = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class ImageError(Exception):
    """An image that could not be fetched or decoded; `code` is SPEC §3's error_code."""

    def __init__(self, code: ImageErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ImageErrorCode = code
        self.message = message

    def __repr__(self) -> str:
        return f"ImageError({self.code!r}, {self.message!r})"


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image as a uint8 3xHxW tensor (on the CPU or a GPU), and what we know of its bytes."""

    pixels: torch.Tensor
    width: int
    height: int
    sha256: str | None
    format: str | None

    @classmethod
    def from_pil(cls, image: Image.Image, sha256: str | None = None, format: str | None = None) -> DecodedImage:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return cls(pixels_of(rgb), rgb.width, rgb.height, sha256, format)

    @property
    def image(self) -> Image.Image:
        """The image as a PIL image (a copy on the CPU)."""
        return to_pil(self.pixels)

    @property
    def nbytes(self) -> int:
        return self.width * self.height * 3


def pixels_of(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 3xHxW tensor (a view of one HxWx3 copy of its pixels)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """A uint8 3xHxW tensor as an RGB PIL image."""
    return Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy()), "RGB")


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading magic bytes, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(data) >= 18 and data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in _BMP_DIB_HEADER_SIZES:
        return "bmp"
    return None


def _describe_unknown(data: bytes) -> str:
    """Why bytes without a known signature are not an image, for people."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if any(marker in head for marker in _HTML_MARKERS):
        return "content is HTML/XML, not an image (JPEG, PNG, WebP, GIF, BMP or TIFF)"
    try:
        data[:256].decode("utf-8")
    except UnicodeDecodeError:
        return f"unrecognised image format (first bytes {data[:8].hex(' ')})"
    return "content is text, not an image (JPEG, PNG, WebP, GIF, BMP or TIFF)"


def decode_image(data: bytes, config: DecodeConfig, sha256: str | None = None) -> DecodedImage:
    """Decode `data` into an upright RGB image, refusing bombs, truncation and non-images.

    `sha256` is the bytes' digest when the caller has it already."""
    if not data:
        raise ImageError(UNDECODABLE, "image is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(UNDECODABLE, _describe_unknown(data))
    if fmt == "jpeg":
        decoded = _decode_jpeg_direct(data, config, sha256)
        if decoded is not None:
            return decoded
    image = _open_checked(data, fmt, config.max_pixels)
    try:
        # The pixels are copied out before the close: `rgb` may be `image` itself.
        return DecodedImage.from_pil(_decode_pixels(image, fmt), sha256 or hashlib.sha256(data).hexdigest(), fmt)
    finally:
        image.close()


def read_jpeg_header(data: bytes, config: DecodeConfig) -> JpegHeader | None:
    """The header of a JPEG a GPU decoder can take (8-bit RGB or greyscale), or None for anything else.

    The pixel limit applies here, before any pixel is decoded; other formats, CMYK, broken
    headers and files without their end marker return None and take the CPU path, which
    reports their errors.
    """
    if sniff_format(data) != "jpeg":
        return None
    if data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        # No end-of-image marker: truncated, or trailing bytes after it. nvJPEG may decode a cut
        # file without complaint; Pillow refuses a truncated one and reads past trailing bytes.
        return None
    limit = config.max_pixels if Image.MAX_IMAGE_PIXELS is None else min(config.max_pixels, Image.MAX_IMAGE_PIXELS)
    header = jpeg_header.scan(data, limit)  # the common well-formed file, without Pillow's parse
    return header if header is not None else pillow_jpeg_header(data, config)


def pillow_jpeg_header(data: bytes, config: DecodeConfig) -> JpegHeader | None:
    """`read_jpeg_header` by Pillow's parser: the answer for every file `jpeg_header.scan` leaves to it."""
    try:
        image = _open_checked(data, "jpeg", config.max_pixels)
    except ImageError as exc:
        if exc.code == TOO_LARGE:
            raise
        return None
    with image:
        if image.mode not in ("RGB", "L"):
            return None
        try:
            orientation = int(image.getexif().get(0x0112, 1))
        except (SyntaxError, ValueError, TypeError, KeyError, IndexError, OSError):
            orientation = 1  # broken EXIF says nothing about the pixels, as on the CPU path
        return JpegHeader(image.width, image.height, orientation if 1 <= orientation <= 8 else 1, image.mode)


def _decode_jpeg_direct(data: bytes, config: DecodeConfig, sha256: str | None) -> DecodedImage | None:
    """A whole 8-bit RGB or greyscale JPEG decoded by libjpeg-turbo straight into a tensor (torchvision's
    decoder, the one the GPU path falls back to), then turned upright: the same pixels as Pillow's route
    in two thirds of its time for a thumbnail (Pillow parses the markers and hands the pixels over in
    Python). None where Pillow's route must decide (anything `read_jpeg_header` refuses, a decoder
    error, no torchvision decoder): it words the errors. Raises ImageError (too large)."""
    decode = jpeg_decoder()
    if decode is None:
        return None
    header = read_jpeg_header(data, config)
    if header is None:
        return None
    try:
        pixels = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except RuntimeError:
        return None
    pixels = apply_orientation(pixels, header.orientation)
    _, height, width = pixels.shape
    return DecodedImage(pixels, width, height, sha256 or hashlib.sha256(data).hexdigest(), "jpeg")


_JPEG_DECODER: list[Callable[[torch.Tensor], torch.Tensor] | None] = []  # [decode], or [None]: none here


def jpeg_decoder() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision's CPU JPEG decoder to RGB, or None; imported once (a second or two of CPU where
    torchvision is not loaded yet: the engine asks while it starts, not at its first JPEG)."""
    if not _JPEG_DECODER:
        try:
            import warnings

            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:
            _JPEG_DECODER.append(None)
        else:
            try:
                # The op under decode_jpeg's wrapper: the wrapper's checks (a CPU tensor, a mode) hold here,
                # and its bookkeeping (usage logging, a deprecation warning) took a quarter of a thumbnail's decode.
                op, rgb = torch.ops.image.decode_jpeg.default, int(ImageReadMode.RGB.value)
                _JPEG_DECODER.append(lambda encoded: op(encoded, rgb, False))
            except (AttributeError, RuntimeError):
                # torchvision 0.29 deprecates its image codecs (for TorchCodec) with a warning on every call.
                warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                                        DeprecationWarning)
                _JPEG_DECODER.append(partial(decode_jpeg, mode=ImageReadMode.RGB))
    return _JPEG_DECODER[0]


def apply_orientation(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """A 3xHxW tensor turned upright for EXIF `orientation`, as PIL's exif_transpose does."""
    if orientation in (2, 4):  # mirrored left-right / top-bottom
        return pixels.flip(2 if orientation == 2 else 1)
    if orientation == 3:
        return pixels.flip(1, 2)
    if orientation == 5:  # transpose
        return pixels.transpose(1, 2)
    if orientation == 6:  # rotate 90 degrees clockwise to display
        return pixels.transpose(1, 2).flip(2)
    if orientation == 7:  # transverse
        return pixels.transpose(1, 2).flip(1, 2)
    if orientation == 8:  # rotate 90 degrees counter-clockwise to display
        return pixels.transpose(1, 2).flip(1)
    return pixels


def _open_checked(data: bytes, fmt: str, max_pixels: int) -> Image.Image:
    """Open (header only) with the sniffed plugin and enforce the pixel limit before any decoding."""
    try:
        image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (global MAX_IMAGE_PIXELS) may fire first for huge headers.
        raise ImageError(TOO_LARGE, f"{fmt} image is too large: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(UNDECODABLE, f"{fmt} image header could not be read: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise ImageError(UNDECODABLE, f"{fmt} image has an empty size {width}x{height}")
    if width * height > max_pixels:
        image.close()
        raise ImageError(
            TOO_LARGE, f"{fmt} image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
    return image


def _decode_pixels(image: Image.Image, fmt: str) -> Image.Image:
    """Decode the (first frame's) pixels into an upright RGB image (`image` itself when it is one already)."""
    try:
        image.load()
        # exif_transpose always returns a new image, so closing `image` afterwards is safe.
        return _to_rgb(_exif_upright(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(TOO_LARGE, f"{fmt} image is too large to decode: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        # Pillow reports truncated and corrupt data as OSError (e.g. "image file is truncated"),
        # SyntaxError or ValueError; LOAD_TRUNCATED_IMAGES stays off so truncation is an error.
        raise ImageError(UNDECODABLE, f"{fmt} image could not be decoded: {exc}") from exc


_EXIF_ORIENTATION: Final = 0x0112
_TURNED: Final = (2, 3, 4, 5, 6, 7, 8)  # orientations exif_transpose acts on


def _exif_upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; unreadable EXIF leaves the image as stored.

    An image already upright (most of them) is returned as is, not copied as exif_transpose does.
    """
    try:
        # exif_transpose's own first steps: an image it would copy unchanged is left alone.
        if image.getexif().get(_EXIF_ORIENTATION, 1) not in _TURNED:
            return image
        return ImageOps.exif_transpose(image)
    except (SyntaxError, ValueError, TypeError, KeyError, IndexError, OSError):
        # Broken EXIF is common in the wild and says nothing about the pixels.
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB of any mode: alpha composited onto white, high bit depths scaled, not clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _wide_gray_to_rgb(image)
    return image.convert("RGB")


def _wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit or float grayscale to RGB; Pillow's own convert clips at 255."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def clamp_box(box: Sequence[float], width: int, height: int) -> list[int] | None:
    """[xmin, ymin, xmax, ymax] rounded to ints and clamped to the image; None if empty or NaN."""
    if len(box) != 4:
        raise ValueError(f"a box has 4 values [xmin, ymin, xmax, ymax], got {len(box)}")
    values = [float(v) for v in box]
    if any(math.isnan(v) for v in values):
        return None
    limits = (width, height, width, height)
    # Clamp before rounding so infinities are safe; floor(x + 0.5) rounds halves up consistently.
    xmin, ymin, xmax, ymax = (math.floor(min(max(v, 0.0), lim) + 0.5) for v, lim in zip(values, limits))
    if xmax <= xmin or ymax <= ymin:
        return None
    return [xmin, ymin, xmax, ymax]


def crop(pixels: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
    """The region [xmin, ymin, xmax, ymax] of a 3xHxW tensor (a box from `clamp_box`), as is: a view."""
    xmin, ymin, xmax, ymax = (int(v) for v in box)
    return pixels[:, ymin:ymax, xmin:xmax]


def png_bytes(pixels: torch.Tensor) -> bytes:
    """A uint8 3xHxW tensor encoded as PNG."""
    buffer = io.BytesIO()
    to_pil(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(pixels: torch.Tensor) -> str:
    """A uint8 3xHxW tensor as a PNG in plain base64 (no `data:` prefix), as results carry crops."""
    return base64.b64encode(png_bytes(pixels)).decode("ascii")
