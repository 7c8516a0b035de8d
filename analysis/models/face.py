"""Face detection: MTCNN with the weights that ship inside facenet-pytorch, run by our own cascade."""

from __future__ import annotations

import torch
from facenet_pytorch import MTCNN

from imgstream.analysis.area_resample import AreaTables
from imgstream.analysis.models.base import Detection, TensorModel, clamp_box, sorted_detections
from imgstream.analysis.models.mtcnn import Cascade, Faces, speed_up
from imgstream.analysis.preprocess import to_device
from imgstream.schemas.config import ModelsConfig
from imgstream.schemas.events import ModelInfo


class FaceDetector(TensorModel):
    """MTCNN (keep_all); outputs every face found, sorted by probability, in input pixels.
    The same faces as facenet-pytorch's `detect`, for batches of any sizes (see models.mtcnn)."""

    key = "face"

    def __init__(self, config: ModelsConfig, device: torch.device) -> None:
        # MTCNN's weights ship inside facenet-pytorch, so models.weights=random does not apply.
        # It stays fp32: its thresholds (0.6, 0.7, 0.7) were tuned on fp32 probabilities.
        self.device = device
        self.info = ModelInfo(name="MTCNN", weights="facenet-pytorch-bundled")
        self._mtcnn = MTCNN(keep_all=True, device=device).eval()
        speed_up(self._mtcnn)
        self._cascade = Cascade(self._mtcnn)

    def collate(self, items: list[torch.Tensor]) -> AreaTables:
        """The images' summed-area tables on the device, from which every resize and crop is read."""
        return AreaTables.build([to_device(pixels, self.device) for pixels in items])

    def forward(self, tables: AreaTables) -> list[list[Detection]]:
        """Detect faces in every image of the batch at once."""
        return [_detections(faces, width, height)
                for faces, (height, width) in zip(self._cascade.detect(tables), tables.sizes)]


def _detections(faces: Faces, width: int, height: int) -> list[Detection]:
    """One image's faces as detections clamped to the image, the most probable first."""
    return sorted_detections([Detection(score=float(prob), box=clamp_box([float(v) for v in box], width, height))
                              for box, prob in zip(faces.boxes, faces.probs)])
