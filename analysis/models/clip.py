"""CLIP ViT-B/32 image embeddings (open_clip, the real OpenAI weights)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import open_clip
import PIL.Image
import torch

from analysis.models.base import half_precision, seeded
from schemas.config import ModelsConfig
from schemas.events import ModelInfo

# The OpenAI weights were trained with QuickGELU; plain "ViT-B-32" would run them with GELU.
ARCHITECTURE = "ViT-B-32-quickgelu"
EMBEDDING_DIM = 512


class ClipModel:
    """open_clip `ViT-B-32-quickgelu`; outputs unnormalised 512-d image embeddings."""

    key = "clip"

    def __init__(self, config: ModelsConfig, device: torch.device) -> None:
        half = half_precision(config, device)
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
        self._transform: Callable[[PIL.Image.Image], torch.Tensor] = transform

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        """The eval transform: shortest side to 224 (bicubic), centre crop, OpenAI mean/std."""
        return self._transform(image)

    def run_batch(self, items: list[torch.Tensor]) -> list[np.ndarray]:
        """Embed a batch of 3x224x224 tensors; one float32 (512,) array each."""
        with torch.inference_mode():
            pixels = torch.stack(items).to(self.device, dtype=self.dtype, non_blocking=True)
            embeddings = self._model.encode_image(pixels).float().cpu().numpy()
        return list(embeddings)
