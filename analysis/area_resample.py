"""Exact area resampling (torch's `F.interpolate(mode="area")`) of whole images and of many crops
at once, read off one summed-area table per image.

`mode="area"` is adaptive average pooling: output cell i of n over an input length L averages
the whole input pixels [floor(i*L/n), ceil((i+1)*L/n)). With a summed-area table each cell is
four lookups, so a scale pyramid costs its output size rather than one pass over the full
image per level, and all of an image's crops are one vectorised gather instead of a call each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Sums of uint8 pixels stay exact in int32 up to this many pixels per image (255 * 8.4M < 2**31).
_INT32_PIXELS = (2**31 - 1) // 255


def cell_bounds(length: int | torch.Tensor, cells: int, device: torch.device | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each of `cells` output cells starts and ends (exclusive) over `length` input pixels:
    adaptive pooling's [floor(i*L/n), ceil((i+1)*L/n)). `length` may be a column of lengths."""
    if isinstance(length, torch.Tensor):
        device = length.device
        length = length.unsqueeze(-1)
    i = torch.arange(cells, device=device)
    return (i * length) // cells, ((i + 1) * length + cells - 1) // cells


def _mean(sums: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """Window sums over their pixel counts, float32: below 2**24 (windows under 65,000 pixels)
    both are exact in float32, so the quotient is the correctly rounded mean; above, within an ulp."""
    return sums.float().div_(area.float())


def _cumsum_rows(table: torch.Tensor, block: int = 64) -> torch.Tensor:
    """`table` (C x H x W) cumulatively summed along H (in place on the CPU, where `cumsum` along an
    outer dimension is about 20x slower than along the innermost, and adding rows block by block is fast)."""
    if table.device.type != "cpu":
        return table.cumsum(1, dtype=table.dtype)
    height = table.shape[1]
    blocks = height // block
    if blocks:
        core = table[:, :blocks * block].view(table.shape[0], blocks, block, -1)
        for i in range(1, block):  # within every block at once
            core[:, :, i] += core[:, :, i - 1]
        for j in range(1, blocks):  # then each block's carry from the one above
            core[:, j] += core[:, j - 1, -1:]
    for y in range(max(blocks * block, 1), height):
        table[:, y] += table[:, y - 1]
    return table


@dataclass(frozen=True)
class AreaTables:
    """Summed-area tables of a batch of images, one per image.

    Image i's table is 3 x (H+1) x (W+1): entry [c, y, x] is the sum of channel c over pixels
    [0, y) x [0, x), so a leading zero row and column make empty sums zero. (One flat buffer for
    a whole batch would let crops of all images be one gather, but on the CPU every fresh
    allocation that large is page-faulted in again: measured, it doubled a batch's time.)
    """

    tables: list[torch.Tensor]  # int32 (int64 for images over 8.4 megapixels)
    sizes: list[tuple[int, int]]  # per image (height, width)

    @classmethod
    def build(cls, images: Sequence[torch.Tensor]) -> AreaTables:
        """Tables of uint8 3xHxW images (views allowed), each made on its image's device."""
        tables, sizes = [], []
        for image in images:
            h, w = int(image.shape[1]), int(image.shape[2])
            padded = torch.zeros((3, h + 1, w + 1), dtype=torch.uint8, device=image.device)
            padded[:, 1:, 1:] = image
            table = padded.cumsum(2, dtype=torch.int32 if h * w <= _INT32_PIXELS else torch.int64)
            tables.append(_cumsum_rows(table))
            sizes.append((h, w))
        return cls(tables, sizes)

    def resize(self, index: int, height: int, width: int) -> torch.Tensor:
        """Image `index` area-resampled to 1x3x`height`x`width` float32 (values 0..255)."""
        h, w = self.sizes[index]
        table = self.tables[index]
        y0, y1 = cell_bounds(h, height, table.device)
        x0, x1 = cell_bounds(w, width, table.device)
        # Separable: whole table rows at the row bounds first (contiguous copies), then the column
        # bounds (`gather` along the innermost dimension is several times faster than `index_select`).
        rows = table.index_select(1, y1) - table.index_select(1, y0)
        sums = rows.gather(2, x1.expand(3, height, width)) - rows.gather(2, x0.expand(3, height, width))
        area = (y1 - y0).unsqueeze(1) * (x1 - x0).unsqueeze(0)
        return _mean(sums, area).unsqueeze(0)

    def crops(self, index: int, regions: torch.Tensor, size: int) -> torch.Tensor:
        """Nx3x`size`x`size` float32: each region [x0, y0, x1, y1) of image `index` (whole pixels,
        non-empty, inside the image) area-resampled, all in one gather."""
        table = self.tables[index]
        if len(regions) == 0:
            return torch.zeros((0, 3, size, size), dtype=torch.float32, device=table.device)
        x0, y0, x1, y1 = regions.long().unbind(1)
        cx0, cx1 = cell_bounds(x1 - x0, size)
        cy0, cy1 = cell_bounds(y1 - y0, size)
        stride = table.shape[2]
        # Flat positions in the table, per crop a size x size grid: rows along dim 1, columns along dim 2.
        top = ((y0.view(-1, 1) + cy0) * stride).unsqueeze(2)
        bottom = ((y0.view(-1, 1) + cy1) * stride).unsqueeze(2)
        left = (x0.view(-1, 1) + cx0).unsqueeze(1)
        right = (x0.view(-1, 1) + cx1).unsqueeze(1)
        flat = table.view(3, -1)

        def take(positions: torch.Tensor) -> torch.Tensor:
            return flat.gather(1, positions.reshape(1, -1).expand(3, -1)).view(3, *positions.shape)

        sums = (take(bottom + right) - take(bottom + left)) - (take(top + right) - take(top + left))
        area = (cy1 - cy0).unsqueeze(2) * (cx1 - cx0).unsqueeze(1)
        return _mean(sums, area).permute(1, 0, 2, 3)
