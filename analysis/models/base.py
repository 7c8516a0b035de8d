"""What every model loader provides, and the small helpers they share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol, runtime_checkable

import PIL.Image
import torch

from imgstream.schemas.config import ModelsConfig
from imgstream.schemas.events import ModelInfo


@runtime_checkable
class Model(Protocol):
    """A loaded model: items are uint8 3xHxW image tensors (or crops, views of them) on any device.

    `collate` preprocesses a whole batch as tensors on the model's device (resize, crop,
    normalise, stack); `forward` is the one model call. They are separate so a device can
    prepare the next batch while it computes the current one.
    """

    key: str
    info: ModelInfo
    device: torch.device

    def collate(self, items: list[Any]) -> Any:
        """A batch of items as the model's input, on its device."""
        ...

    def forward(self, batch: Any) -> list[Any]:
        """Run the model once over a collated batch; one output per item, in order."""
        ...


class TensorModel:
    """What every loader shares: PIL in for convenience, and collate + forward as one call."""

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        """An image as the item this model takes (uint8 3xHxW on the CPU)."""
        from imgstream.analysis.imaging import pixels_of

        return pixels_of(image if image.mode == "RGB" else image.convert("RGB"))

    def run_batch(self, items: list[Any]) -> list[Any]:
        """`forward(collate(items))`: preprocessing and the model call in one go."""
        return self.forward(self.collate(items))  # type: ignore[attr-defined]


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


def channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Run a convolutional network in channels-last layout (weights and input): oneDNN's and
    cuDNN's fast convolution path; the same numbers, in another memory order."""
    module.to(memory_format=torch.channels_last)
    module.register_forward_pre_hook(
        lambda _, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:]))
    return module


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
