"""The shared task engine: `await engine.run(request, image)` -> one ResultEvent per task.

Each request's tasks run concurrently. Detections, crops, PNGs and embeddings are
memoised per request (keyed by everything that affects them), so each runs at most
once and is shared by every task that needs it; model work goes through one
micro-batcher per model, so items from all requests in flight share batches.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Hashable

import numpy as np
import torch
from PIL import Image

from imgstream.analysis import imaging
from imgstream.analysis.batcher import LIVE, Scheduler, Timed
from imgstream.analysis.classifiers import ClassifierEntry, ClassifierInvalid, ClassifierNotFound, ClassifierStore
from imgstream.analysis.devices import Device
from imgstream.analysis.results import image_info, task_result
from imgstream.analysis.reuse import InFlight, ReuseStore
from imgstream.analysis.vectors import l2_normalize
from imgstream.schemas.config import DecodeConfig, ModelsConfig
from imgstream.schemas.events import AnalysisRequest, ModelInfo, ResultEvent, Task
from imgstream.schemas.operations import (
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

# Images this small (in bytes) decode on the event loop: well under a millisecond, less than
# handing them to a thread costs. The pixel limit is checked from the header first either way.
INLINE_DECODE_BYTES = 16 * 1024
EMBEDDING_MODELS = {"embed_clip_vit_b_32": "clip", "embed_dino_v2": "dino"}


class Skip(Exception):
    """The request asked for something this image cannot give (status `skipped`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _TaskClock:
    """Queue and compute time of the model stages one task waited on, and how its shared stages were had."""

    queue_ms: float = 0.0
    compute_ms: float = 0.0
    seen: set = field(default_factory=set)
    # "computed", "in_flight" or "cached" for each stage shareable across requests
    sources: dict = field(default_factory=dict)

    def add(self, key: tuple, timed: Timed) -> None:
        if key not in self.seen:
            self.seen.add(key)
            self.queue_ms += timed.queue_ms
            self.compute_ms += timed.compute_ms

    @property
    def reused(self) -> str | None:
        """"in_flight" or "cached" when every shareable stage came from other requests, else None."""
        kinds = set(self.sources.values())
        if not kinds or "computed" in kinds:
            return None
        return "in_flight" if "in_flight" in kinds else "cached"


@dataclass
class _Outcome:
    data: Any = None
    region: str | None = None
    box: list[int] | None = None
    crop_base64: str | None = None
    model: ModelInfo | None = None
    normalized: bool | None = None  # embeddings only


class Engine:
    """Owns the devices, the models (a replica per device) and the scheduler; runs requests."""

    def __init__(self, config: ModelsConfig, *, models: dict[str, Any] | None = None) -> None:
        from imgstream.analysis.models import select_devices

        self.config = config
        self.devices = [Device(device, index) for index, device in enumerate(select_devices(config))]
        self.device = self.devices[0].torch_device
        self.scheduler = Scheduler(self.devices)
        self._cpu_executor = ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="imgstream-cpu")
        # Models handed in (tests, benchmarks) serve from the first device only.
        self._replicas: dict[str, dict[int, Any]] = {key: {0: model} for key, model in (models or {}).items()}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self.classifiers = ClassifierStore(config.classifiers_dir)
        self.stage_counts: Counter[str] = Counter()
        # Work shared across requests by image content (None: models.reuse is off).
        self.reuse = ReuseStore(config.reuse_cache_bytes) if config.reuse else None
        self.reused: Counter[str] = Counter()  # tasks answered wholly from other requests' work, by kind
        self._decoding = InFlight()  # decodes by sha256, shared by concurrent requests
        self.ready = False

    # -- models ---------------------------------------------------------------------------

    def _load_sync(self, key: str, device: Device) -> Any:
        from imgstream.analysis.models import load_model

        started = time.perf_counter()
        model = load_model(key, self.config, device.torch_device)
        log.info(
            "model %s loaded: %s weights=%s on %s in %.1fs",
            key, model.info.name, model.info.weights, device.name, time.perf_counter() - started,
        )
        return model

    async def _load(self, key: str) -> None:
        """One replica of `key` per device, each loaded on its device's thread; then a warm-up batch."""
        loop = asyncio.get_running_loop()
        if key not in self._replicas:
            replicas = await asyncio.gather(*(loop.run_in_executor(d.compute, self._load_sync, key, d)
                                              for d in self.devices))
            self._replicas[key] = dict(enumerate(replicas))
        if not self.scheduler.has(key):
            self.scheduler.add(key, self.config.batch(key), self._replicas[key])
            if self.config.warmup:
                await self._warm_up(key)

    async def _warm_up(self, key: str) -> None:
        """A first batch per replica at start, so the first requests do not pay for lazy set-up."""
        gray = torch.full((3, 64, 64), 128, dtype=torch.uint8)
        item: Any = (gray, 1) if key == "caption" else gray
        started = time.perf_counter()
        for index, model in self._replicas[key].items():
            await self.devices[index].run(model, [item])
        log.debug("model %s warmed up in %.2fs", key, time.perf_counter() - started)

    async def start(self) -> None:
        """Load the configured models once, before any request is taken."""
        if self.device_decode:
            self.scheduler.add("decode", self.config.batch("decode"),
                               {d.index: JpegDecoder(d.torch_device) for d in self.devices}, prepare_only=True)
        # The CPU's JPEG decoder imports torchvision's image codecs: now, not inside the first request.
        await self.off_loop(imaging.jpeg_decoder)
        for key in self.config.preload:
            await self._load(key)
        self.ready = True

    @functools.cached_property
    def device_decode(self) -> bool:
        """Whether JPEGs are decoded on the models' device (nvJPEG on a GPU); the rest takes Pillow.
        (The setting and the devices are fixed at construction; every decode asks.)"""
        choice = self.config.jpeg_decoder
        return choice == "device" or choice == "auto" and all(d.is_cuda for d in self.devices)

    async def model(self, key: str) -> Any:
        """The loaded model for `key` (its first replica), loading it on first use if it was not preloaded."""
        if not self.scheduler.has(key):
            lock = self._load_locks.setdefault(key, asyncio.Lock())
            async with lock:
                await self._load(key)
        return self._replicas[key][0]

    def model_infos(self) -> dict[str, ModelInfo]:
        return {key: replicas[0].info for key, replicas in self._replicas.items()}

    def batch_stats(self) -> dict[str, dict[str, Any]]:
        """Per model: calls, items, batch sizes and queue wait (for tests, benchmarks, /metrics)."""
        return self.scheduler.stats()

    def queued(self) -> dict[str, int]:
        return self.scheduler.queued()

    def device_stats(self) -> dict[str, dict[str, float]]:
        """Per device: batches run and seconds busy (a utilisation proxy for /metrics)."""
        return {d.name: {"batches": d.batches, "busy_s": d.busy_s} for d in self.devices}

    async def infer(self, key: str, item: Any, lane: str = LIVE) -> Timed:
        """Run one item (an image tensor, or a crop of one) through `key`'s batches."""
        await self.model(key)
        return await self.scheduler.submit(key, item, lane)

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU work (decoding, PNG encoding, classifier files) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu_executor, fn, *args)

    # -- images ---------------------------------------------------------------------------

    async def decode(self, data: bytes, config: DecodeConfig, lane: str = LIVE) -> imaging.DecodedImage:
        """Image bytes to an upright RGB tensor: JPEGs on the GPU in batches where there is one,
        everything else (and anything the device decoder refuses) by Pillow on a CPU thread.
        Concurrent requests for the same bytes share one decode. Raises ImageError."""
        # Hashing blocks the loop for about 1 ms per MB: larger images hash on a thread.
        sha256 = _sha256(data) if len(data) < (1 << 20) else await self.off_loop(_sha256, data)
        if self.reuse is None:
            return await self._decode(data, config, sha256, lane)
        if len(data) <= INLINE_DECODE_BYTES and not self.device_decode:
            # Decoded here and now, without an await: no other request can join it, so sharing it
            # would only cost a task, a shield and their callbacks.
            return self._decode_inline(data, config, sha256)
        pending = self._decoding.join(sha256, lane)
        if pending is None:
            pending = self._decoding.start(sha256, lambda: self._decode(data, config, sha256, lane), lane)
        return await asyncio.shield(pending)

    async def _decode(self, data: bytes, config: DecodeConfig, sha256: str, lane: str) -> imaging.DecodedImage:
        scheduler = self.scheduler
        with scheduler.decoding():
            if self.device_decode:
                with scheduler.reading_header():  # it may join the next decode batch
                    header = await self.off_loop(imaging.read_jpeg_header, data, config)
                if header is not None:
                    try:
                        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                        timed = await scheduler.submit("decode", encoded, lane)
                        pixels = imaging.apply_orientation(timed.value, header.orientation)
                        _, height, width = pixels.shape
                        return imaging.DecodedImage(pixels, width, height, sha256, "jpeg")
                    except Exception as exc:  # noqa: BLE001 - nvJPEG refuses some valid files: decode on the CPU
                        log.debug("device decode failed (%s); decoding with Pillow", exc)
            if len(data) <= INLINE_DECODE_BYTES:  # a thumbnail decodes faster than a thread hop takes
                return imaging.decode_image(data, config, sha256)
            return await self.off_loop(imaging.decode_image, data, config, sha256)

    def _decode_inline(self, data: bytes, config: DecodeConfig, sha256: str) -> imaging.DecodedImage:
        """`_decode` of a thumbnail on the CPU, which never waits: the same bookkeeping, no coroutine."""
        with self.scheduler.decoding():
            return imaging.decode_image(data, config, sha256)

    # -- requests -------------------------------------------------------------------------

    async def run(
        self,
        request: AnalysisRequest,
        image: imaging.DecodedImage | Image.Image,
        *,
        timings_ms: dict[str, float] | None = None,
        lane: str = LIVE,
    ) -> list[ResultEvent]:
        """Run every task of `request` on `image`; returns one result per task, in task order.

        `lane` "replay" marks low-priority work: it gets at most the scheduler's replay share of
        a batch while live work waits.
        """
        if isinstance(image, Image.Image):
            image = imaging.DecodedImage.from_pil(image)
        run = _RequestRun(self, request, image, dict(timings_ms or {}), lane)
        if len(request.tasks) == 1:  # most requests: no task and gather for the one task
            return [await run.result(request.tasks[0])]
        return list(await asyncio.gather(*(run.result(task) for task in request.tasks)))

    async def close(self) -> None:
        await self.scheduler.close()
        for device in self.devices:
            device.shutdown()
        self._cpu_executor.shutdown(wait=False, cancel_futures=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class JpegDecoder:
    """nvJPEG as a batched stage: a list of JPEG byte tensors in, uint8 3xHxW tensors on the GPU out."""

    key = "decode"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.info = ModelInfo(name="nvjpeg", weights="none")

    def collate(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        return items

    def forward(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        return list(decode_jpeg(batch, mode=ImageReadMode.RGB, device=self.device))


class _RequestRun:
    """One request's tasks and the stages they share."""

    def __init__(self, engine: Engine, request: AnalysisRequest, decoded: imaging.DecodedImage,
                 timings_ms: dict[str, float], lane: str) -> None:
        self.engine = engine
        self.request = request
        self.lane = lane
        self.decoded = decoded
        self.pixels = decoded.pixels
        self.timings_ms = timings_ms
        self.image_info = image_info(request, decoded.width, decoded.height, decoded.sha256)
        self._stages: dict[tuple, asyncio.Future] = {}
        self.started = time.perf_counter()

    async def _stage(self, key: tuple, make: Callable[[], Awaitable[Any]], clock: _TaskClock,
                     identity: Hashable | None = None) -> Any:
        """Run `make` once per request for `key`; every task that asks shares the answer.

        With `identity` (what else decides the outcome: the model's name and weights, a
        classifier's version) the stage is also shared across requests for the same image bytes.
        """
        future = self._stages.get(key)
        if future is None:
            self.engine.stage_counts[key[0]] += 1
            future = asyncio.ensure_future(self._shared(key, make, identity))
            self._stages[key] = future
        # shield: one task being cancelled must not cancel a stage its siblings wait on.
        value, kind = await asyncio.shield(future)
        if identity is not None:
            clock.sources[key] = kind
        if isinstance(value, Timed):
            if kind == "computed":  # reused work cost this request nothing
                clock.add(key, value)
            return value.value
        return value

    async def _shared(self, key: tuple, make: Callable[[], Awaitable[Any]],
                      identity: Hashable | None) -> tuple[Any, str]:
        reuse = self.engine.reuse
        if reuse is None or identity is None or self.decoded.sha256 is None:
            return await make(), "computed"
        return await reuse.share((self.decoded.sha256, key, identity), make, self.lane)

    async def _identity(self, model_key: str) -> tuple[str, str, int | None]:
        """What decides a model's outputs besides its input: name and weights (and the seed of random ones)."""
        info = (await self.engine.model(model_key)).info
        return (info.name, info.weights, self.engine.config.seed if info.weights == "random" else None)

    # -- stages ---------------------------------------------------------------------------

    async def crop(self, box: list[int], clock: _TaskClock) -> torch.Tensor:
        async def view() -> torch.Tensor:  # a view of the decoded pixels: no copy, no thread
            return imaging.crop(self.pixels, box)

        return await self._stage(("crop", tuple(box)), view, clock)

    async def crop_png(self, box: list[int], clock: _TaskClock) -> str:
        async def encode() -> str:
            return await self.engine.off_loop(imaging.png_base64, await self.crop(box, clock))

        return await self._stage(("png", tuple(box)), encode, clock, identity="png")

    async def prominent_person(self, min_score: float, clock: _TaskClock) -> list[int] | None:
        candidates = await self._stage(("person",), lambda: self.engine.infer("person", self.pixels, self.lane),
                                       clock, identity=await self._identity("person"))
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
            source = self.pixels if region is None else await self.crop(region, clock)
            timed = await self.engine.infer("face", source, self.lane)
            if region is None:
                return timed
            dx, dy = region[0], region[1]
            shifted = [(p, [b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy]) for p, b in timed.value]
            return Timed(shifted, timed.queue_ms, timed.compute_ms)

        key = ("face", face_context, tuple(region) if region else None)
        return self._best_box(await self._stage(key, detect, clock, identity=await self._identity("face")), min_score)

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
            source = self.pixels if box is None else await self.crop(box, clock)
            return await self.engine.infer(model_key, source, self.lane)

        return await self._stage(("embed", model_key, tuple(box) if box else None), embed, clock,
                                 identity=await self._identity(model_key))

    async def caption(self, box: list[int] | None, max_length: int, clock: _TaskClock) -> str:
        async def describe() -> Timed:
            source = self.pixels if box is None else await self.crop(box, clock)
            return await self.engine.infer("caption", (source, max_length), self.lane)

        return await self._stage(("caption", tuple(box) if box else None, max_length), describe, clock,
                                 identity=await self._identity("caption"))

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
        vector = np.asarray(await self.embedding(model_key, box, clock), dtype=np.float32)
        normalized = bool(params.get("normalize"))
        if normalized:
            vector = l2_normalize(vector)
        bbox, b64 = await self._crop_fields(box, params, clock)
        model = (await self.engine.model(model_key)).info
        # A float32 array: the codec writes it straight from numpy (no Python float per value).
        return _Outcome(data=vector, region=region, box=bbox, crop_base64=b64, model=model, normalized=normalized)

    async def classify(self, task: Task, params: dict[str, Any], clock: _TaskClock) -> _Outcome:
        store = self.engine.classifiers
        entry: ClassifierEntry = await self.engine.off_loop(store.entry, params["collection_id"])
        if params["target"] is not None and params["target"] != entry.region:
            raise InvalidParams(
                f"target '{params['target']}' contradicts the classifier of collection {entry.collection_id}, "
                f"which works on '{entry.region}'; omit target or use '{entry.region}'"
            )
        box, region = await self.region(task, entry.region, params, clock)
        # Always the raw embeddings, turned into the input the classifier was trained on (its record
        # says which parts are L2-normalised); the task's own `normalize` plays no part.
        vectors = [await self.embedding(EMBEDDING_MODELS[t], box, clock) for t in entry.embedding_types]
        infos = [(await self.engine.model(EMBEDDING_MODELS[t])).info for t in entry.embedding_types]
        features = entry.features(vectors, [info.weights for info in infos])
        # The classifier file's version and the weights of the embeddings it reads decide its answer.
        version = (await self.engine.off_loop(store.version, entry),
                   *[await self._identity(EMBEDDING_MODELS[t]) for t in entry.embedding_types])
        prediction = await self._stage(
            ("classify", entry.collection_id, tuple(box) if box else None, entry.embedding_type),
            lambda: self.engine.off_loop(store.predict, entry, features), clock, identity=version)
        weights = "+".join(info.weights for info in infos)
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
            reused = clock.reused
            if reused is not None:
                self.engine.reused[reused] += 1
            return task_result(
                self.request, task, "success", data=outcome.data, region=outcome.region, bbox=outcome.box,
                crop_base64=outcome.crop_base64, model=outcome.model, normalized=outcome.normalized,
                timings_ms=self._timings(clock),
                reused=reused is not None, **common,
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
