"""`imgstream submit`: publish analysis requests for files, folders and URLs; optionally wait."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.codec import decode_result, encode
from schemas.events import AnalysisRequest, ImageRef, ResultEvent, Task, utc_now

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


def expand_inputs(inputs: Iterable[str]) -> list[ImageRef]:
    """URLs stay URLs; files become file:// references; folders are walked for images."""
    refs: list[ImageRef] = []
    for item in inputs:
        if item.lower().startswith(("http://", "https://")):
            refs.append(ImageRef(url=item))
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            refs.extend(ImageRef(blob=p.resolve().as_uri()) for p in sorted(path.rglob("*"))
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            refs.append(ImageRef(blob=path.resolve().as_uri()))
        else:
            raise FileNotFoundError(f"no such file, folder or URL: {item}")
    return refs


def build_requests(refs: list[ImageRef], tasks: list[Task], metadata: dict[str, Any] | None = None,
                   prefix: str = "submit") -> list[AnalysisRequest]:
    batch = uuid.uuid4().hex[:12]
    return [
        AnalysisRequest(request_id=f"{prefix}-{batch}:{i}", image=ref, tasks=tasks, metadata=metadata,
                        submitted_at=utc_now())
        for i, ref in enumerate(refs)
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


async def _fixed_results_consumer(bootstrap: str, topic: str) -> AIOKafkaConsumer:
    """A group-less consumer positioned at the current end of the results topic.

    The position is resolved before any request is produced, so no result can slip past.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    partitions = consumer.partitions_for_topic(topic)
    deadline = time.monotonic() + 10
    while not partitions and time.monotonic() < deadline:
        await consumer.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await asyncio.sleep(0.2)
    if not partitions:
        await consumer.stop()
        raise RuntimeError(f"results topic {topic!r} does not exist on {bootstrap}; run `imgstream topics create`")
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)  # resolves the lazy seek now
    return consumer


class Progress:
    """A one-line progress display on stderr (only when it is a terminal)."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled, self.done = label, total, enabled and sys.stderr.isatty(), 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.enabled:
            width = 30
            filled = int(width * self.done / max(1, self.total))
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


async def submit(bootstrap: str, requests_topic: str, results_topic: str, requests: list[AnalysisRequest], *,
                 wait: bool, timeout_s: float, progress: bool = True) -> tuple[list[ResultEvent], int]:
    """Publish `requests`; with `wait`, return their results and how many are still missing."""
    consumer = await _fixed_results_consumer(bootstrap, results_topic) if wait else None
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        bar = Progress("submitting", len(requests), progress)
        sends = [await producer.send(requests_topic, key=r.request_id.encode(), value=encode(r)) for r in requests]
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
    head = f"{result.request_id}  {result.operation_id}  {result.status}"
    if result.status != "success":
        return f"{head}  {result.error_code}: {result.error_message}"
    data = result.data
    if isinstance(data, list) and data and isinstance(data[0], float):
        detail = f"embedding of {len(data)} floats [{', '.join(f'{v:.4f}' for v in data[:3])}, ...]"
    elif result.type == "detect_bounding_box":
        detail = f"box {data}" if data is not None else "nothing found"
    else:
        detail = repr(data)
    model = f"  ({result.model.name}, weights={result.model.weights})" if result.model else ""
    region = f"  region={result.region}" if result.region else ""
    return f"{head}  {detail}{region}{model}"
