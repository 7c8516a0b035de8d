"""MTCNN's three-stage cascade as batched tensor ops, on facenet-pytorch's trained P-, R- and O-Nets.

It reproduces `facenet_pytorch.MTCNN.detect` (same scale pyramid, thresholds, NMS, box
regression and squaring, crops clipped to the image) image by image, but faster and for images
of any sizes together: every resize is an exact area resample read off a summed-area table
(analysis.area_resample), P-Net takes the images of one size together at each scale (so no
padded canvases; on the CPU one image per call), and R-Net and O-Net each take the candidates of
all images in the batch together (on a GPU in one call).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torchvision.ops import batched_nms

from imgstream.analysis.area_resample import AreaTables
from imgstream.analysis.models.base import channels_last

# P-Net sees 12x12 windows with a stride of 2; R-Net takes 24x24 crops, O-Net 48x48.
_CELL, _STRIDE = 12, 2
_RNET_SIZE, _ONET_SIZE = 24, 48
# NMS overlaps facenet-pytorch uses: within a pyramid level, across levels, after R-Net, and
# after O-Net (there as intersection over the smaller box).
_LEVEL_IOU, _PROPOSAL_IOU, _REFINE_IOU, _OUTPUT_MIN_OVERLAP = 0.5, 0.7, 0.7, 0.7
# Candidates per R-Net and O-Net call. On a GPU, all of a batch's at once (the bound only caps
# activation memory). On the CPU small calls are faster per crop, their activations staying in
# the cache: measured on this 2-core machine, one thread, R-Net 37 us a crop in calls of 32 and
# 94 in calls of 256; O-Net 210 us in calls of 8 to 16 and 590 in calls of 512. P-Net: on a GPU
# every image of one size in one call per scale; on the CPU one image per call (four 1024 px
# photos, 2 threads: 84 ms an image one by one, 104 ms together).
_GPU_CHUNK = 4096
_CPU_CHUNKS = {"pnet": 1, "rnet": 32, "onet": 16}


class HalvingMaxPool(torch.nn.Module):
    """`MaxPool2d(2, 2, ceil_mode=True)` as two maxima of strided slices: the same numbers, 4x faster
    on the CPU for P-Net's first pool (10 channels, channels-last), there its slowest layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        rows = x[..., 0::2, :].clone()  # ceil mode: an odd last row or column is its own maximum
        paired = rows[..., :height // 2, :]
        torch.maximum(paired, x[..., 1::2, :], out=paired)
        out = rows[..., 0::2].clone()
        paired = out[..., :width // 2]
        torch.maximum(paired, rows[..., 1::2], out=paired)
        return out


def speed_up(mtcnn: torch.nn.Module) -> None:
    """Put a facenet-pytorch `MTCNN`'s nets in their fastest form, computing the same outputs:
    channels-last layout, and P-Net's first pool as `HalvingMaxPool`."""
    for net in (mtcnn.pnet, mtcnn.rnet, mtcnn.onet):
        channels_last(net)  # about 2x faster convolutions on the CPU
    pool = mtcnn.pnet.pool1
    if (isinstance(pool, torch.nn.MaxPool2d) and pool.ceil_mode and pool.kernel_size in (2, (2, 2))
            and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1))):
        mtcnn.pnet.pool1 = HalvingMaxPool()


class Faces(NamedTuple):
    """One image's faces, most probable first: boxes (n x 4 float32, `[x0, y0, x1, y1]`, not
    clamped to the image) and their probabilities (n float32)."""

    boxes: np.ndarray
    probs: np.ndarray


