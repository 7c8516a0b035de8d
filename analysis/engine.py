"""The shared task engine: `await engine.run(request, image)` -> one ResultEvent per task.

Each request's tasks run concurrently. Detections, crops, PNGs and embeddings are
memoised per request (keyed by everything that affects them), so each runs at most
once and is shared by every task that needs it; model work goes through one
micro-batcher per model, so items from all requests in flight share batches.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np
from PIL import Image

from analysis import imaging
from analysis.batcher import MicroBatcher, Timed
from analysis.classifiers import ClassifierEntry, ClassifierInvalid, ClassifierNotFound, ClassifierStore
from analysis.results import image_info, task_result
from schemas.config import ModelsConfig
from schemas.events import AnalysisRequest, ModelInfo, ResultEvent, Task
from schemas.operations import (
    FACE_MIN_SCORE,
    PERSON_MIN_SCORE,
    PROMINENT_FACE,
    PROMINENT_PERSON,
    WHOLE_IMAGE,
    InvalidParams,
    UnsupportedOperation,
    resolve_params,
)

log = logging.getLogger(__name__)

MODEL_KEYS = ("clip", "dino", "person", "face", "caption")
EMBEDDING_MODELS = {"embed_clip_vit_b_32": "clip", "embed_dino_v2": "dino"}


class Skip(Exception):
    """The request asked for something this image cannot give (status `skipped`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _TaskClock:
    """Queue and compute time of the model stages one task waited on."""

    queue_ms: float = 0.0
    compute_ms: float = 0.0
    seen: set = field(default_factory=set)

    def add(self, key: tuple, timed: Timed) -> None:
        if key not in self.seen:
            self.seen.add(key)
            self.queue_ms += timed.queue_ms
            self.compute_ms += timed.compute_ms


@dataclass
class _Outcome:
    data: Any = None
    region: str | None = None
    box: list[int] | None = None
    crop_base64: str | None = None
    model: ModelInfo | None = None


class Engine:
    """Owns the models, their batchers and the device thread; runs requests."""

    def __init__(self, config: ModelsConfig, *, models: dict[str, Any] | None = None) -> None:
        from analysis.models import select_device

        self.config = config
        self.device = select_device(config)
        # One thread per device: model calls never block the event loop and never race each other.
        self._device_executor = ThreadPoolExecutor(1, thread_name_prefix="imgstream-device")
        self._cpu_executor = ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="imgstream-cpu")
        self._models: dict[str, Any] = dict(models or {})
        self._batchers: dict[str, MicroBatcher] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self.classifiers = ClassifierStore(config.classifiers_dir)
        self.stage_counts: Counter[str] = Counter()
        self.ready = False

    # -- models ---------------------------------------------------------------------------

    def _load_sync(self, key: str) -> Any:
        from analysis.models import load_model

        started = time.perf_counter()
        model = load_model(key, self.config, self.device)
        log.info(
            "model %s loaded: %s weights=%s on %s in %.1fs",
            key, model.info.name, model.info.weights, self.device, time.perf_counter() - started,
        )
        return model

    async def start(self) -> None:
        """Load the configured models once, before any request is taken."""
        loop = asyncio.get_running_loop()
        for key in self.config.preload:
            if key not in self._models:
                self._models[key] = await loop.run_in_executor(self._device_executor, self._load_sync, key)
        self.ready = True

    async def model(self, key: str) -> Any:
        """The loaded model for `key`, loading it on first use if it was not preloaded."""
        model = self._models.get(key)
        if model is not None:
            return model
        lock = self._load_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._models:
                loop = asyncio.get_running_loop()
                self._models[key] = await loop.run_in_executor(self._device_executor, self._load_sync, key)
        return self._models[key]

    def model_infos(self) -> dict[str, ModelInfo]:
        return {key: model.info for key, model in self._models.items()}

    def _batcher(self, key: str, model: Any) -> MicroBatcher:
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = MicroBatcher(key, model.run_batch, self._device_executor, self.config.batch(key))
            self._batchers[key] = batcher
        return batcher

    def batch_stats(self) -> dict[str, dict[str, Any]]:
        """Per model: calls, items, batch sizes and queue wait (for tests, benchmarks, /metrics)."""
        return {key: batcher.stats.snapshot() for key, batcher in self._batchers.items()}

    def queued(self) -> dict[str, int]:
        return {key: batcher.queued for key, batcher in self._batchers.items()}

    async def infer(self, key: str, image: Image.Image, extra: Any = None) -> Timed:
        """Preprocess `image` on a CPU thread and run it through `key`'s batcher."""
        model = await self.model(key)
        loop = asyncio.get_running_loop()
        item = await loop.run_in_executor(self._cpu_executor, model.preprocess, image)
        return await self._batcher(key, model).submit(item if extra is None else (item, extra))

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU work (crops, PNG encoding, classifier files) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu_executor, fn, *args)

    # -- requests -------------------------------------------------------------------------

    async def run(
        self,
        request: AnalysisRequest,
        image: imaging.DecodedImage | Image.Image,
        *,
        timings_ms: dict[str, float] | None = None,
    ) -> list[ResultEvent]:
        """Run every task of `request` on `image`; returns one result per task, in task order."""
        if isinstance(image, Image.Image):
            image = imaging.DecodedImage(image=image.convert("RGB"), width=image.width, height=image.height,
                                         sha256=None, format=None)
        run = _RequestRun(self, request, image, dict(timings_ms or {}))
        return list(await asyncio.gather(*(run.result(task) for task in request.tasks)))

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
        self._device_executor.shutdown(wait=False, cancel_futures=True)
        self._cpu_executor.shutdown(wait=False, cancel_futures=True)


