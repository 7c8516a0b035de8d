"""`imgstream sink pgvector`: the results topic into PostgreSQL + pgvector.

Records are collected into batches (up to N records or T ms), each batch is upserted by
event_id in one transaction, and only then are the batch's offsets committed. A crash
therefore redelivers (and the upsert absorbs the duplicate) but never loses a result.
While the database is unreachable the batch waits: the partitions are paused, the consumer
keeps polling (so it stays in its group) and reconnects are tried with capped backoff.
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

from imgstream.consumer.metrics import SinkMetrics
from imgstream.sink.pgstore import HnswParams, PgStore, RejectedEvent, Row, SourcePosition, WriteReport, row_from_event
from imgstream.service.signals import on_stop_signals
from imgstream.kafka_clients import BrokerUnreachable, check_login, open_consumer
from imgstream.schemas.codec import decode_result
from imgstream.schemas.config import KafkaConfig, SinkConfig

log = logging.getLogger("imgstream.sink")

POLL_MS = 200  # how often an idle sink looks at its stop flag
REASON_CHARS = 300  # log lines stay readable whatever a bad record holds
BACKOFF_START_S = 0.5
CONNECT_TIMEOUT_S = 10  # unless the DSN says otherwise: a host that drops packets must not hold a retry for minutes
BROKER_PROBE_INTERVAL_S = 2.0
BROKER_PROBE_TIMEOUT_S = 3.0
# The database cannot take writes now (down, restarting, failing over, or a standby that is read-only):
# the batch waits and is tried again. Any other database error is a bug or a setup problem.
UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ReadOnlySqlTransaction)

EXIT_DATABASE_GONE = 1


class DatabaseGaveUp(Exception):
    """The database stayed unreachable longer than `sink.db_give_up_s`."""


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
    """Records read but not yet written, with the partition each came from (a revoke drops its own)."""

    rows: list[tuple[TopicPartition, Row]] = field(default_factory=list)
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    read: Counter[TopicPartition] = field(default_factory=Counter)
    malformed: Counter[TopicPartition] = field(default_factory=Counter)
    rejected: Counter[TopicPartition] = field(default_factory=Counter)
    first_at: float | None = None

    @property
    def records(self) -> int:
        return sum(self.read.values())

    def drop(self, partitions: set[TopicPartition]) -> int:
        """Forget what was read from `partitions` (never committed: their next owner reads it again)."""
        dropped = sum(self.read[tp] for tp in partitions)
        self.rows = [(tp, row) for tp, row in self.rows if tp not in partitions]
        for tp in partitions:
            for counts in (self.read, self.malformed, self.rejected):
                counts.pop(tp, None)
            self.next_offsets.pop(tp, None)
        return dropped


class _FlushOnRevoke(ConsumerRebalanceListener):
    """Write and commit what was read from partitions before they go to another member."""

    def __init__(self, sink: PgVectorSink) -> None:
        self.sink = sink

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            await self.sink.release(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.sink.assigned(set(assigned))


class PgVectorSink:
    """Consumes the results topic into PostgreSQL; offsets are committed after the rows."""

    def __init__(self, kafka: KafkaConfig, sink: SinkConfig, dsn: str, metrics: SinkMetrics | None = None) -> None:
        self.kafka = kafka
        self.config = sink
        self.dsn = dsn
        self.stats = SinkStats()
        self.metrics = metrics or SinkMetrics()
        self.stopping = asyncio.Event()
        self.consumer: AIOKafkaConsumer | None = None
        self.store: PgStore | None = None
        self.broker_reachable = False
        self._batch = _Batch()
        self._pending: _Batch | None = None  # a batch the database could not take yet
        self._down_since: float | None = None  # monotonic time the database was found unreachable
        self._flush_lock = asyncio.Lock()
        self._positions: dict[TopicPartition, int] = {}  # committed offsets (what is written)
        self._ends: dict[TopicPartition, int] = {}  # end offsets from the broker probe
        self._hnsw = HnswParams(sink.hnsw_m, sink.hnsw_ef_construction)
        self._register_gauges()

    @property
    def database_reachable(self) -> bool:
        return self.store is not None and self._down_since is None

    def ready(self) -> dict[str, bool]:
        """/readyz: the sink can write (database) and read (broker)."""
        return {"database_reachable": self.database_reachable, "broker_reachable": self.broker_reachable}

    # -- lifecycle ------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        on_stop_signals(self.request_stop)

    def request_stop(self, why: str = "stop requested") -> None:
        if not self.stopping.is_set():
            log.info("stopping (%s): finishing the current batch", why)
            self.stopping.set()

    async def run(self) -> SinkStats:
        """Consume until `request_stop`; then write the last batch, commit and leave the group.

        Raises DatabaseGaveUp when the database stays unreachable past `sink.db_give_up_s`.
        """
        if not await self._open_store():
            return self.stats
        try:
            self.consumer = await self._connect_kafka()
            if self.consumer is None:
                return self.stats
            self.broker_reachable = True
            watch = asyncio.create_task(self._watch_broker(), name="sink-broker-watch")
            try:
                while not self.stopping.is_set():
                    if self._pending is not None:
                        await self._wait_for_database()
                    else:
                        await self._collect()
                        await self.flush()
                while await self.flush() and self._batch.records:
                    pass
                if self._pending is not None:
                    log.warning("stopping with %d records unwritten (the database is unreachable); they are "
                                "not committed and will be read again", self._pending.records + self._batch.records)
            finally:
                watch.cancel()
                await asyncio.wait([watch])
                await self.consumer.stop()
                self.broker_reachable = False
        finally:
            await self._close_store()
        log.info("stopped: %d records, %d rows written, %d malformed, %d rejected",
                 self.stats.records, self.stats.rows, self.stats.malformed, self.stats.rejected)
        return self.stats

    # -- the database: connect, lose, find again -------------------------------------------

    async def _open_store(self) -> bool:
        """Connect and create the schema, retrying with backoff while the database is not up yet."""
        delay = BACKOFF_START_S
        while not self.stopping.is_set():
            if await self._reconnect():
                return True
            self._check_give_up()
            await _sleep_unless(self.stopping, delay)
            delay = min(delay * 2, self.config.db_backoff_max_s)
        return False

    async def _reconnect(self) -> bool:
        """A fresh connection (the old one is closed); False, logged and counted, if the database is unreachable."""
        await self._close_store()
        try:
            store = await PgStore.connect(self._dsn_with_timeout(), self._hnsw)
        except UNAVAILABLE as exc:
            self._lost_database(exc, "connect")
            return False
        try:
            await store.ensure_schema()  # idempotent; a database restored from nothing gets its tables again
        except UNAVAILABLE as exc:
            await _close_quietly(store)
            self._lost_database(exc, "connect")
            return False
        except BaseException:
            await _close_quietly(store)
            raise
        self.store = store
        if self._pending is None:  # with a batch waiting, the database counts as back once it took the batch
            self._found_database()
        return True

    def _dsn_with_timeout(self) -> str:
        if "connect_timeout" in psycopg.conninfo.conninfo_to_dict(self.dsn):
            return self.dsn
        return psycopg.conninfo.make_conninfo(self.dsn, connect_timeout=CONNECT_TIMEOUT_S)

    async def _close_store(self) -> None:
        if self.store is not None:
            store, self.store = self.store, None
            await _close_quietly(store)

    def _lost_database(self, exc: BaseException, operation: str) -> None:
        """Count the failure; log the change to "unreachable" once, and each further failure at DEBUG only."""
        self.metrics.db_errors.labels(operation=operation).inc()
        if self._down_since is not None:
            log.debug("database still unreachable (%s): %s", operation, _short(exc))
            return
        self._down_since = time.monotonic()
        give_up = self.config.db_give_up_s
        log.warning("database unreachable (%s failed: %s); %s, retrying with backoff up to %.0f s %s",
                    operation, _short(exc),
                    "partitions paused, nothing is committed meanwhile" if self.consumer else "waiting for it",
                    self.config.db_backoff_max_s,
                    f"for at most {give_up:.0f} s" if give_up is not None else "for as long as it takes")

    def _found_database(self) -> None:
        if self._down_since is None:
            return
        waited = time.monotonic() - self._down_since
        self._down_since = None
        log.info("database reachable again after %.1f s", waited)

    def _check_give_up(self) -> None:
        limit = self.config.db_give_up_s
        if limit is not None and self._down_since is not None and time.monotonic() - self._down_since >= limit:
            raise DatabaseGaveUp(f"the database has been unreachable for {limit:.0f} s (sink.db_give_up_s); "
                                 "nothing unwritten was committed")

    async def _wait_for_database(self) -> None:
        """A batch waits for the database: partitions paused, polling on, reconnects with capped backoff."""
        delay = BACKOFF_START_S
        while not self.stopping.is_set() and self._pending is not None:
            self._check_give_up()
            await self._poll_paused(delay)
            if self.stopping.is_set():
                return
            self.metrics.db_retries.inc()
            if await self._reconnect() and await self.flush():
                break
            delay = min(delay * 2, self.config.db_backoff_max_s)
        if not self.stopping.is_set():
            self._resume_all()

    async def _poll_paused(self, seconds: float) -> None:
        """Call getmany for `seconds` with every assigned partition paused: heartbeats and max.poll.interval
        stay healthy, so the sink keeps its partitions."""
        assert self.consumer is not None
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            self._pause_all()  # every round: partitions assigned by a rebalance arrive unpaused
            fetched = await self.consumer.getmany(timeout_ms=max(1, min(POLL_MS, int(left * 1000))))
            for tp, records in fetched.items():  # fetched before the pause took hold: kept for the next batch
                for record in records:
                    self._take(tp, record)

    def _pause_all(self) -> None:
        assert self.consumer is not None
        todo = self.consumer.assignment() - self.consumer.paused()
        if todo:
            try:
                self.consumer.pause(*todo)
            except IllegalStateError:  # the assignment changed under us; the next round sees the new one
                pass

    def _resume_all(self) -> None:
        assert self.consumer is not None
        paused = self.consumer.paused() & self.consumer.assignment()
        if paused:
            try:
                self.consumer.resume(*paused)
            except IllegalStateError:
                pass

    # -- Kafka ----------------------------------------------------------------------------

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

    async def _watch_broker(self) -> None:
        """Probe the broker now and then (end offsets of the assignment, for the lag, or metadata); log changes."""
        assert self.consumer is not None
        while True:
            await asyncio.sleep(BROKER_PROBE_INTERVAL_S)
            try:
                await asyncio.wait_for(self._probe(), BROKER_PROBE_TIMEOUT_S)
                reachable, why = True, ""
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                reachable, why = False, _short(exc) or type(exc).__name__
            if reachable != self.broker_reachable:
                if reachable:
                    log.info("broker %s reachable again", self.kafka.bootstrap)
                else:
                    log.warning("broker %s unreachable (%s); the consumer keeps retrying", self.kafka.bootstrap, why)
            self.broker_reachable = reachable

    async def _probe(self) -> None:
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        if not assigned:
            await self.consumer.topics()
            return
        self._ends.update(await self.consumer.end_offsets(list(assigned)))
        # Where a partition starts, until this sink commits on it: the group's offset, else the beginning.
        unknown = assigned - set(self._positions)
        starts = {tp: await self.consumer.committed(tp) for tp in unknown}
        fresh = [tp for tp, offset in starts.items() if offset is None]
        if fresh:
            starts.update(await self.consumer.beginning_offsets(fresh))
        for tp, offset in starts.items():
            if tp in self.consumer.assignment():
                self._positions.setdefault(tp, offset)

    def assigned(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:  # another member may have committed further since this sink last had them
            self._positions.pop(tp, None)
            self._ends.pop(tp, None)
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    async def release(self, revoked: set[TopicPartition]) -> None:
        """Before partitions go: write and commit what was read from them. With the database down, let it go
        instead (it was never committed, so their next owner reads it again) rather than hold up the rebalance."""
        if self.database_reachable:
            await self.flush()
        if not self.database_reachable:
            dropped = self._batch.drop(revoked)
            if self._pending is not None:
                dropped += self._pending.drop(revoked)
                if not self._pending.records:
                    self._pending = None
            log.info("partitions revoked while the database is unreachable: %d unwritten records left to "
                     "their next owner", dropped)

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
            fetched = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max(1, limit - batch.records))
            for tp, records in fetched.items():
                for record in records:
                    self._take(tp, record)

    def _take(self, tp: TopicPartition, record: Any) -> None:
        batch = self._batch
        if batch.first_at is None:
            batch.first_at = time.monotonic()
        batch.read[tp] += 1
        batch.next_offsets[tp] = record.offset + 1
        where = f"{tp.topic}[{tp.partition}]@{record.offset}"
        try:
            if record.value is None:
                raise ValueError("record has no value (tombstone)")
            event = decode_result(record.value)
        except Exception as exc:  # noqa: BLE001 - nothing on the topic may stop the sink
            batch.malformed[tp] += 1
            log.warning("skipping malformed record %s: %s", where, _short(exc))
            return
        try:
            batch.rows.append((tp, row_from_event(event, SourcePosition(tp.topic, tp.partition, record.offset))))
        except Exception as exc:  # noqa: BLE001 - RejectedEvent, or a field the JSON writer refuses
            batch.rejected[tp] += 1
            kind = "" if isinstance(exc, RejectedEvent) else f"{type(exc).__name__}: "
            log.warning("skipping result %s (%s): %s%s", _short(event.event_id), where, kind, _short(exc))

    # -- writing and committing -----------------------------------------------------------

    async def flush(self) -> bool:
        """Write the waiting batch, else the current one, in one transaction, then commit its offsets.

        False when the database is unreachable: the batch waits (uncommitted) for `_wait_for_database`.
        """
        async with self._flush_lock:
            if self._pending is not None:
                batch = self._pending
            else:
                batch, self._batch = self._batch, _Batch()
                if batch.records == 0:
                    return True
            if self.store is None:
                self._pending = batch
                return False
            started = time.perf_counter()
            try:
                report = await self.store.write([row for _, row in batch.rows])
            except UNAVAILABLE as exc:
                self._pending = batch
                self._lost_database(exc, "write")
                return False
            db_ms = (time.perf_counter() - started) * 1000.0
            self._pending = None
            self._found_database()
            await self._commit(batch.next_offsets)
            self._account(batch, report, db_ms)
            return True

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
            self.metrics.commits.labels(outcome="failed").inc()
            log.warning("offset commit failed (%s); the records will be redelivered and upserted again", exc)
            return
        if owned:
            self.metrics.commits.labels(outcome="ok").inc()
        self._positions.update(owned)

    def _account(self, batch: _Batch, report: WriteReport, db_ms: float) -> None:
        stats, m = self.stats, self.metrics
        records, malformed = batch.records, sum(batch.malformed.values())
        rejected = sum(batch.rejected.values()) + len(report.rejected)
        stats.batches += 1
        stats.records += records
        stats.rows += report.rows
        stats.malformed += malformed
        stats.rejected += rejected
        stats.rows_by_table.update(report.written)
        m.batches.inc()
        m.write_ms.observe(db_ms)
        m.records.labels(outcome="written").inc(records - malformed - rejected)
        m.records.labels(outcome="malformed").inc(malformed)
        m.records.labels(outcome="rejected").inc(rejected)
        for table, n in report.written.items():
            m.rows.labels(table=table).inc(n)
        for event_id, why in report.rejected:
            log.warning("database rejected result %s: %s", event_id, _short(why))
        tables = ", ".join(f"{t} {n}" for t, n in sorted(report.written.items())) or "none"
        log.info("batch %d: %d records -> %d rows (%s), %d skipped, db %.0f ms, lag %s; total %d rows",
                 stats.batches, records, report.rows, tables, malformed + rejected, db_ms, self._lag(), stats.rows)

    # -- observability --------------------------------------------------------------------

    def _lag_by_partition(self) -> dict[TopicPartition, int]:
        """Records on the assigned partitions not yet written: the end (the last fetch's high watermark or the
        probe's end offset, whichever is further) minus the committed offset."""
        if self.consumer is None:
            return {}
        lag = {}
        for tp in self.consumer.assignment():
            position = self._positions.get(tp)
            ends = [end for end in (self.consumer.highwater(tp), self._ends.get(tp)) if end is not None]
            if position is not None and ends:
                lag[tp] = max(0, max(ends) - position)
        return lag

    def _lag(self) -> int:
        return sum(self._lag_by_partition().values())

    def _register_gauges(self) -> None:
        m = self.metrics
        m.add_gauge("imgstream_sink_consumer_lag", "Records of each assigned results partition not yet written "
                    "(end offset minus committed offset).",
                    lambda: [({"topic": tp.topic, "partition": str(tp.partition)}, n)
                             for tp, n in self._lag_by_partition().items()])
        m.add_gauge("imgstream_sink_db_up", "1 while the database takes writes; 0 while it is unreachable.",
                    lambda: [({}, 1 if self.database_reachable else 0)])
        m.add_gauge("imgstream_sink_broker_reachable", "1 when the last broker probe succeeded.",
                    lambda: [({}, 1 if self.broker_reachable else 0)])
        m.add_gauge("imgstream_sink_records_waiting", "Records read but not yet written (the current batch, and "
                    "one waiting for the database).",
                    lambda: [({}, self._batch.records + (self._pending.records if self._pending else 0))])
        m.add_gauge("imgstream_sink_partitions_paused", "Assigned partitions paused while the database is down.",
                    lambda: [({}, len(self.consumer.paused()) if self.consumer else 0)])


def _short(exc: BaseException | str) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS] + "..."


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def _close_quietly(store: PgStore) -> None:
    try:
        await store.close()
    except Exception:  # noqa: BLE001 - a connection already lost has nothing left to close cleanly
        pass