class Cascade:
    """The detector: trained nets and the settings of a facenet-pytorch `MTCNN` instance."""

    def __init__(self, mtcnn: torch.nn.Module, chunks: dict[str, int] | None = None) -> None:
        self.pnet, self.rnet, self.onet = mtcnn.pnet, mtcnn.rnet, mtcnn.onet
        self.min_face_size = int(mtcnn.min_face_size)
        self.factor = float(mtcnn.factor)
        self.thresholds = tuple(float(t) for t in mtcnn.thresholds)
        self.device = next(self.pnet.parameters()).device
        # Inputs per call of each net (`chunks` overrides, e.g. {"rnet": 4096}): candidate crops for
        # R- and O-Net, images of one size for P-Net.
        gpu = dict.fromkeys(("pnet", "rnet", "onet"), _GPU_CHUNK)
        self.chunks = {**(_CPU_CHUNKS if self.device.type == "cpu" else gpu), **(chunks or {})}

    def detect(self, tables: AreaTables) -> list[Faces]:
        """Faces in each image whose summed-area table is in `tables`, in order."""
        count = len(tables.sizes)
        if count == 0:
            return []
        with torch.inference_mode():
            proposals = self._proposals(tables)
            boxes = torch.cat(proposals)
            owners = torch.cat([torch.full((len(p),), i, dtype=torch.long, device=self.device)
                                for i, p in enumerate(proposals)])
            # Stage 2: R-Net rescores the proposals; survivors are regressed and squared again.
            boxes, offsets, owners = self._rescore("rnet", tables, boxes, owners, _RNET_SIZE, self.thresholds[1])
            keep = _nms_per_image(boxes, owners, count, _REFINE_IOU)
            boxes = _square(_regress(boxes[keep], offsets[keep]))
            owners = owners[keep]
            # Stage 3: O-Net rescores and regresses; overlapping outputs are merged on the CPU.
            boxes, offsets, owners = self._rescore("onet", tables, boxes, owners, _ONET_SIZE, self.thresholds[2])
            boxes = _regress(boxes, offsets).cpu().numpy()
            owners = owners.cpu().numpy()
        faces = []
        for index in range(count):
            mine = boxes[owners == index]
            mine = mine[_nms_min(mine[:, :4], mine[:, 4], _OUTPUT_MIN_OVERLAP)]
            faces.append(Faces(mine[:, :4], mine[:, 4]))
        return faces

    def _proposals(self, tables: AreaTables) -> list[torch.Tensor]:
        """Stage 1: P-Net over each image's scale pyramid; per image its squared boxes with their
        scores (n x 5). Images of one size share their levels' sizes, so they go through P-Net
        together, up to `chunks["pnet"]` at a time."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(tables.sizes):
            by_size.setdefault(size, []).append(index)
        levels: list[list[torch.Tensor]] = [[] for _ in tables.sizes]
        chunk = self.chunks["pnet"]
        for (height, width), indices in by_size.items():
            for scale in pyramid_scales(height, width, self.min_face_size, self.factor):
                size = (int(height * scale + 1), int(width * scale + 1))
                for start in range(0, len(indices), chunk):
                    group = indices[start:start + chunk]
                    level = torch.cat([tables.resize(index, *size) for index in group])
                    offsets, probs = self.pnet(_normalise(level))
                    for row, index in enumerate(group):
                        found = _windows(offsets[row], probs[row, 1], scale, self.thresholds[0])
                        levels[index].append(found[_nms(found[:, :4], found[:, 4], _LEVEL_IOU)])
        return [self._merge_levels(found) for found in levels]

    def _merge_levels(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """One image's windows of every level: NMS across levels, P-Net's regression, squared."""
        if not levels:  # smaller than the smallest face
            return torch.zeros((0, 5), device=self.device)
        found = torch.cat(levels)
        found = found[_nms(found[:, :4], found[:, 4], _PROPOSAL_IOU)]
        # P-Net's offsets are in units of the window's width and height (no +1, unlike bbreg).
        x0, y0, x1, y1, score = found[:, :5].unbind(1)
        w, h = x1 - x0, y1 - y0
        dx0, dy0, dx1, dy1 = found[:, 5:9].unbind(1)
        boxes = torch.stack([x0 + dx0 * w, y0 + dy0 * h, x1 + dx1 * w, y1 + dy1 * h, score], dim=1)
        return _square(boxes)

    def _rescore(self, name: str, tables: AreaTables, boxes: torch.Tensor, owners: torch.Tensor,
                 size: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each box's crop through net `name`, the whole batch's boxes together; the boxes it scores
        above `threshold` with their new scores (n x 5), its box offsets (n x 4) and their images."""
        net, chunk = getattr(self, name), self.chunks[name]
        regions, inside = _crop_regions(boxes, owners, tables)
        # A box wholly outside its image has no crop: dropped (facenet-pytorch skips its crop but
        # not its box, and its arrays no longer line up).
        boxes, regions, owners = boxes[inside], regions[inside], owners[inside]
        if len(boxes) == 0:
            return boxes, boxes.new_zeros((0, 4)), owners
        crops, start = [], 0
        for index, count in enumerate(_counts(owners, len(tables.sizes))):
            if count:
                crops.append(tables.crops(index, regions[start:start + count], size))
            start += count
        inputs = _normalise(torch.cat(crops))
        outputs = [net(inputs[start:start + chunk]) for start in range(0, len(inputs), chunk)]
        # R-Net returns (offsets, probs); O-Net (offsets, landmarks, probs).
        offset = torch.cat([out[0] for out in outputs])
        score = torch.cat([out[-1][:, 1] for out in outputs])
        passed = score > threshold
        rescored = torch.cat([boxes[passed, :4], score[passed].unsqueeze(1)], dim=1)
        return rescored, offset[passed], owners[passed]


