"""Face detection: facenet-pytorch MTCNN with the weights that ship inside the package."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import PIL.Image
import torch
from facenet_pytorch import MTCNN

from analysis.models.base import Detection, clamp_box, sorted_detections
from schemas.config import ModelsConfig
from schemas.events import ModelInfo


class FaceDetector:
    """MTCNN (keep_all); outputs every face found, sorted by probability, in input pixels."""

    key = "face"

    def __init__(self, config: ModelsConfig, device: torch.device) -> None:
        # MTCNN's weights ship inside facenet-pytorch, so models.weights=random does not apply.
        # It stays fp32: its thresholds (0.6, 0.7, 0.7) were tuned on fp32 probabilities.
        self.device = device
        self.info = ModelInfo(name="MTCNN", weights="facenet-pytorch-bundled")
        self._mtcnn = MTCNN(keep_all=True, device=device).eval()

    def preprocess(self, image: PIL.Image.Image) -> np.ndarray:
        """RGB image to an HxWx3 uint8 array, the layout MTCNN batches."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.uint8)

    def run_batch(self, items: list[np.ndarray]) -> list[list[Detection]]:
        """Detect faces; MTCNN batches only equal sizes, so one call per distinct size."""
        results: list[list[Detection]] = [[] for _ in items]
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, pixels in enumerate(items):
            # MTCNN's scale pyramid is empty (and it raises) below its minimum face size.
            if min(pixels.shape[:2]) >= self._mtcnn.min_face_size:
                by_shape[pixels.shape].append(index)
        with torch.inference_mode():
            for indices in by_shape.values():
                boxes, probs = self._mtcnn.detect(np.stack([items[i] for i in indices]))
                for index, image_boxes, image_probs in zip(indices, boxes, probs):
                    results[index] = _faces(image_boxes, image_probs, items[index])
        return results


def _faces(boxes: np.ndarray | None, probs: np.ndarray, pixels: np.ndarray) -> list[Detection]:
    """One image's MTCNN output as detections; with numpy 2 both arrive as object arrays."""
    if boxes is None:
        return []
    height, width = pixels.shape[:2]
    return sorted_detections(
        [
            Detection(score=float(prob), box=clamp_box([float(v) for v in box], width, height))
            for box, prob in zip(boxes, probs)
        ]
    )
