"""`imgstream replay`: re-publish selected requests to the replay topic after a model change.

Selection reads the requests topic with a group-less consumer (nothing is committed), by
time range, offsets and/or request_id prefix, up to the end it saw when it started.
Replayed requests keep their request_id (so results keep their event_id and a sink
replaces rows instead of adding them) and carry `replay_of`, so their results say
`"replayed": true`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition

from imgstream.kafka_clients import KafkaLike, kafka_settings, open_consumer, open_producer
from imgstream.schemas.codec import InvalidEvent, decode_request, encode
from imgstream.schemas.events import AnalysisRequest, Task

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """Which requests to replay; every given criterion must hold."""

    since: datetime | None = None
    until: datetime | None = None
    offsets: dict[int, tuple[int, int | None]] = field(default_factory=dict)  # partition -> [start, end)
    request_id_prefix: str | None = None
    limit: int | None = None

    def offset_range(self, partition: int) -> tuple[int, int | None] | None:
        if not self.offsets:
            return (0, None)
        return self.offsets.get(partition)

    def matches(self, request: AnalysisRequest, timestamp_ms: int) -> bool:
        if self.since is not None and timestamp_ms < self.since.timestamp() * 1000:
            return False
        if self.until is not None and timestamp_ms >= self.until.timestamp() * 1000:
            return False
        if self.request_id_prefix is not None and not request.request_id.startswith(self.request_id_prefix):
            return False
        return True


def parse_offsets(spec: str) -> dict[int, tuple[int, int | None]]:
    """`P:START[-END]` items, comma separated, e.g. `0:100-200,1:50-` (END exclusive, open if empty)."""
    out: dict[int, tuple[int, int | None]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        partition, sep, span = item.partition(":")
        start, _, end = span.partition("-")
        if not sep or not partition.isdigit() or not start.isdigit() or (end and not end.isdigit()):
            raise ValueError(f"bad offsets item {item!r}: expected PARTITION:START[-END]")
        out[int(partition)] = (int(start), int(end) if end else None)
    return out


@dataclass
class ReplayReport:
    scanned: int = 0
    selected: int = 0
    invalid: int = 0
    published: int = 0


async def _start_positions(consumer: AIOKafkaConsumer, tps: list[TopicPartition], selection: Selection) -> None:
    """Seek each partition to the first offset the selection can match."""
    times = {}
    if selection.since is not None:
        times = await consumer.offsets_for_times({tp: int(selection.since.timestamp() * 1000) for tp in tps})
    for tp in tps:
        start = selection.offset_range(tp.partition)[0]  # type: ignore[index]
        found = times.get(tp)
        # Some brokers answer 0 (not None) for a time past the end; records are re-checked by time anyway.
        if found is not None and found.offset > start:
            start = found.offset
        consumer.seek(tp, start)


async def select_requests(kafka: KafkaLike, topic: str, selection: Selection, idle_timeout_s: float = 5.0,
                          progress: bool = True) -> tuple[list[tuple[str, AnalysisRequest]], ReplayReport]:
    """Read `topic` up to the end seen at start and return (origin, request) pairs that match."""
    report = ReplayReport()
    kafka = kafka_settings(kafka)
    # Group-less: nothing is committed, the workers' group is untouched; always from the selection's start.
    consumer = await open_consumer(kafka, role="replay", auto_offset_reset="earliest")
    selected: list[tuple[str, AnalysisRequest]] = []
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise RuntimeError(f"topic {topic!r} does not exist on {kafka.bootstrap}")
        tps = [TopicPartition(topic, p) for p in sorted(partitions) if selection.offset_range(p) is not None]
        if not tps:
            return selected, report
        consumer.assign(tps)
        await _start_positions(consumer, tps, selection)
        # The end: each partition's high watermark from fetch responses (end_offsets() can under-report),
        # fixed the first time it is seen so requests published meanwhile are not chased forever.
        ends: dict[TopicPartition, int] = {}
        done: set[TopicPartition] = set()
        last_record = time.monotonic()
        last_log = time.monotonic()
        while len(done) < len(tps):
            batches = await consumer.getmany(timeout_ms=500)
            for tp in tps:
                high = consumer.highwater(tp)
                if high is not None and tp not in ends:
                    ends[tp] = high
            for tp, records in batches.items():
                last_record = time.monotonic()
                stop_at = selection.offset_range(tp.partition)[1]  # type: ignore[index]
                for record in records:
                    if record.offset >= ends.get(tp, record.offset + 1) or (stop_at is not None and record.offset >= stop_at):
                        done.add(tp)
                        break
                    report.scanned += 1
                    try:
                        request = decode_request(record.value)
                    except InvalidEvent:
                        report.invalid += 1
                        continue
                    if selection.matches(request, record.timestamp):
                        selected.append((f"{tp.topic}/{tp.partition}/{record.offset}", request))
                        report.selected += 1
                        if selection.limit is not None and report.selected >= selection.limit:
                            return selected, report
            for tp in tps:
                end = ends.get(tp)
                stop_at = selection.offset_range(tp.partition)[1]  # type: ignore[index]
                position = await consumer.position(tp)
                if end is not None and (position >= end or (stop_at is not None and position >= stop_at)):
                    done.add(tp)
            if progress and time.monotonic() - last_log > 5:
                last_log = time.monotonic()
                print(f"replay: scanned {report.scanned}, selected {report.selected}", file=sys.stderr, flush=True)
            if time.monotonic() - last_record > idle_timeout_s:
                log.info("replay: no records for %.0fs; stopping the scan", idle_timeout_s)
                break
    finally:
        await consumer.stop()
    return selected, report


def rewrite(origin: str, request: AnalysisRequest, tasks: list[Task] | None) -> AnalysisRequest:
    """The replayed form: same request_id, optionally new tasks, marked with where it came from."""
    data = request.model_dump()
    data["replay_of"] = origin
    if tasks:
        data["tasks"] = [t.model_dump() for t in tasks]
    return AnalysisRequest.model_validate(data)  # re-validated: the new tasks obey the same rules


async def replay(kafka: KafkaLike, requests_topic: str, replay_topic: str, selection: Selection,
                 tasks: list[Task] | None, *, dry_run: bool = False,
                 progress: bool = True) -> tuple[list[AnalysisRequest], ReplayReport]:
    selected, report = await select_requests(kafka, requests_topic, selection, progress=progress)
    replayed = [rewrite(origin, request, tasks) for origin, request in selected]
    if dry_run or not replayed:
        return replayed, report
    producer = await open_producer(kafka, role="replay")
    try:
        sends = [await producer.send(replay_topic, key=r.request_id.encode(), value=encode(r)) for r in replayed]
        await asyncio.gather(*sends)
        report.published = len(sends)
    finally:
        await producer.stop()
    return replayed, report
