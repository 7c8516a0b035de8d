"""A sink batch: the records read from the results topic and not yet written, as rows, with where each came
from (a revoke drops its own partitions' records) and the offsets to commit once they are written."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from imgstream.kafka_clients import brief
from imgstream.schemas.codec import decode_result
from imgstream.sink.rows import RejectedEvent, Row, SourcePosition, row_from_event

log = logging.getLogger("imgstream.sink")

REASON_CHARS = 300  # log lines stay readable whatever a bad record holds


@dataclass
class SinkStats:
    """Running totals, for the progress line and for tests."""

    records: int = 0
    rows: int = 0
    malformed: int = 0  # records that are not ResultEvents
    rejected: int = 0  # ResultEvents the database cannot take (bad vector, wrong dimension, bad text)
    batches: int = 0
    commits_failed: int = 0
    rows_by_table: Counter[str] = field(default_factory=Counter)


@dataclass
class Batch:
    """Records read but not yet written, with the partition each came from."""

    rows: list[tuple[TopicPartition, Row]] = field(default_factory=list)
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    read: Counter[TopicPartition] = field(default_factory=Counter)
    malformed: Counter[TopicPartition] = field(default_factory=Counter)
    rejected: Counter[TopicPartition] = field(default_factory=Counter)
    first_at: float | None = None
    traced: bool = False  # keep each record's headers, for the batch's span to link to their traces
    traces: list[tuple[TopicPartition, Any]] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(self.read.values())

    def take(self, tp: TopicPartition, record: Any) -> None:
        """Add one record as a row; one that is not a result event, or that the database cannot take, is
        logged and counted (its offset is committed like the rest: nothing on the topic stops the sink)."""
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.read[tp] += 1
        self.next_offsets[tp] = record.offset + 1
        if self.traced and record.headers:
            self.traces.append((tp, record.headers))
        where = f"{tp.topic}[{tp.partition}]@{record.offset}"
        try:
            if record.value is None:
                raise ValueError("record has no value (tombstone)")
            event = decode_result(record.value)
        except Exception as exc:  # noqa: BLE001 - nothing on the topic may stop the sink
            self.malformed[tp] += 1
            log.warning("skipping malformed record %s: %s", where, brief(exc, REASON_CHARS))
            return
        try:
            self.rows.append((tp, row_from_event(event, SourcePosition(tp.topic, tp.partition, record.offset))))
        except Exception as exc:  # noqa: BLE001 - RejectedEvent, or a field the JSON writer refuses
            self.rejected[tp] += 1
            kind = "" if isinstance(exc, RejectedEvent) else f"{type(exc).__name__}: "
            log.warning("skipping result %s (%s): %s%s", brief(event.event_id, REASON_CHARS), where, kind,
                        brief(exc, REASON_CHARS))

    def drop(self, partitions: set[TopicPartition]) -> int:
        """Forget what was read from `partitions` (never committed: their next owner reads it again)."""
        dropped = sum(self.read[tp] for tp in partitions)
        self.rows = [(tp, row) for tp, row in self.rows if tp not in partitions]
        self.traces = [(tp, headers) for tp, headers in self.traces if tp not in partitions]
        for tp in partitions:
            for counts in (self.read, self.malformed, self.rejected):
                counts.pop(tp, None)
            self.next_offsets.pop(tp, None)
        return dropped
