"""`imgstream submit`: publish analysis requests for files, folders and URLs; optionally wait."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from imgstream.blobs import BlobStore, file_sha256
from imgstream.kafka_clients import KafkaLike, kafka_settings, open_consumer, open_producer
from imgstream.schemas.codec import decode_result, encode
from imgstream.schemas.config import KafkaConfig
from imgstream.schemas.events import AnalysisRequest, ImageRef, ResultEvent, Task, utc_now

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def parse_task_spec(spec: str) -> Task:
    """`TYPE[:TARGET]` -> a Task whose operation_id is the spec itself."""
    op_type, _, target = spec.partition(":")
    if not op_type:
        raise ValueError(f"bad --task {spec!r}: expected TYPE[:TARGET]")
    return Task(operation_id=spec, type=op_type, params={"target": target} if target else {})


def parse_tasks_json(text: str) -> list[Task]:
    raw = orjson.loads(text)
    if not isinstance(raw, list):
        raise ValueError("--tasks-json must be a JSON list of tasks")
    return [Task.model_validate(item) for item in raw]


def find_images(folder: Path) -> list[Path]:
    """Every image below `folder` (recursive), whatever the case of its extension, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_input_list(stream: TextIO) -> list[str]:
    """One path or URL per line; blank lines and # comments are ignored."""
    return [line.strip() for line in stream if line.strip() and not line.lstrip().startswith("#")]


@dataclass(frozen=True)
class ImageInput:
    """What the user named (a path or URL), the reference that travels in the request, and its
    partition key: the image's URL, or a local file's sha256, so that every request for one image
    lands on one partition and so on one worker, which then reuses its work on that image."""

    source: str
    ref: ImageRef
    key: str

    @classmethod
    def of_file(cls, path: Path, store: BlobStore | None) -> ImageInput:
        ref = store.put_file(path) if store is not None else path.resolve().as_uri()
        return cls(str(path), ImageRef(blob=ref), file_sha256(path))


def expand_inputs(inputs: Iterable[str], store: BlobStore | None = None) -> list[ImageInput]:
    """URLs stay URLs; files (and images inside folders) go to the blob store and travel as references.

    Without a store, local files are referenced in place (file://), for volumes the workers share.
    """
    out: list[ImageInput] = []
    for item in inputs:
        if item.lower().startswith(("http://", "https://")):
            out.append(ImageInput(item, ImageRef(url=item), item))
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            files = find_images(path)
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"no such file, folder or URL: {item}")
        out.extend(ImageInput.of_file(file, store) for file in files)
    return out


@dataclass(frozen=True)
class Outgoing:
    """A request and the key it is published under (its image's: see ImageInput.key)."""

    request: AnalysisRequest
    key: str


def build_requests(images: list[ImageInput], tasks: list[Task], metadata: dict[str, Any] | None = None,
                   prefix: str = "submit") -> list[Outgoing]:
    """One request per image; ids are `<prefix>-<batch>:<n>`, unique per invocation."""
    batch = uuid.uuid4().hex[:12]
    return [
        Outgoing(AnalysisRequest(request_id=f"{prefix}-{batch}:{i}", image=image.ref, tasks=tasks, metadata=metadata,
                                 submitted_at=utc_now()), image.key)
        for i, image in enumerate(images)
    ]


@dataclass
class Waiter:
    """Collects results for known request ids from a results consumer fixed before producing."""

    expected: dict[str, set[str]]
    results: dict[str, ResultEvent] = field(default_factory=dict)

    @property
    def missing(self) -> int:
        return sum(len(ops) for ops in self.expected.values()) - len(self.results)

    def offer(self, result: ResultEvent) -> bool:
        ops = self.expected.get(result.request_id)
        if ops is None or result.operation_id not in ops or result.event_id in self.results:
            return False
        self.results[result.event_id] = result
        return True


