"""Model loaders of the task engine: pick a device, load a model by key."""

from __future__ import annotations

from importlib import import_module
from typing import Callable

import torch

from imgstream.analysis.models.base import Detection, Model
from imgstream.schemas.config import ModelsConfig

__all__ = ["MODEL_KEYS", "Detection", "Model", "load_model", "select_device", "select_devices"]

_DEVICE_CHOICES = "use auto, cpu, cuda, cuda:N or a list of cuda:N"


def select_devices(config: ModelsConfig) -> list[torch.device]:
    """The devices named by `models.device`, checked against this machine.

    auto: every GPU when there are any, else the CPU; cpu; cuda: every visible GPU; cuda:N; or a
    comma-separated list of cuda:N.
    """
    requested = config.device.strip().lower()
    cuda_available = torch.cuda.is_available()
    if requested == "auto" or requested == "cuda" and cuda_available:
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if cuda_available \
            else [torch.device("cpu")]
    else:
        devices = [_one_device(name.strip(), config.device, cuda_available) for name in requested.split(",")]
        if len(set(devices)) != len(devices):
            raise RuntimeError(f"models.device={config.device!r} names a device twice")
        if len(devices) > 1 and any(d.type != "cuda" for d in devices):
            raise RuntimeError(f"models.device={config.device!r}: a list may only name GPUs (cuda:N)")
    if config.require_gpu and devices[0].type != "cuda":
        reason = "CUDA is not available" if not cuda_available else f"models.device={config.device!r}"
        raise RuntimeError(f"models.require_gpu is set but the models would run on the CPU ({reason})")
    return devices


def select_device(config: ModelsConfig) -> torch.device:
    """The first device `models.device` names (where single-device code runs)."""
    return select_devices(config)[0]


def _one_device(name: str, setting: str, cuda_available: bool) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RuntimeError(f"models.device={setting!r} is not a device: {_DEVICE_CHOICES}") from exc
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"models.device={setting!r} is not supported: {_DEVICE_CHOICES}")
    if device.type == "cuda" and not cuda_available:
        raise RuntimeError(
            f"models.device={setting!r} but CUDA is not available (no GPU, driver, or CUDA build "
            "of torch): use models.device=auto or cpu"
        )
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= count:
            raise RuntimeError(f"models.device={setting!r} but this machine has {count} CUDA device(s)")
    return device


# Each module pulls in its own heavy library (open_clip, transformers, facenet-pytorch), so a
# process imports only the ones it loads.
_LOADERS = {
    "clip": ("imgstream.analysis.models.clip", "ClipModel"),
    "dino": ("imgstream.analysis.models.dino", "DinoModel"),
    "person": ("imgstream.analysis.models.person", "PersonDetector"),
    "face": ("imgstream.analysis.models.face", "FaceDetector"),
    "caption": ("imgstream.analysis.models.caption", "Captioner"),
}
MODEL_KEYS = tuple(_LOADERS)


def load_model(key: str, config: ModelsConfig, device: torch.device) -> Model:
    """Build the model named `key` with the weights `config` asks for, on `device`."""
    if key not in _LOADERS:
        raise ValueError(f"Unknown model {key!r}; known models: {', '.join(MODEL_KEYS)}")
    module_name, class_name = _LOADERS[key]
    loader: Callable[[ModelsConfig, torch.device], Model] = getattr(import_module(module_name), class_name)
    return loader(config, device)
