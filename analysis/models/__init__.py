"""Model loaders of the task engine: pick a device, load a model by key."""

from __future__ import annotations

from importlib import import_module
from typing import Callable

import torch

from analysis.models.base import Detection, Model
from schemas.config import ModelsConfig

__all__ = ["MODEL_KEYS", "Detection", "Model", "load_model", "select_device"]

_DEVICE_CHOICES = "use auto, cpu, cuda or cuda:N"


def select_device(config: ModelsConfig) -> torch.device:
    """The device named by `models.device` (auto, cpu, cuda, cuda:N), checked against this machine."""
    requested = config.device.strip().lower()
    cuda_available = torch.cuda.is_available()
    if requested == "auto":
        device = torch.device("cuda" if cuda_available else "cpu")
    else:
        try:
            device = torch.device(requested)
        except RuntimeError as exc:
            raise RuntimeError(f"models.device={config.device!r} is not a device: {_DEVICE_CHOICES}") from exc
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"models.device={config.device!r} is not supported: {_DEVICE_CHOICES}")
        if device.type == "cuda" and not cuda_available:
            raise RuntimeError(
                f"models.device={config.device!r} but CUDA is not available (no GPU, driver, or CUDA build "
                "of torch): use models.device=auto or cpu"
            )
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise RuntimeError(f"models.device={config.device!r} but this machine has {count} CUDA device(s)")
    if config.require_gpu and device.type != "cuda":
        reason = "CUDA is not available" if not cuda_available else f"models.device={config.device!r}"
        raise RuntimeError(f"models.require_gpu is set but the models would run on the CPU ({reason})")
    return device


# Each module pulls in its own heavy library (open_clip, transformers, facenet-pytorch), so a
# process imports only the ones it loads.
_LOADERS = {
    "clip": ("analysis.models.clip", "ClipModel"),
    "dino": ("analysis.models.dino", "DinoModel"),
    "person": ("analysis.models.person", "PersonDetector"),
    "face": ("analysis.models.face", "FaceDetector"),
    "caption": ("analysis.models.caption", "Captioner"),
}
MODEL_KEYS = tuple(_LOADERS)


def load_model(key: str, config: ModelsConfig, device: torch.device) -> Model:
    """Build the model named `key` with the weights `config` asks for, on `device`."""
    if key not in _LOADERS:
        raise ValueError(f"Unknown model {key!r}; known models: {', '.join(MODEL_KEYS)}")
    module_name, class_name = _LOADERS[key]
    loader: Callable[[ModelsConfig, torch.device], Model] = getattr(import_module(module_name), class_name)
    return loader(config, device)
