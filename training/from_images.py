"""Embeddings computed by the engine for labelled image files that have none in the other sources."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgstream.schemas.config import WorkerConfig
from imgstream.training.features import Embedding, Pair, model_id
from imgstream.training.progress import Progress

IN_FLIGHT = 32  # images decoded or waiting in the engine at once: enough to fill its batches


@dataclass
class ImageEmbeddings:
    found: dict[Pair, dict[str, Embedding]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # key -> why it has no embedding


async def embed_images(config: WorkerConfig, images: dict[str, str], wanted: dict[str, list[Pair]],
                       progress: bool = True) -> ImageEmbeddings:
    """Run the embedding tasks `wanted[key]` on the image file of each key, batched by the engine.

    An embedding is filed under the region the engine actually used (a person target without a
    person falls back to the whole image), as the worker's results are.
    """
    from imgstream.analysis.engine import EMBEDDING_MODELS, Engine  # torch is imported only here
    from imgstream.analysis.imaging import ImageError, decode_image
    from imgstream.schemas.events import AnalysisRequest

    out = ImageEmbeddings()
    if not wanted:
        return out
    models = sorted({EMBEDDING_MODELS[t] for pairs in wanted.values() for t, _ in pairs})
    engine = Engine(config.models.model_copy(update={"preload": models}))
    bar = Progress("embedding images", len(wanted), progress, unit="img")
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def embed(key: str, pairs: list[Pair]) -> None:
        try:
            await _embed_one(key, pairs)
        finally:
            bar.advance()

    async def _embed_one(key: str, pairs: list[Pair]) -> None:
        path = Path(images[key])
        async with slots:
            try:
                data = await asyncio.to_thread(path.read_bytes)
                decoded = await asyncio.to_thread(decode_image, data, config.decode)
            except OSError as exc:
                out.failed[key] = f"image unreadable ({exc.strerror or exc})"
                return
            except ImageError as exc:
                out.failed[key] = f"{exc.code} ({exc.message})"
                return
            request = AnalysisRequest(
                request_id=f"train:{key}"[:512], image={"blob": path.as_uri()},
                tasks=[{"operation_id": f"{t}@{region}", "type": t, "params": {"target": region}}
                       for t, region in pairs])
            results = await engine.run(request, decoded)
        for result in results:
            if result.status == "success":
                model = model_id(result.model.name, result.model.weights) if result.model else model_id(None, None)
                out.found.setdefault((result.type, result.region or "whole_image"), {})[key] = Embedding(
                    np.asarray(result.data, dtype=np.float32), model, decoded.sha256, normalized=result.normalized)
            else:
                out.failed.setdefault(key, f"{result.error_code} ({result.error_message})")

    try:
        await engine.start()
        await asyncio.gather(*(embed(key, pairs) for key, pairs in wanted.items()))
    finally:
        bar.close()
        await engine.close()
    return out
