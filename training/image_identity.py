"""What is known of each labelled key's image: its SHA-256, and a perceptual hash where its bytes are readable.

Bytes are read from the labels' image files and from `file://` blob references inside the
configured blob roots (`fetch.blob_roots`, else the blob store directory), as a worker would.
Images known only by URL or by an `s3://` reference are not fetched: they are grouped by SHA-256 only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field

from imgstream.schemas.config import WorkerConfig
from imgstream.service.progress import Progress
from imgstream.training.duplicates import ImageHash, perceptual_hash
from imgstream.training.features import FeatureStore

log = logging.getLogger(__name__)

IN_FLIGHT = 8  # images read and hashed at once (decoding releases the GIL)


@dataclass
class ImageIdentities:
    sha256: dict[str, set[str]] = field(default_factory=dict)
    hashes: dict[str, ImageHash] = field(default_factory=dict)
    unhashed: dict[str, str] = field(default_factory=dict)  # key -> why it has no perceptual hash

    def as_dict(self, keys: list[str]) -> dict[str, int]:
        """Counts over `keys`, for the report."""
        return {"keys": len(keys), "with_sha256": sum(1 for k in keys if self.sha256.get(k)),
                "with_perceptual_hash": sum(1 for k in keys if k in self.hashes)}


def _read_file(path: str, max_bytes: int) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(f"over the limit of {max_bytes} bytes")
    return data


async def identify_images(config: WorkerConfig, images: dict[str, str], store: FeatureStore, keys: set[str],
                          progress: bool = True) -> ImageIdentities:
    """SHA-256 digests of every key's image the sources name, and perceptual hashes of those this machine reads.

    `images` are the labels' image files by key. Perceptual hashes are skipped when
    `training.near_duplicate_distance` is unset.
    """
    sha256, blobs = store.image_refs(keys)
    out = ImageIdentities(sha256=sha256)
    if config.training.near_duplicate_distance is None:
        return out
    sources: dict[str, list[str]] = {}  # a file path or blob reference -> its keys
    for key in sorted(keys):
        if key in images:
            sources.setdefault(images[key], []).append(key)
        elif blobs.get(key, "").startswith("file://"):
            sources.setdefault(blobs[key], []).append(key)
        else:
            out.unhashed[key] = "no readable copy (an image file or a file:// blob)"
    if not sources:
        return out
    try:
        import imagehash  # noqa: F401
    except ImportError:
        log.warning("imagehash is not installed (pip install 'imgstream[train]'): copies of one image are "
                    "found by identical bytes only")
        out.unhashed.update({k: "imagehash is not installed" for keys_ in sources.values() for k in keys_})
        return out
    from imgstream.analysis.imaging import ImageError  # torch comes with these: only when there are images to read
    from imgstream.consumer.blob_readers import FileBlobReader

    reader = FileBlobReader(config.file_blob_roots(), reads=config.fetch.blob_reads)
    max_bytes, max_pixels = config.fetch.max_bytes, config.decode.max_pixels
    slots = asyncio.Semaphore(IN_FLIGHT)
    bar = Progress("hashing images", len(sources), progress, unit="img")

    async def identify(source: str, source_keys: list[str]) -> None:
        async with slots:
            try:
                if source.startswith("file://") and source_keys[0] not in images:
                    data = await reader.read(source, max_bytes)
                else:
                    data = await asyncio.to_thread(_read_file, source, max_bytes)
            except ImageError as exc:
                why = exc.message
            except OSError as exc:
                why = f"unreadable ({exc.strerror or exc})"
            else:
                digest = hashlib.sha256(data).hexdigest()
                image_hash = await asyncio.to_thread(perceptual_hash, data, max_pixels)
                why = "not a decodable image" if image_hash is None else ""
                for key in source_keys:
                    out.sha256.setdefault(key, set()).add(digest)
                    if image_hash is not None:
                        out.hashes[key] = image_hash
            if why:
                for key in source_keys:
                    out.unhashed[key] = why
        bar.advance()

    try:
        await asyncio.gather(*(identify(s, k) for s, k in sources.items()))
    finally:
        bar.close()
    return out

