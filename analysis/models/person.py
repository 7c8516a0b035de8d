"""Person detection: torchvision Faster R-CNN ResNet50-FPN, COCO label 1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.models.detection import FasterRCNN, FasterRCNN_ResNet50_FPN_Weights, fasterrcnn_resnet50_fpn

from imgstream.analysis.models.base import Detection, TensorModel, channels_last, clamp_box, seeded, sorted_detections
from imgstream.analysis.preprocess import BILINEAR, resize_to, to_device
from imgstream.schemas.config import ModelsConfig
from imgstream.schemas.events import ModelInfo

ARCHITECTURE = "fasterrcnn_resnet50_fpn"
COCO_PERSON = 1
# Keep nearly everything: the engine filters by each request's min_score, and one detection
# pass is shared by tasks with different thresholds.
BOX_SCORE_THRESH = 0.001


@dataclass(frozen=True)
class DetectorInput:
    """An image as the detector's input tensor, plus what maps its boxes back to the original."""

    pixels: torch.Tensor  # float CxHxW in [0, 1] on the model's device, possibly downscaled
    width: int  # of the original image
    height: int


class PersonDetector(TensorModel):
    """Faster R-CNN (COCO); outputs person detections sorted by score, in input pixels."""

    key = "person"

    def __init__(self, config: ModelsConfig, device: torch.device) -> None:
        if config.weights == "random":
            with seeded(config.seed):
                model = _untrained()
            weights = "random"
        elif config.person_weights_path:
            model = _untrained()
            state = torch.load(config.person_weights_path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            weights = config.person_weights_path
        else:
            model = fasterrcnn_resnet50_fpn(
                weights=FasterRCNN_ResNet50_FPN_Weights.COCO_V1, box_score_thresh=BOX_SCORE_THRESH
            )
            weights = "COCO_V1"
        # Detectors stay fp32: fp16 shifts scores and box regressions near the thresholds.
        self.device = device
        self.info = ModelInfo(name=ARCHITECTURE, weights=weights)
        self._model = model.to(device).eval()
        # The ResNet-50 + FPN backbone channels-last: the same scores, 12% faster on a 2-core CPU
        # (2.07 -> 1.83 s for a 1024 px photo), and cuDNN's fast layout on a GPU.
        channels_last(self._model.backbone)
        # In eval mode torchvision resizes to the last of its min sizes.
        self._min_size = model.transform.min_size[-1]
        self._max_size = model.transform.max_size

    def shrink(self, pixels: torch.Tensor) -> DetectorInput:
        """A uint8 image as a [0, 1] tensor on the device, shrunk to the size the model would resize to.

        The same scale rule as torchvision's GeneralizedRCNNTransform; shrinking here (antialiased,
        as PIL does) saves memory and transfer for large photos, and the model's own resize is
        then a no-op.
        """
        _, height, width = pixels.shape
        pixels = to_device(pixels, self.device)
        scale = min(self._min_size / min(width, height), self._max_size / max(width, height))
        if scale < 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            pixels = resize_to(pixels, *size, interpolation=BILINEAR)
        # A new tensor either way (a uint8 image is copied by the cast), so dividing in place is safe.
        return DetectorInput(pixels=pixels.to(torch.float32).div_(255.0), width=width, height=height)

    def collate(self, items: list[torch.Tensor]) -> list[DetectorInput]:
        return [self.shrink(pixels) for pixels in items]

    def forward(self, batch: list[DetectorInput]) -> list[list[Detection]]:
        """Detect people in a batch of images (sizes may differ)."""
        with torch.inference_mode():
            if self.device.type == "cuda":
                outputs = self._model([item.pixels for item in batch])
            else:  # on the CPU a padded batch is slower than one image at a time (docs/BENCHMARKS.md)
                outputs = [self._model([item.pixels])[0] for item in batch]
        return [person_detections(output, item) for output, item in zip(outputs, batch)]


def _untrained() -> FasterRCNN:
    """The architecture without any weights (no backbone download either)."""
    return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, box_score_thresh=BOX_SCORE_THRESH)


def person_detections(output: dict[str, Any], item: DetectorInput) -> list[Detection]:
    """The person boxes of one torchvision detection output, in the original image's pixels."""
    is_person = output["labels"] == COCO_PERSON
    scores = output["scores"][is_person].float().cpu().tolist()
    boxes = output["boxes"][is_person].float().cpu().tolist()
    scale_x = item.width / item.pixels.shape[-1]
    scale_y = item.height / item.pixels.shape[-2]
    detections = [
        Detection(
            score=score,
            box=clamp_box([x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y], item.width, item.height),
        )
        for score, (x0, y0, x1, y1) in zip(scores, boxes)
    ]
    return sorted_detections(detections)
