"""DINOv2 base image embeddings (transformers `Dinov2Model`)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from transformers import AutoImageProcessor, BitImageProcessor, Dinov2Config, Dinov2Model

from imgstream.analysis.models.base import TensorModel, half_precision, seeded
from imgstream.analysis.preprocess import ImageTransform, hf_transform
from imgstream.schemas.config import ModelsConfig
from imgstream.schemas.events import ModelInfo

RANDOM_NAME = "facebook/dinov2-base"


def base_config() -> Dinov2Config:
    """The architecture of facebook/dinov2-base (its config.json)."""
    return Dinov2Config(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        mlp_ratio=4,
        patch_size=14,
        # Position embeddings are stored for 518px and interpolated to the 224px crop.
        image_size=518,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        use_swiglu_ffn=False,
    )


def base_processor() -> BitImageProcessor:
    """facebook/dinov2-base's preprocessor_config.json, built in code so no download is needed."""
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=PIL.Image.Resampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )


class DinoModel(TensorModel):
    """DINOv2 base; outputs the CLS token after the final layer norm (768 floats)."""

    key = "dino"

    def __init__(self, config: ModelsConfig, device: torch.device, *, half: bool | None = None) -> None:
        """`half` overrides the fp16 rule (CUDA and models.fp16), e.g. to test fp16 on a CPU."""
        if config.weights == "random":
            with seeded(config.seed):
                model = Dinov2Model(base_config())
            processor = base_processor()
            name, weights = RANDOM_NAME, "random"
        else:
            # A Hugging Face id (downloaded once into the HF cache) or a local directory.
            model = Dinov2Model.from_pretrained(config.dino_model)
            processor = AutoImageProcessor.from_pretrained(config.dino_model)
            name, weights = config.dino_model, "pretrained"
        self.device = device
        self.dtype = torch.float16 if (half_precision(config, device) if half is None else half) else torch.float32
        self.info = ModelInfo(name=name, weights=weights, dim=model.config.hidden_size)
        self._model = model.to(device=device, dtype=self.dtype).eval()
        self._processor = processor  # the reference the tensor transform is tested against
        self.transform: ImageTransform = hf_transform(processor, name)

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        """The image processor's steps as tensor ops: shorter side 256 (bicubic), centre crop 224, mean/std."""
        return self.transform.batch(items, self.device, self.dtype)

    def forward(self, batch: torch.Tensor) -> list[np.ndarray]:
        """Embed a batch of 3x224x224 tensors; one float32 (768,) array each."""
        with torch.inference_mode():
            # Dinov2Model's pooler_output is last_hidden_state[:, 0] after the final layernorm.
            cls = self._model(pixel_values=batch).pooler_output
            embeddings = cls.float().cpu().numpy()
        return list(embeddings)
