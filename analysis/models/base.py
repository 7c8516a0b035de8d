"""What every model loader provides, and the small helpers they share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol, runtime_checkable

import PIL.Image
import torch

from schemas.config import ModelsConfig
from schemas.events import ModelInfo


@runtime_checkable
class Model(Protocol):
    """A loaded model: CPU preprocessing per image, one device call per batch."""

    key: str
    info: ModelInfo
    device: torch.device

    def preprocess(self, image: PIL.Image.Image) -> Any:
        """Turn one RGB image into a model input; CPU only and thread-safe."""
        ...

    def run_batch(self, items: list[Any]) -> list[Any]:
        """Run the model once over preprocessed items; one output per item, in order."""
        ...


class Detection(NamedTuple):
    """One detection: its confidence and `[x0, y0, x1, y1]` in the input image's pixels."""

    score: float
    box: list[float]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block and restore it afterwards.

    Random weights must be identical in every process, whatever was drawn before;
    forking keeps the seeding from leaking into the caller's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def half_precision(config: ModelsConfig, device: torch.device) -> bool:
    """Whether numerically safe models run in fp16: only on CUDA, and only when enabled."""
    return config.fp16 and device.type == "cuda"


def sorted_detections(detections: list[Detection]) -> list[Detection]:
    """Detections by confidence, highest first (the engine takes the first as prominent)."""
    return sorted(detections, key=lambda detection: detection.score, reverse=True)


def clamp_box(box: list[float], width: int, height: int) -> list[float]:
    """Clamp `[x0, y0, x1, y1]` to the image; detectors may reach past its edges."""
    x0, y0, x1, y1 = box
    return [
        min(max(x0, 0.0), float(width)),
        min(max(y0, 0.0), float(height)),
        min(max(x1, 0.0), float(width)),
        min(max(y1, 0.0), float(height)),
    ]
