"""Device-side preprocessing: a batch of uint8 images becomes one model input tensor.

The same tensor functions run on the CPU (tests, CPU workers) and on a GPU: each image (or
crop, a view) is moved to the model's device, resized, cropped and normalised there, and the
batch is stacked once. Resizing is antialiased like PIL's, so the result matches each
library's own per-image PIL preprocessing to within rounding (tests pin cosine >= 0.999).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

BICUBIC = InterpolationMode.BICUBIC
BILINEAR = InterpolationMode.BILINEAR

# PIL resample ids (Image.Resampling) as torchvision modes; the HF processors store these.
_PIL_RESAMPLE = {2: BILINEAR, 3: BICUBIC}


def to_device(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`pixels` on `device`; a CPU tensor bound for a GPU goes through pinned memory, without blocking."""
    if pixels.device == device:
        return pixels
    if device.type == "cuda" and pixels.device.type == "cpu":
        return pixels.contiguous().pin_memory().to(device, non_blocking=True)
    return pixels.to(device, non_blocking=True)


def _resizable(pixels: torch.Tensor) -> torch.Tensor:
    # Antialiased resizing of uint8 runs in a fast integer kernel on the CPU only; elsewhere
    # the image is resized as float (not rounded back to 8 bits in between, a little closer
    # to the ideal than PIL).
    return pixels if pixels.device.type == "cpu" else pixels.float()


def resize_shorter_side(pixels: torch.Tensor, size: int, interpolation: InterpolationMode = BICUBIC) -> torch.Tensor:
    """Scale so the shorter side is `size` (the longer one follows, truncated, as torchvision's Resize(int))."""
    return TF.resize(_resizable(pixels), [size], interpolation=interpolation, antialias=True)


def resize_to(pixels: torch.Tensor, height: int, width: int,
              interpolation: InterpolationMode = BICUBIC) -> torch.Tensor:
    return TF.resize(_resizable(pixels), [height, width], interpolation=interpolation, antialias=True)


@dataclass(frozen=True)
class ImageTransform:
    """Resize (shorter side, or exact), optional centre crop, then scale and normalise; per model."""

    shorter_side: int | None = None
    exact_size: tuple[int, int] | None = None  # (height, width)
    crop_size: tuple[int, int] | None = None
    interpolation: InterpolationMode = BICUBIC
    rescale: float = 1 / 255
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @property
    def output_size(self) -> tuple[int, int]:
        size = self.crop_size or self.exact_size
        if size is None:
            raise ValueError("a transform without a crop or an exact size has no fixed output size")
        return size

    def one(self, pixels: torch.Tensor) -> torch.Tensor:
        """One image (uint8 3xHxW, on its target device) to 3xhxw, not yet scaled or normalised."""
        if self.exact_size is not None:
            pixels = resize_to(pixels, *self.exact_size, interpolation=self.interpolation)
        elif self.shorter_side is not None:
            pixels = resize_shorter_side(pixels, self.shorter_side, self.interpolation)
        if self.crop_size is not None:
            pixels = TF.center_crop(pixels, list(self.crop_size))
        return pixels

    def batch(self, images: Sequence[torch.Tensor], device: torch.device,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Images of any sizes (uint8 3xHxW, any device) as one normalised Nx3xhxw batch on `device`."""
        height, width = self.output_size
        out = torch.empty((len(images), 3, height, width), dtype=torch.float32, device=device)
        for i, pixels in enumerate(images):
            out[i] = self.one(to_device(pixels, device))
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        return out.mul_(self.rescale).sub_(mean).div_(std).to(dtype)


def from_hf_processor(processor: object) -> ImageTransform | None:
    """The tensor version of a Hugging Face image processor, or None when it does something else.

    Covers what CLIP-, BLIP- and DINOv2-style processors do: resize (exact, or shorter side),
    optional centre crop, rescale, normalise. Anything more (padding, aspect-preserving
    longest-edge rules, no normalisation) returns None, and the caller keeps the processor.
    """
    get = lambda name, default=None: getattr(processor, name, default)  # noqa: E731
    if get("do_pad") or get("do_reduce_labels") or not get("do_normalize", False):
        return None
    size = _sizes(get("size"))
    exact = shorter = None
    if get("do_resize", True):
        if {"height", "width"} <= set(size) and len(size) == 2:
            exact = (int(size["height"]), int(size["width"]))
        elif set(size) == {"shortest_edge"}:
            shorter = int(size["shortest_edge"])
        else:
            return None
    crop = None
    if get("do_center_crop", False):
        crop_size = _sizes(get("crop_size"))
        if set(crop_size) != {"height", "width"}:
            return None
        crop = (int(crop_size["height"]), int(crop_size["width"]))
    if crop is None and exact is None:
        return None  # output size would vary with the image: batches need one size
    interpolation = _PIL_RESAMPLE.get(int(get("resample", 3)))
    if interpolation is None:
        return None
    mean, std = get("image_mean"), get("image_std")
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return None
    return ImageTransform(
        shorter_side=shorter, exact_size=exact, crop_size=crop, interpolation=interpolation,
        rescale=float(get("rescale_factor", 1 / 255)) if get("do_rescale", True) else 1.0,
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
    )


def _sizes(value: object) -> dict[str, int]:
    """A processor's size setting (a dict, or transformers' SizeDict) as {name: value} of the set ones."""
    if value is None:
        return {}
    items = value.items() if hasattr(value, "items") else vars(value).items()
    return {str(k): int(v) for k, v in items if v is not None}


def hf_transform(processor: object, model_name: str) -> ImageTransform:
    """`from_hf_processor` of the processor (or of its `image_processor`), or a clear error."""
    transform = from_hf_processor(getattr(processor, "image_processor", processor))
    if transform is None:
        raise ValueError(f"the image processor of {model_name} does more than resize, crop and normalise; "
                         "imgstream cannot run it as tensor ops on the device")
    return transform
