"""Face detection: facenet-pytorch MTCNN with the weights that ship inside the package."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from facenet_pytorch import MTCNN

from analysis.models.base import Detection, TensorModel, channels_last, clamp_box, sorted_detections
from analysis.preprocess import pad_batch, to_device
from schemas.config import ModelsConfig
from schemas.events import ModelInfo

# On a GPU, images of different sizes share one MTCNN call when padding them to a common canvas
# costs at most this much extra area (facenet-pytorch itself batches only images of one size).
# On the CPU every image gets its own call: measured on 2 cores, a batch of 4 equal 1024x683
# photos took 5-9x as long per image as one alone (P-Net and the pyramid resampling scale worse
# than linearly with the batch), so a CPU batch is a loop.
MAX_PAD_OVERHEAD = 1.3



@dataclass(frozen=True)
class FaceBatch:
    """A collated batch: how many items it stands for, and its MTCNN calls."""

    count: int
    # Per call: the items' indices, an NxHxWx3 uint8 canvas on the device, each item's (width, height).
    groups: list[tuple[list[int], torch.Tensor, list[tuple[int, int]]]]


def size_groups(sizes: list[tuple[int, int]], max_overhead: float = MAX_PAD_OVERHEAD) -> list[list[int]]:
    """Indices grouped so each group's padded canvas (its largest height x largest width) wastes
    at most `max_overhead` of the area its images cover. `sizes` are (height, width)."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i][0], sizes[i][1]))
    groups: list[list[int]] = []
    for index in order:
        if groups:
            group = groups[-1] + [index]
            canvas = max(sizes[i][0] for i in group) * max(sizes[i][1] for i in group) * len(group)
            if canvas <= max_overhead * sum(sizes[i][0] * sizes[i][1] for i in group):
                groups[-1] = group
                continue
        groups.append([index])
    return groups


class FaceDetector(TensorModel):
    """MTCNN (keep_all); outputs every face found, sorted by probability, in input pixels."""

    key = "face"

    def __init__(self, config: ModelsConfig, device: torch.device) -> None:
        # MTCNN's weights ship inside facenet-pytorch, so models.weights=random does not apply.
        # It stays fp32: its thresholds (0.6, 0.7, 0.7) were tuned on fp32 probabilities.
        self.device = device
        self.info = ModelInfo(name="MTCNN", weights="facenet-pytorch-bundled")
        self._mtcnn = MTCNN(keep_all=True, device=device).eval()
        for net in (self._mtcnn.pnet, self._mtcnn.rnet, self._mtcnn.onet):
            channels_last(net)  # about 2x faster convolutions on the CPU, same outputs

    def collate(self, items: list[torch.Tensor]) -> FaceBatch:
        """Images grouped by size onto shared zero-padded canvases on the device (on a GPU; one each on the CPU)."""
        # MTCNN's scale pyramid is empty (and it raises) below its minimum face size.
        usable = [i for i, pixels in enumerate(items) if min(pixels.shape[1:]) >= self._mtcnn.min_face_size]
        sizes = [tuple(items[i].shape[1:]) for i in usable]
        groups = []
        for members in (size_groups(sizes) if self.device.type == "cuda" else [[m] for m in range(len(usable))]):
            indices = [usable[m] for m in members]
            height = max(items[i].shape[1] for i in indices)
            width = max(items[i].shape[2] for i in indices)
            if len(indices) == 1:  # no canvas needed: the image itself, as a 1xHxWx3 view
                canvas = to_device(items[indices[0]], self.device).permute(1, 2, 0).unsqueeze(0)
            else:
                canvas = pad_batch([items[i] for i in indices], height, width, self.device)
            groups.append((indices, canvas, [(items[i].shape[2], items[i].shape[1]) for i in indices]))
        return FaceBatch(len(items), groups)

    def forward(self, batch: FaceBatch) -> list[list[Detection]]:
        """Detect faces, one MTCNN call per group of sizes."""
        results: list[list[Detection]] = [[] for _ in range(batch.count)]
        with torch.inference_mode():
            for indices, canvas, sizes in batch.groups:
                boxes, probs = self._mtcnn.detect(canvas)
                for index, image_boxes, image_probs, size in zip(indices, boxes, probs, sizes):
                    results[index] = _faces(image_boxes, image_probs, size)
        return results


def _faces(boxes: np.ndarray | None, probs: np.ndarray, size: tuple[int, int]) -> list[Detection]:
    """One image's MTCNN output as detections; with numpy 2 both arrive as object arrays.

    A face whose centre lies in the padding beyond the image (width, height) is not the image's.
    """
    if boxes is None:
        return []
    width, height = size
    faces = []
    for box, prob in zip(boxes, probs):
        x0, y0, x1, y1 = (float(v) for v in box)
        if (x0 + x1) / 2 < width and (y0 + y1) / 2 < height:
            faces.append(Detection(score=float(prob), box=clamp_box([x0, y0, x1, y1], width, height)))
    return sorted_detections(faces)