class _RequestRun:
    """One request's tasks and the stages they share."""

    def __init__(self, engine: Engine, request: AnalysisRequest, decoded: imaging.DecodedImage,
                 timings_ms: dict[str, float]) -> None:
        self.engine = engine
        self.request = request
        self.decoded = decoded
        self.image = decoded.image
        self.timings_ms = timings_ms
        self.image_info = image_info(request, decoded.width, decoded.height, decoded.sha256)
        self._stages: dict[tuple, asyncio.Future] = {}
        self.started = time.perf_counter()

    async def _stage(self, key: tuple, make: Callable[[], Awaitable[Any]], clock: _TaskClock) -> Any:
        """Run `make` once per request for `key`; every task that asks shares the answer."""
        future = self._stages.get(key)
        if future is None:
            self.engine.stage_counts[key[0]] += 1
            future = asyncio.ensure_future(make())
            self._stages[key] = future
        # shield: one task being cancelled must not cancel a stage its siblings wait on.
        value = await asyncio.shield(future)
        if isinstance(value, Timed):
            clock.add(key, value)
            return value.value
        return value

    # -- stages ---------------------------------------------------------------------------

    async def crop(self, box: list[int], clock: _TaskClock) -> Image.Image:
        return await self._stage(("crop", tuple(box)), lambda: self.engine.off_loop(imaging.crop, self.image, box), clock)

    async def crop_png(self, box: list[int], clock: _TaskClock) -> str:
        async def encode() -> str:
            return await self.engine.off_loop(imaging.png_base64, await self.crop(box, clock))

        return await self._stage(("png", tuple(box)), encode, clock)

    async def prominent_person(self, min_score: float, clock: _TaskClock) -> list[int] | None:
        candidates = await self._stage(("person",), lambda: self.engine.infer("person", self.image), clock)
        return self._best_box(candidates, min_score)

    def _best_box(self, candidates: list[tuple[float, list[float]]], min_score: float) -> list[int] | None:
        """The first (most confident) candidate at or above `min_score` whose clamped box is not empty."""
        for score, box in candidates:
            if score < min_score:
                break
            clamped = imaging.clamp_box(box, self.decoded.width, self.decoded.height)
            if clamped is not None:
                return clamped
        return None

    async def prominent_face(self, face_context: str, min_score: float, clock: _TaskClock) -> list[int] | None:
        region = None
        if face_context == PROMINENT_PERSON:
            region = await self.prominent_person(PERSON_MIN_SCORE, clock)

        async def detect() -> Timed:
            source = self.image if region is None else await self.crop(region, clock)
            timed = await self.engine.infer("face", source)
            if region is None:
                return timed
            dx, dy = region[0], region[1]
            shifted = [(p, [b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy]) for p, b in timed.value]
            return Timed(shifted, timed.queue_ms, timed.compute_ms)

        key = ("face", face_context, tuple(region) if region else None)
        return self._best_box(await self._stage(key, detect, clock), min_score)

    async def region(self, task: Task, target: str, params: dict[str, Any],
                     clock: _TaskClock) -> tuple[list[int] | None, str]:
        """The box to crop (None = whole image) and the name of the region actually used."""
        if target == PROMINENT_PERSON:
            box = await self.prominent_person(_score(params, PERSON_MIN_SCORE), clock)
            if box is None:
                log.info("%s/%s: no prominent person; using the whole image",
                         self.request.request_id, task.operation_id)
                return None, WHOLE_IMAGE
            return box, PROMINENT_PERSON
        if target == PROMINENT_FACE:
            box = await self.prominent_face(params["face_context"], _score(params, FACE_MIN_SCORE), clock)
            if box is None:
                raise Skip("no_face_found", f"No prominent face found for operation '{task.operation_id}'.")
            return box, PROMINENT_FACE
        return None, WHOLE_IMAGE

    async def embedding(self, model_key: str, box: list[int] | None, clock: _TaskClock) -> np.ndarray:
        async def embed() -> Timed:
            source = self.image if box is None else await self.crop(box, clock)
            return await self.engine.infer(model_key, source)

        return await self._stage(("embed", model_key, tuple(box) if box else None), embed, clock)

    async def caption(self, box: list[int] | None, max_length: int, clock: _TaskClock) -> str:
        async def describe() -> Timed:
            source = self.image if box is None else await self.crop(box, clock)
            return await self.engine.infer("caption", source, max_length)

        return await self._stage(("caption", tuple(box) if box else None, max_length), describe, clock)

    async def _crop_fields(self, box: list[int] | None, params: dict[str, Any],
                           clock: _TaskClock) -> tuple[list[int] | None, str | None]:
        if box is None:
            return None, None
        return box, (await self.crop_png(box, clock) if params.get("return_crop", True) else None)

    # -- operations -----------------------------------------------------------------------

    async def detect_bounding_box(self, task: Task, params: dict[str, Any], clock: _TaskClock) -> _Outcome:
        target = params["target"]
        if target == PROMINENT_PERSON:
            box = await self.prominent_person(_score(params, PERSON_MIN_SCORE), clock)
            return _Outcome(data=box, region=target, model=(await self.engine.model("person")).info)
        box = await self.prominent_face(params["face_context"], _score(params, FACE_MIN_SCORE), clock)
        return _Outcome(data=box, region=target, model=(await self.engine.model("face")).info)

    async def embed(self, task: Task, params: dict[str, Any], clock: _TaskClock) -> _Outcome:
        model_key = EMBEDDING_MODELS[task.type]
        box, region = await self.region(task, params["target"], params, clock)
        vector = await self.embedding(model_key, box, clock)
        if params.get("normalize"):
            norm = float(np.linalg.norm(vector))
            vector = vector / norm if norm > 0 else vector
        bbox, b64 = await self._crop_fields(box, params, clock)
        model = (await self.engine.model(model_key)).info
        return _Outcome(data=np.asarray(vector, dtype=np.float32).tolist(), region=region, box=bbox,
                        crop_base64=b64, model=model)

    async def classify(self, task: Task, params: dict[str, Any], clock: _TaskClock) -> _Outcome:
        store = self.engine.classifiers
        entry: ClassifierEntry = await self.engine.off_loop(store.entry, params["collection_id"])
        if params["target"] is not None and params["target"] != entry.region:
            raise InvalidParams(
                f"target '{params['target']}' contradicts the classifier of collection {entry.collection_id}, "
                f"which works on '{entry.region}'; omit target or use '{entry.region}'"
            )
        box, region = await self.region(task, entry.region, params, clock)
        vectors = [await self.embedding(EMBEDDING_MODELS[t], box, clock) for t in entry.embedding_types]
        features = np.concatenate([np.asarray(v, dtype=np.float32) for v in vectors])
        prediction = await self.engine.off_loop(store.predict, entry, features)
        weights = "+".join([(await self.engine.model(EMBEDDING_MODELS[t])).info.weights for t in entry.embedding_types])
        bbox, b64 = await self._crop_fields(box, params, clock)
        model = ModelInfo(name=f"{entry.model_file} on {entry.embedding_type}", weights=weights,
                          dim=int(features.shape[0]))
        return _Outcome(data=prediction.as_data(), region=region, box=bbox, crop_base64=b64, model=model)

    async def describe_image(self, task: Task, params: dict[str, Any], clock: _TaskClock) -> _Outcome:
        box, region = await self.region(task, params["target"], params, clock)
        text = await self.caption(box, params["max_length"], clock)
        bbox, b64 = await self._crop_fields(box, params, clock)
        return _Outcome(data=text, region=region, box=bbox, crop_base64=b64,
                        model=(await self.engine.model("caption")).info)

    _HANDLERS = {
        "detect_bounding_box": detect_bounding_box,
        "embed_clip_vit_b_32": embed,
        "embed_dino_v2": embed,
        "classify": classify,
        "describe_image": describe_image,
    }

    async def result(self, task: Task) -> ResultEvent:
        """Run one task and turn its outcome or failure into its ResultEvent."""
        clock = _TaskClock()
        common = {"image": self.image_info}
        try:
            params = resolve_params(task.type, task.params)
            handler = self._HANDLERS.get(task.type)
            if handler is None:  # in the registry but not served here
                raise UnsupportedOperation(f"Unsupported operation type: '{task.type}'")
            outcome = await handler(self, task, params, clock)
        except UnsupportedOperation as exc:
            return task_result(self.request, task, "skipped", error_code="unsupported_operation",
                               error_message=str(exc), timings_ms=self._timings(clock), **common)
        except InvalidParams as exc:
            return task_result(self.request, task, "skipped", error_code="invalid_params",
                               error_message=str(exc), timings_ms=self._timings(clock), **common)
        except ClassifierNotFound as exc:
            return task_result(self.request, task, "skipped", error_code="classifier_not_found",
                               error_message=str(exc), timings_ms=self._timings(clock), **common)
        except Skip as exc:
            return task_result(self.request, task, "skipped", error_code=exc.code, error_message=exc.message,
                               timings_ms=self._timings(clock), **common)
        except ClassifierInvalid as exc:
            log.error("%s/%s: %s", self.request.request_id, task.operation_id, exc)
            return task_result(self.request, task, "error", error_code="classifier_invalid",
                               error_message=str(exc), timings_ms=self._timings(clock), **common)
        except Exception as exc:  # noqa: BLE001 - a task failure must never take the worker down
            log.exception("%s/%s: %s failed", self.request.request_id, task.operation_id, task.type)
            return task_result(self.request, task, "error", error_code="internal_error",
                               error_message=f"Internal error processing task: {type(exc).__name__}: {exc}",
                               timings_ms=self._timings(clock), **common)
        try:
            return task_result(
                self.request, task, "success", data=outcome.data, region=outcome.region, bbox=outcome.box,
                crop_base64=outcome.crop_base64, model=outcome.model, timings_ms=self._timings(clock), **common,
            )
        except Exception as exc:  # noqa: BLE001 - an outcome the schema refuses fails this task only
            log.exception("%s/%s: result could not be built", self.request.request_id, task.operation_id)
            return task_result(self.request, task, "error", error_code="internal_error",
                               error_message=f"Internal error building the result: {type(exc).__name__}: {exc}",
                               timings_ms=self._timings(clock), **common)

    def _timings(self, clock: _TaskClock) -> dict[str, float]:
        return {
            **self.timings_ms,
            "queue": clock.queue_ms,
            "compute": clock.compute_ms,
            "engine": (time.perf_counter() - self.started) * 1000.0,
        }


def _score(params: dict[str, Any], default: float) -> float:
    value = params.get("min_score")
    return default if value is None else float(value)
