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
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from imgstream.kafka_clients import BrokerUnreachable, brief, open_consumer
from imgstream.schemas.config import KafkaConfig, SinkConfig
from imgstream.service.retry import Backoff, retry, sleep_unless
from imgstream.service.signals import on_stop_signals
from imgstream.service.tracing import NO_TRACING, Tracing
from imgstream.sink.batch import Batch, SinkStats
from imgstream.sink.database import UNAVAILABLE, Database
from imgstream.sink.metrics import SinkMetrics
from imgstream.sink.report import account, register_gauges

log = logging.getLogger("imgstream.sink")

POLL_MS = 200  # how often an idle sink looks at its stop flag
BROKER_PROBE_INTERVAL_S = 2.0
BROKER_PROBE_TIMEOUT_S = 3.0


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

    def __init__(self, kafka: KafkaConfig, sink: SinkConfig, dsn: str, metrics: SinkMetrics | None = None,
                 tracing: Tracing = NO_TRACING) -> None:
        self.kafka = kafka
        self.tracing = tracing
        self.config = sink
        self.dsn = dsn
        self.stats = SinkStats()
        self.metrics = metrics or SinkMetrics()
        self.stopping = asyncio.Event()
        self.consumer: AIOKafkaConsumer | None = None
        self.db = Database(dsn, sink, self.metrics)
        self.broker_reachable = False
        self.batch = Batch(traced=tracing.enabled)  # what is being read
        self.pending: Batch | None = None  # a batch the database could not take yet
        self._flush_lock = asyncio.Lock()
        self.positions: dict[TopicPartition, int] = {}  # committed offsets (what is written)
        self.ends: dict[TopicPartition, int] = {}  # end offsets from the broker probe
        register_gauges(self)

    @property
    def database_reachable(self) -> bool:
        return self.db.reachable

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
                    if self.pending is not None:
                        await self._wait_for_database()
                    else:
                        await self._collect()
                        await self.flush()
                while await self.flush() and self.batch.records:
                    pass
                if self.pending is not None:
                    log.warning("stopping with %d records unwritten (the database is unreachable); they are "
                                "not committed and will be read again", self.pending.records + self.batch.records)
            finally:
                watch.cancel()
                await asyncio.wait([watch])
                await self.consumer.stop()
                self.broker_reachable = False
        finally:
            await self.db.close()
        log.info("stopped: %d records, %d rows written, %d malformed, %d rejected",
                 self.stats.records, self.stats.rows, self.stats.malformed, self.stats.rejected)
        return self.stats

    # -- the database: connect, lose, find again -------------------------------------------

    async def _open_store(self) -> bool:
        """Connect and create the schema, retrying with backoff while the database is not up yet."""
        for delay in Backoff(max_s=self.config.db_backoff_max_s).delays():
            if self.stopping.is_set():
                return False
            if await self.db.reconnect():
                return True
            self.db.check_give_up()
            await sleep_unless(self.stopping, delay)
        return False

    async def _wait_for_database(self) -> None:
        """A batch waits for the database: partitions paused, polling on, reconnects with capped backoff."""
        for delay in Backoff(max_s=self.config.db_backoff_max_s).delays():
            if self.stopping.is_set() or self.pending is None:
                break
            self.db.check_give_up()
            await self._poll_paused(delay)
            if self.stopping.is_set():
                return
            self.metrics.db_retries.inc()
            if await self.db.reconnect(batch_waiting=True) and await self.flush():
                break
        if not self.stopping.is_set():
            self._resume_all()

    async def _poll_paused(self, seconds: float) -> None:
        """Call getmany for `seconds` with every assigned partition paused: heartbeats and max.poll.interval
        stay healthy, so the sink keeps its partitions."""
        assert self.consumer is not None
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            self._pause_all()  # every round: partitions assigned by a rebalance arrive unpaused
            # Records fetched before the pause took hold are kept for the next batch.
            self._take(await self.consumer.getmany(timeout_ms=max(1, min(POLL_MS, int(left * 1000)))))

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
        k = self.kafka

        def unreachable(attempt: int, exc: BaseException, delay: float) -> None:
            log.warning("broker %s unreachable (attempt %d: %s); retrying in %.1fs", k.bootstrap, attempt,
                        brief(exc), delay)

        consumer = await retry(lambda: open_consumer(k, k.topics.results, role="sink", group_id=self.config.group,
                                                     listener=_FlushOnRevoke(self),
                                                     max_poll_records=self.config.batch_max_records),
                               retry_on=(BrokerUnreachable,), stop=self.stopping, on_retry=unreachable)
        if consumer is not None:
            log.info("consuming %s from %s as group %s (batches of up to %d records or %.0f ms)",
                     k.topics.results, k.bootstrap, self.config.group, self.config.batch_max_records,
                     self.config.batch_max_ms)
        return consumer

    async def _watch_broker(self) -> None:
        """Probe the broker now and then (end offsets of the assignment, for the lag, or metadata); log changes."""
        assert self.consumer is not None
        while True:
            await asyncio.sleep(BROKER_PROBE_INTERVAL_S)
            try:
                await asyncio.wait_for(self._probe(), BROKER_PROBE_TIMEOUT_S)
                reachable, why = True, ""
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                reachable, why = False, brief(exc, 300)
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
        self.ends.update(await self.consumer.end_offsets(list(assigned)))
        # Where a partition starts, until this sink commits on it: the group's offset, else the beginning.
        unknown = assigned - set(self.positions)
        starts = {tp: await self.consumer.committed(tp) for tp in unknown}
        fresh = [tp for tp, offset in starts.items() if offset is None]
        if fresh:
            starts.update(await self.consumer.beginning_offsets(fresh))
        for tp, offset in starts.items():
            if tp in self.consumer.assignment():
                self.positions.setdefault(tp, offset)

    def assigned(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:  # another member may have committed further since this sink last had them
            self.positions.pop(tp, None)
            self.ends.pop(tp, None)
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    async def release(self, revoked: set[TopicPartition]) -> None:
        """Before partitions go: write and commit what was read from them. With the database down, let it go
        instead (it was never committed, so their next owner reads it again) rather than hold up the rebalance."""
        if self.database_reachable:
            await self.flush()
        if not self.database_reachable:
            dropped = self.batch.drop(revoked)
            if self.pending is not None:
                dropped += self.pending.drop(revoked)
                if not self.pending.records:
                    self.pending = None
            log.info("partitions revoked while the database is unreachable: %d unwritten records left to "
                     "their next owner", dropped)

    # -- reading --------------------------------------------------------------------------

    async def _collect(self) -> None:
        """Read until the batch is full, its time is up, or a stop is requested."""
        assert self.consumer is not None
        limit, max_wait_s = self.config.batch_max_records, self.config.batch_max_ms / 1000.0
        while not self.stopping.is_set():
            batch = self.batch
            if batch.first_at is not None:
                left_s = batch.first_at + max_wait_s - time.monotonic()
                if batch.records >= limit or left_s <= 0:
                    return
                timeout_ms = max(1, min(POLL_MS, int(left_s * 1000)))
            else:
                timeout_ms = POLL_MS
            self._take(await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max(1, limit - batch.records)))

    def _take(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        """Records from getmany into the batch. A revoke during the wait may have written that batch (`release`)
        and begun a new one: they go to the one current now; a partition no longer ours is its next owner's."""
        assert self.consumer is not None
        batch, owned = self.batch, self.consumer.assignment()
        for tp, records in fetched.items():
            if tp in owned:
                for record in records:
                    batch.take(tp, record)

    # -- writing and committing -----------------------------------------------------------

    async def flush(self) -> bool:
        """Write the waiting batch, else the current one, in one transaction, then commit its offsets.

        False when the database is unreachable: the batch waits (uncommitted) for `_wait_for_database`.
        """
        async with self._flush_lock:
            if self.pending is not None:
                batch = self.pending
            else:
                batch, self.batch = self.batch, Batch(traced=self.tracing.enabled)
                if batch.records == 0:
                    return True
            if self.db.store is None:
                self.pending = batch
                return False
            # One span per batch written, linked to the trace of each result in it (tracing on).
            with self.tracing.consumed(self.kafka.topics.results, self.config.group,
                                       [headers for _, headers in batch.traces], batch.records):
                started = time.perf_counter()
                try:
                    report = await self.db.store.write([row for _, row in batch.rows])
                except UNAVAILABLE as exc:
                    self.pending = batch
                    self.db.lost(exc, "write", consuming=self.consumer is not None)
                    return False
                db_ms = (time.perf_counter() - started) * 1000.0
                self.pending = None
                self.db.found()
                await self._commit(batch.next_offsets)
            account(self, batch, report, db_ms)
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
        self.positions.update(owned)