async def _fixed_results_consumer(kafka: KafkaConfig, topic: str) -> AIOKafkaConsumer:
    """A group-less consumer positioned at the current end of the results topic.

    The position is resolved before any request is produced, so no result can slip past.
    """
    consumer = await open_consumer(kafka, role="submit", auto_offset_reset="earliest")
    partitions = consumer.partitions_for_topic(topic)
    deadline = time.monotonic() + 10
    while not partitions and time.monotonic() < deadline:
        await consumer.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await asyncio.sleep(0.2)
    if not partitions:
        await consumer.stop()
        raise RuntimeError(f"results topic {topic!r} does not exist on {kafka.bootstrap}; run "
                           "`imgstream topics create`")
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)  # resolves the lazy seek now
    return consumer


class Progress:
    """Progress on stderr: a bar on a terminal, a line every few seconds otherwise (logs)."""

    LOG_EVERY_S = 5.0

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled, self.done = label, total, enabled, 0
        self.tty = sys.stderr.isatty()
        self._last_line = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.tty:
            width = 30
            filled = int(width * self.done / max(1, self.total))
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
            sys.stderr.flush()
        elif time.monotonic() - self._last_line >= self.LOG_EVERY_S:
            self._last_line = time.monotonic()
            print(f"{self.label}: {self.done}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
        elif self.enabled:
            print(f"{self.label}: {self.done}/{self.total}", file=sys.stderr, flush=True)


async def submit(kafka: KafkaLike, requests_topic: str, results_topic: str, outgoing: list[Outgoing], *,
                 wait: bool, timeout_s: float, progress: bool = True) -> tuple[list[ResultEvent], int]:
    """Publish the requests, keyed by image; with `wait`, return their results and how many are still missing."""
    kafka = kafka_settings(kafka)
    requests = [o.request for o in outgoing]
    consumer = await _fixed_results_consumer(kafka, results_topic) if wait else None
    try:
        producer = await open_producer(kafka, role="submit")
    except BaseException:
        if consumer is not None:
            await consumer.stop()
        raise
    try:
        bar = Progress("submitting", len(requests), progress)
        sends = [await producer.send(requests_topic, key=o.key.encode(), value=encode(o.request)) for o in outgoing]
        for fut in asyncio.as_completed(sends):
            await fut
            bar.advance()
        bar.close()
    finally:
        await producer.stop()
    if consumer is None:
        return [], 0
    waiter = Waiter({r.request_id: {t.operation_id for t in r.tasks} for r in requests})
    bar = Progress("waiting", waiter.missing, progress)
    deadline = time.monotonic() + timeout_s
    try:
        while waiter.missing and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    try:
                        result = decode_result(record.value)
                    except ValueError:
                        continue
                    if waiter.offer(result):
                        bar.advance()
    finally:
        bar.close()
        await consumer.stop()
    order = {(r.request_id, t.operation_id): i for i, (r, t) in
             enumerate((r, t) for r in requests for t in r.tasks)}
    results = sorted(waiter.results.values(), key=lambda e: order.get((e.request_id, e.operation_id), 0))
    return results, waiter.missing


def summarise(result: ResultEvent) -> str:
    """One readable line per result."""
    model = f"  ({result.model.name}, weights={result.model.weights})" if result.model else ""
    region = f"  region={result.region}" if result.region else ""
    return f"{result.request_id}  {result.operation_id}  {result.status}  {_detail(result)}{region}{model}"


def _detail(result: ResultEvent) -> str:
    if result.status != "success":
        return f"{result.error_code}: {result.error_message}"
    data = result.data
    if result.type == "detect_bounding_box":
        return f"box {data}" if data is not None else "nothing found"
    if isinstance(data, list):
        return f"{len(data)}-d embedding"
    if isinstance(data, dict) and "probability" in data:
        return f"in collection: {data['is_in_collection']} (p={data['probability']:.3f}, threshold {data['threshold']})"
    return str(data)


def results_table(results: list[ResultEvent], sources: dict[str, str] | None = None, width: int = 60) -> str:
    """A readable table: one row per result."""
    sources = sources or {}
    header = ("image", "operation", "status", "result", "region", "weights")
    rows = [header]
    for r in results:
        image = sources.get(r.request_id) or (r.image.url or r.image.blob if r.image else r.request_id) or ""
        detail = _detail(r)
        rows.append((
            _clip_left(str(image), 40), r.operation_id, r.status,
            detail if len(detail) <= width else detail[: width - 3] + "...",
            r.region or "", r.model.weights if r.model else "",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _clip_left(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]
