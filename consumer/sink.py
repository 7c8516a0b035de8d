"""`imgstream sink pgvector`: the results topic into PostgreSQL + pgvector.

Records are collected into batches (up to N records or T ms), each batch is upserted by
event_id in one transaction, and only then are the batch's offsets committed. A crash
therefore redelivers (and the upsert absorbs the duplicate) but never loses a result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from consumer.pgstore import HnswParams, PgStore, RejectedEvent, Row, SourcePosition, WriteReport, row_from_event
from consumer.signals import on_stop_signals
from kafka_clients import BrokerUnreachable, check_login, open_consumer
from schemas.codec import decode_result
from schemas.config import KafkaConfig, SinkConfig

log = logging.getLogger("imgstream.sink")

POLL_MS = 200  # how often an idle sink looks at its stop flag
DB_ATTEMPTS = 6
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
class _Batch:
    rows: list[Row] = field(default_factory=list)
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    records: int = 0
    malformed: int = 0
    rejected: int = 0
    first_at: float | None = None


class _FlushOnRevoke(ConsumerRebalanceListener):
    """Write and commit what was read from partitions before they go to another member."""

    def __init__(self, sink: PgVectorSink) -> None:
        self.sink = sink

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            await self.sink.flush()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class PgVectorSink:
    """Consumes the results topic into PostgreSQL; offsets are committed after the rows."""

    def __init__(self, kafka: KafkaConfig, sink: SinkConfig, dsn: str) -> None:
        self.kafka = kafka
        self.config = sink
        self.dsn = dsn
        self.stats = SinkStats()
        self.stopping = asyncio.Event()
        self.consumer: AIOKafkaConsumer | None = None
        self.store: PgStore | None = None
        self._batch = _Batch()
        self._flush_lock = asyncio.Lock()
        self._positions: dict[TopicPartition, int] = {}
        self._hnsw = HnswParams(sink.hnsw_m, sink.hnsw_ef_construction)

    # -- lifecycle ------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        on_stop_signals(self.request_stop)

    def request_stop(self, why: str = "stop requested") -> None:
        if not self.stopping.is_set():
            log.info("stopping (%s): finishing the current batch", why)
            self.stopping.set()

    async def run(self) -> SinkStats:
        """Consume until `request_stop`; then write the last batch, commit and leave the group."""
        self.store = await self._connect_db()
        if self.store is None:
            return self.stats
        try:
            await self.store.ensure_schema()
            self.consumer = await self._connect_kafka()
            if self.consumer is None:
                return self.stats
            try:
                while not self.stopping.is_set():
                    await self._collect()
                    await self.flush()
                await self.flush()
            finally:
                await self.consumer.stop()
        finally:
            await self.store.close()
        log.info("stopped: %d records, %d rows written, %d malformed, %d rejected",
                 self.stats.records, self.stats.rows, self.stats.malformed, self.stats.rejected)
        return self.stats

    async def _connect_db(self) -> PgStore | None:
        """Connect, retrying with backoff while the database is not up yet (e.g. starting beside us)."""
        delay = 0.5
        while not self.stopping.is_set():
            try:
                return await PgStore.connect(self.dsn, self._hnsw)
            except psycopg.OperationalError as exc:
                log.warning("database unreachable (%s); retrying in %.1fs", _short(exc), delay)
                await _sleep_unless(self.stopping, delay)
                delay = min(delay * 2, 30.0)
        return None

    async def _connect_kafka(self) -> AIOKafkaConsumer | None:
        """Join the sink's group, retrying while the broker is unreachable; a refused login or
        certificate (KafkaSetupError) is raised: retrying cannot fix it."""
        k, delay = self.kafka, 0.5
        while not self.stopping.is_set():
            try:
                consumer = await open_consumer(k, k.topics.results, role="sink", group_id=self.config.group,
                                               listener=_FlushOnRevoke(self),
                                               max_poll_records=self.config.batch_max_records)
            except BrokerUnreachable as exc:
                log.warning("broker %s unreachable (%s); retrying in %.1fs", k.bootstrap, exc, delay)
                await _sleep_unless(self.stopping, delay)
                delay = min(delay * 2, 30.0)
                continue
            log.info("consuming %s from %s as group %s (batches of up to %d records or %.0f ms)",
                     k.topics.results, k.bootstrap, self.config.group, self.config.batch_max_records,
                     self.config.batch_max_ms)
            return consumer
        return None

    # -- reading --------------------------------------------------------------------------

    async def _collect(self) -> None:
        """Read until the batch is full, its time is up, or a stop is requested."""
        assert self.consumer is not None
        limit, max_wait_s = self.config.batch_max_records, self.config.batch_max_ms / 1000.0
        while not self.stopping.is_set():
            batch = self._batch
            if batch.first_at is not None:
                left_s = batch.first_at + max_wait_s - time.monotonic()
                if batch.records >= limit or left_s <= 0:
                    return
                timeout_ms = max(1, min(POLL_MS, int(left_s * 1000)))
            else:
                timeout_ms = POLL_MS
            fetched = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=limit - batch.records)
            for tp, records in fetched.items():
                for record in records:
                    self._take(tp, record)

    def _take(self, tp: TopicPartition, record: Any) -> None:
        batch = self._batch
        if batch.first_at is None:
            batch.first_at = time.monotonic()
        batch.records += 1
        batch.next_offsets[tp] = record.offset + 1
        where = f"{tp.topic}[{tp.partition}]@{record.offset}"
        try:
            if record.value is None:
                raise ValueError("record has no value (tombstone)")
            event = decode_result(record.value)
        except Exception as exc:  # noqa: BLE001 - nothing on the topic may stop the sink
            batch.malformed += 1
            log.warning("skipping malformed record %s: %s", where, _short(exc))
            return
        try:
            batch.rows.append(row_from_event(event, SourcePosition(tp.topic, tp.partition, record.offset)))
        except RejectedEvent as exc:
            batch.rejected += 1
            log.warning("skipping result %s (%s): %s", _short(event.event_id), where, _short(exc))

    # -- writing and committing -----------------------------------------------------------

    async def flush(self) -> None:
        """Write the current batch in one transaction, then commit its offsets."""
        async with self._flush_lock:
            batch, self._batch = self._batch, _Batch()
            if batch.records == 0:
                return
            started = time.perf_counter()
            report = await self._write(batch.rows)
            db_ms = (time.perf_counter() - started) * 1000.0
            await self._commit(batch.next_offsets)
            self._account(batch, report, db_ms)

    async def _write(self, rows: list[Row]) -> WriteReport:
        """Upsert, reconnecting while the database is unreachable (offsets wait; nothing is lost)."""
        assert self.store is not None
        delay = 0.5
        for attempt in range(1, DB_ATTEMPTS + 1):
            try:
                return await self.store.write(rows)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if attempt == DB_ATTEMPTS:
                    raise
                log.warning("database write failed (%s); reconnecting in %.1fs (attempt %d of %d)",
                            _short(exc), delay, attempt, DB_ATTEMPTS)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                await self.store.close()
                try:
                    self.store = await PgStore.connect(self.dsn, self._hnsw)
                    await self.store.refresh_embedding_tables()
                except psycopg.OperationalError as again:
                    log.warning("reconnect failed: %s", _short(again))
        raise AssertionError("unreachable")

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        owned = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        try:
            if owned:
                await self.consumer.commit(owned)
        except (KafkaError, IllegalStateError) as exc:
            # The partitions moved on: their new owner rereads these records and the upsert absorbs them.
            self.stats.commits_failed += 1
            log.warning("offset commit failed (%s); the records will be redelivered and upserted again", exc)
            return
        self._positions.update(owned)

    def _account(self, batch: _Batch, report: WriteReport, db_ms: float) -> None:
        stats = self.stats
        stats.batches += 1
        stats.records += batch.records
        stats.rows += report.rows
        stats.malformed += batch.malformed
        stats.rejected += batch.rejected + len(report.rejected)
        stats.rows_by_table.update(report.written)
        for event_id, why in report.rejected:
            log.warning("database rejected result %s: %s", event_id, _short(why))
        tables = ", ".join(f"{t} {n}" for t, n in sorted(report.written.items())) or "none"
        skipped = batch.malformed + batch.rejected + len(report.rejected)
        log.info("batch %d: %d records -> %d rows (%s), %d skipped, db %.0f ms, lag %s; total %d rows",
                 stats.batches, batch.records, report.rows, tables, skipped, db_ms, self._lag(), stats.rows)

    def _lag(self) -> int | str:
        """Records on the assigned partitions not yet written (from the last fetch's high watermark)."""
        assert self.consumer is not None
        lag = 0
        for tp in self.consumer.assignment():
            high, position = self.consumer.highwater(tp), self._positions.get(tp)
            if high is None or position is None:
                continue
            lag += max(0, high - position)
        return lag


def _short(exc: BaseException | str) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS] + "..."


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def run_sink(kafka: KafkaConfig, sink: SinkConfig) -> int:
    """The `imgstream sink pgvector` command: start the embedded database if no DSN, then sink until a signal."""
    await check_login(kafka)  # a refused login or certificate ends the start now, before the database waits
    embedded = None
    dsn = sink.dsn
    if dsn is None:
        from consumer.embedded_pg import start_embedded_postgres

        embedded = await asyncio.to_thread(start_embedded_postgres, sink.data_dir)
        dsn = embedded.uri
        print(f"embedded PostgreSQL with pgvector\n  data dir: {embedded.data_dir}\n  dsn: {dsn}", flush=True)
    sink_loop = PgVectorSink(kafka, sink, dsn)
    sink_loop.install_signal_handlers()
    await sink_loop.run()
    return 0


def main(kafka: KafkaConfig, sink: SinkConfig, log_level: str = "INFO") -> int:
    from consumer.logs import setup_logging

    setup_logging(log_level)
    return asyncio.run(run_sink(kafka, sink))
