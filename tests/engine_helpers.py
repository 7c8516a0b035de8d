"""Shared helpers for engine tests: real photos and request builders."""

from __future__ import annotations

import itertools
from typing import Any

from PIL import Image

from schemas.events import AnalysisRequest

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
