"""Shared helpers for engine tests: real photos and request builders."""

from __future__ import annotations

import io
import itertools
from typing import Any

import numpy as np
from PIL import Image

from imgstream.schemas.events import AnalysisRequest

_ids = itertools.count()


def photo(name: str = "astronaut") -> Image.Image:
    """A real photo that ships inside scikit-image (astronaut and camera have faces)."""
    from skimage import data

    array = getattr(data, name)()
    image = Image.fromarray(array)
    return image.convert("RGB")


def request(*tasks: tuple[str, str, dict[str, Any]], metadata: dict | None = None) -> AnalysisRequest:
    """An AnalysisRequest with tasks given as (operation_id, type, params)."""
    return AnalysisRequest(
        request_id=f"test-{next(_ids)}",
        image={"url": "https://example.org/photo.png"},
        tasks=[{"operation_id": op, "type": typ, "params": params} for op, typ, params in tasks],
        metadata=metadata,
    )


def by_op(results) -> dict:
    return {r.operation_id: r for r in results}


def cosine(a, b) -> float:
    """Cosine similarity of two vectors: how model outputs are compared (the last bits vary with
    batch composition, thread count and kernel choice, so never with ==)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def jpeg_with_orientation(image: Image.Image, orientation: int = 1, quality: int = 92) -> bytes:
    """`image` as a JPEG whose EXIF says how to turn it upright (1: as stored)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()