def pyramid_scales(height: int, width: int, min_face_size: int, factor: float) -> list[float]:
    """The scales at which P-Net's 12 px window sees faces from `min_face_size` up to the shorter side."""
    scale = _CELL / min_face_size
    side = min(height, width) * scale
    scales = []
    while side >= _CELL:
        scales.append(scale)
        scale *= factor
        side *= factor
    return scales


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """0..255 to the nets' input range, about -1..1."""
    return (pixels - 127.5) * 0.0078125


def _windows(offsets: torch.Tensor, probs: torch.Tensor, scale: float, threshold: float) -> torch.Tensor:
    """P-Net's windows scoring at least `threshold` on one level, in image pixels:
    n x 9 (x0, y0, x1, y1, score, then the four offsets)."""
    found = probs >= threshold
    cells = found.nonzero().to(offsets.dtype).flip(1)  # (x, y) on P-Net's output grid
    # In float32, rounded down as facenet-pytorch does, so the windows are the same pixels.
    top_left = ((_STRIDE * cells + 1) / scale).floor()
    bottom_right = ((_STRIDE * cells + _CELL) / scale).floor()
    return torch.cat([top_left, bottom_right, probs[found].unsqueeze(1), offsets[:, found].T], dim=1)


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy NMS within one image, as facenet-pytorch calls it for a single image (through
    `batched_nms`, whose order among equal scores differs from `nms` above 1,000 boxes)."""
    return batched_nms(boxes, scores, torch.zeros(len(boxes), dtype=torch.long, device=boxes.device), iou)


def _counts(owners: torch.Tensor, images: int) -> list[int]:
    """How many of the boxes belong to each image; a batch's boxes stay grouped by image, in order."""
    return torch.bincount(owners, minlength=images).tolist() if len(owners) else [0] * images


def _nms_per_image(boxes: torch.Tensor, owners: torch.Tensor, count: int, iou: float) -> torch.Tensor:
    """Indices kept by NMS run separately on each image's boxes."""
    keep, start = [], 0
    for size in _counts(owners, count):
        if size:
            keep.append(start + _nms(boxes[start:start + size, :4], boxes[start:start + size, 4], iou))
        start += size
    return torch.cat(keep) if keep else owners.new_zeros(0)


def _regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """R-/O-Net box regression: offsets in units of the box's pixel-inclusive width and height."""
    x0, y0, x1, y1, score = boxes.unbind(1)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    return torch.stack([x0 + offsets[:, 0] * w, y0 + offsets[:, 1] * h,
                        x1 + offsets[:, 2] * w, y1 + offsets[:, 3] * h, score], dim=1)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Each box grown to a square of its longer side around its centre (the next net's input is square)."""
    x0, y0, x1, y1, score = boxes.unbind(1)
    w, h = x1 - x0, y1 - y0
    side = torch.maximum(w, h)
    left, top = x0 + w * 0.5 - side * 0.5, y0 + h * 0.5 - side * 0.5
    return torch.stack([left, top, left + side, top + side, score], dim=1)


def _crop_regions(boxes: torch.Tensor, owners: torch.Tensor, tables: AreaTables
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each box's crop as whole pixels [x0, y0, x1, y1), clipped to its image (no padding, as
    facenet-pytorch crops), and whether anything of it is inside the image."""
    sizes = torch.tensor(tables.sizes, dtype=torch.long, device=boxes.device).view(-1, 2)[owners]
    corners = boxes[:, :4].trunc().long()
    # facenet-pytorch reads the truncated corners as 1-based pixels: the crop starts one earlier.
    x0 = corners[:, 0].clamp(min=1) - 1
    y0 = corners[:, 1].clamp(min=1) - 1
    x1 = torch.minimum(corners[:, 2], sizes[:, 1])
    y1 = torch.minimum(corners[:, 3], sizes[:, 0])
    return torch.stack([x0, y0, x1, y1], dim=1), (x1 > x0) & (y1 > y0)


def _nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """MTCNN's final greedy NMS: a box goes when its intersection with a better one covers more
    than `threshold` of the smaller of the two (pixel-inclusive areas). Indices, best first."""
    x0, y0, x1, y1 = boxes.T
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = np.argsort(scores)  # the best last; ties resolved as facenet-pytorch's numpy NMS does
    keep = []
    while order.size:
        best, rest = order[-1], order[:-1]
        keep.append(best)
        w = np.maximum(0.0, np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]) + 1)
        order = rest[w * h / np.minimum(area[best], area[rest]) <= threshold]
    return np.array(keep, dtype=np.int64)
