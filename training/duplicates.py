"""Which labelled keys show the same image: identical bytes (SHA-256) or near-duplicates (a perceptual hash).

Cross-validation folds and the held-out set take whole groups, so a photo and its copy (the same
file under two keys, or mirrored, resized, re-encoded) never sit on both sides of a split.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# pHash (imagehash's DCT hash, 64 bits). Mirrored, half-size and JPEG-q30 copies of scikit-image's
# photos differ by 0-4 bits; distinct photos by 20 or more; a 5% crop by 2-22 (crops are not caught).
DEFAULT_MAX_DISTANCE = 8
HASH_SIZE = 8
_DRAFT_SIZE = (128, 128)  # JPEGs decode at 1/2..1/8 scale: the hash reads 32x32 pixels anyway
_BLOCK = 1 << 22  # pairwise comparisons per numpy step: about 32 MB of temporaries


@dataclass(frozen=True)
class ImageHash:
    """The pHash of an image and of its mirror image: a mirrored copy matches one or the other."""

    plain: int
    mirrored: int


def perceptual_hash(data: bytes, max_pixels: int) -> ImageHash | None:
    """The pHash pair of encoded image bytes (upright, as displayed), or None when they do not decode."""
    import imagehash
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels or width <= 0 or height <= 0:
                return None
            image.draft("RGB", _DRAFT_SIZE)  # JPEG only; other formats ignore it
            upright = ImageOps.exif_transpose(image).convert("RGB")
    except Exception:  # noqa: BLE001 - Pillow's many errors: such an image is grouped by SHA-256 only
        return None
    plain = imagehash.phash(upright, hash_size=HASH_SIZE)
    mirrored = imagehash.phash(ImageOps.mirror(upright), hash_size=HASH_SIZE)
    return ImageHash(_as_int(plain), _as_int(mirrored))


def _as_int(image_hash: object) -> int:
    bits = np.asarray(image_hash.hash, dtype=bool).ravel()  # type: ignore[attr-defined]
    return int("".join("1" if b else "0" for b in bits), 2)


def distance(a: ImageHash, b: ImageHash) -> int:
    """Bits that differ between two images, the smaller of as-is and mirrored."""
    return min(bin(a.plain ^ b.plain).count("1"), bin(a.plain ^ b.mirrored).count("1"))


def _popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy 2
        return np.bitwise_count(values)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[values.view(np.uint8).reshape(*values.shape, 8)].sum(axis=-1)


def near_any(queries: list[ImageHash], references: list[ImageHash], max_distance: int) -> list[bool]:
    """For each query, whether some reference is within `max_distance` bits of it."""
    if not queries or not references:
        return [False] * len(queries)
    plain = np.array([h.plain for h in queries], dtype=np.uint64)
    ref_plain = np.array([h.plain for h in references], dtype=np.uint64)
    ref_mirrored = np.array([h.mirrored for h in references], dtype=np.uint64)
    rows = max(1, _BLOCK // len(references))
    out: list[bool] = []
    for start in range(0, len(queries), rows):
        block = plain[start:start + rows, None]
        bits = np.minimum(_popcount(block ^ ref_plain[None, :]), _popcount(block ^ ref_mirrored[None, :]))
        out += (bits.min(axis=1) <= max_distance).tolist()
    return out


def encode_hash(image_hash: ImageHash) -> str:
    """32 hex digits, as manifests record a training image: the plain hash, then the mirrored one."""
    return f"{image_hash.plain:016x}{image_hash.mirrored:016x}"


def decode_hash(text: str) -> ImageHash:
    return ImageHash(int(text[:16], 16), int(text[16:32], 16))


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def _near_pairs(hashes: list[ImageHash], max_distance: int) -> Iterable[tuple[int, int]]:
    """(i, j), i < j, of every two hashes within `max_distance` bits (all pairs, in blocks of rows)."""
    n = len(hashes)
    if n < 2:
        return
    plain = np.array([h.plain for h in hashes], dtype=np.uint64)
    mirrored = np.array([h.mirrored for h in hashes], dtype=np.uint64)
    rows = max(1, _BLOCK // n)
    for start in range(0, n, rows):
        block = plain[start:start + rows, None]
        bits = np.minimum(_popcount(block ^ plain[None, :]), _popcount(block ^ mirrored[None, :]))
        for i, j in zip(*np.nonzero(bits <= max_distance)):
            if start + i < j:
                yield start + int(i), int(j)


def group_keys(keys: list[str], sha256: dict[str, set[str]], hashes: dict[str, ImageHash],
               max_distance: int | None = DEFAULT_MAX_DISTANCE) -> dict[str, str]:
    """key -> its group (the group's first key in sorted order): keys that share an image SHA-256 or
    whose perceptual hashes are within `max_distance` bits, transitively. None: by SHA-256 only."""
    ordered = sorted(set(keys))
    index = {k: i for i, k in enumerate(ordered)}
    groups = _UnionFind(len(ordered))
    first_with: dict[str, int] = {}
    for k in ordered:
        for digest in sorted(sha256.get(k, ())):
            groups.union(index[k], first_with.setdefault(digest, index[k]))
    if max_distance is not None:
        hashed = [k for k in ordered if k in hashes]
        for i, j in _near_pairs([hashes[k] for k in hashed], max_distance):
            groups.union(index[hashed[i]], index[hashed[j]])
    return {k: ordered[groups.find(index[k])] for k in ordered}


def duplicate_groups(groups: dict[str, str]) -> list[list[str]]:
    """The groups of more than one key, each sorted, largest first."""
    members: dict[str, list[str]] = {}
    for key, group in groups.items():
        members.setdefault(group, []).append(key)
    return sorted((sorted(m) for m in members.values() if len(m) > 1), key=lambda m: (-len(m), m[0]))
