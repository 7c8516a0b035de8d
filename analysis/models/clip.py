"""CLIP ViT-B/32 image embeddings (open_clip, the real OpenAI weights)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import open_clip
import PIL.Image
import torch

from imgstream.analysis.models.base import TensorModel, half_precision, seeded
from imgstream.analysis.preprocess import BICUBIC, BILINEAR, ImageTransform
from imgstream.schemas.config import ModelsConfig
from imgstream.schemas.events import ModelInfo

# The OpenAI weights were trained with QuickGELU; plain "ViT-B-32" would run them with GELU.
ARCHITECTURE = "ViT-B-32-quickgelu"
EMBEDDING_DIM = 512


def transform_of(model: torch.nn.Module) -> ImageTransform:
    """open_clip's eval preprocessing (shorter side to 224, centre crop, mean/std) as tensor ops."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    if cfg.get("resize_mode", "shortest") != "shortest":
        raise ValueError(f"open_clip resize_mode {cfg['resize_mode']!r} is not supported")
    height, width = cfg["size"]
    return ImageTransform(
        shorter_side=min(height, width), crop_size=(height, width),
        interpolation=BICUBIC if cfg.get("interpolation", "bicubic") == "bicubic" else BILINEAR,
        mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
    )


class ClipModel(TensorModel):
    """open_clip `ViT-B-32-quickgelu`; outputs unnormalised 512-d image embeddings."""

    key = "clip"

    def __init__(self, config: ModelsConfig, device: torch.device, *, half: bool | None = None) -> None:
        """`half` overrides the fp16 rule (CUDA and models.fp16), e.g. to test fp16 on a CPU."""
        half = half_precision(config, device) if half is None else half
        # open_clip's "fp16" keeps LayerNorm in fp32 (LayerNormFp32), which is what makes it safe.
        precision = "fp16" if half else "fp32"
        if config.weights == "random":
            with seeded(config.seed):
                model, _, transform = open_clip.create_model_and_transforms(
                    ARCHITECTURE, pretrained=None, precision=precision, device="cpu"
                )
            weights = "random"
        else:
            # A local checkpoint file or the "openai" tag, which open_clip downloads once and caches.
            weights = config.clip_weights_path or "openai"
            model, _, transform = open_clip.create_model_and_transforms(
                ARCHITECTURE, pretrained=weights, precision=precision, device="cpu"
            )
        self.device = device
        self.dtype = torch.float16 if half else torch.float32
        self.info = ModelInfo(name=ARCHITECTURE, weights=weights, dim=EMBEDDING_DIM)
        self._model = model.to(device).eval()
        # open_clip's own PIL pipeline: the reference the tensor transform is tested against.
        self._transform: Callable[[PIL.Image.Image], torch.Tensor] = transform
        self.transform = transform_of(model)

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        """uint8 images of any size to one normalised Nx3x224x224 batch on the device."""
        return self.transform.batch(items, self.device, self.dtype)

    def forward(self, batch: torch.Tensor) -> list[np.ndarray]:
        """Embed a batch; one float32 (512,) array each."""
        with torch.inference_mode():
            embeddings = self._model.encode_image(batch).float().cpu().numpy()
        return list(embeddings)