async def run_sink(kafka: KafkaConfig, sink: SinkConfig) -> int:
    """The `imgstream sink pgvector` command: start the embedded database if no DSN, serve the HTTP port,
    then sink until a signal."""
    await check_login(kafka)  # a refused login or certificate ends the start now, before the database waits
    embedded = None
    dsn = sink.database_uri()
    if dsn is None:
        from imgstream.sink.embedded_pg import start_embedded_postgres

        embedded = await asyncio.to_thread(start_embedded_postgres, sink.data_dir)
        dsn = embedded.uri
        print(f"embedded PostgreSQL with pgvector\n  data dir: {embedded.data_dir}\n  dsn: {dsn}", flush=True)
    sink_loop = PgVectorSink(kafka, sink, dsn)
    sink_loop.install_signal_handlers()
    runner = None
    if sink.http_port is not None:
        from imgstream.service.health import build_app, start_server

        runner = await start_server(build_app(sink_loop.metrics, sink_loop.ready, operations=False),
                                    sink.http_port, sink.http_host)
    try:
        await sink_loop.run()
    except DatabaseGaveUp as exc:
        log.error("giving up: %s", exc)
        return EXIT_DATABASE_GONE
    finally:
        if runner is not None:
            await runner.cleanup()
    return 0


def main(kafka: KafkaConfig, sink: SinkConfig, log_level: str = "INFO") -> int:
    from imgstream.service.logs import setup_logging

    setup_logging(log_level)
    return asyncio.run(run_sink(kafka, sink))
