"""The worker: consume requests -> fetch + decode -> engine -> publish -> commit watermark."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from analysis import imaging
from analysis.engine import Engine
from analysis.results import error_results, image_info
from consumer.fetch import ImageFetcher
from consumer.logs import request_id_var
from consumer.metrics import WorkerMetrics
from consumer.offsets import OffsetTracker
from consumer.publish import CropStore, Publisher, fit_result
from schemas.codec import InvalidEvent, decode_request
from schemas.config import WorkerConfig
from schemas.events import DeadLetter

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.5
POLL_TIMEOUT_MS = 200


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.release(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class Worker:
    """Owns the consumer, producer, fetcher and engine; processes requests until stopped."""

    def __init__(self, config: WorkerConfig, engine: Engine, metrics: WorkerMetrics | None = None) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics or WorkerMetrics()
        self.tracker = OffsetTracker()
        self.crops = CropStore(config.blobs.dir)
        self.stopping = asyncio.Event()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.publisher: Publisher | None = None
        self.fetcher: ImageFetcher | None = None
        self._tasks: dict[tuple[TopicPartition, int], asyncio.Task] = {}
        self._paused = False
        self._positions: dict[TopicPartition, int] = {}
        self._last_commit = 0.0
        self.connected = False
        self._register_gauges()

    # -- lifecycle ------------------------------------------------------------------------

    async def _connect(self) -> None:
        """Start producer and consumer, retrying with backoff while the broker is unreachable."""
        k = self.config.kafka
        delay = 0.5
        while not self.stopping.is_set():
            producer = AIOKafkaProducer(
                bootstrap_servers=k.bootstrap, client_id=f"{k.client_id}-producer", acks="all",
                max_request_size=k.max_message_bytes, linger_ms=5,
            )
            consumer = AIOKafkaConsumer(
                bootstrap_servers=k.bootstrap, group_id=k.group, client_id=f"{k.client_id}-consumer",
                enable_auto_commit=False, auto_offset_reset="earliest",
                session_timeout_ms=k.session_timeout_ms, max_poll_interval_ms=k.max_poll_interval_ms,
                heartbeat_interval_ms=max(1000, k.session_timeout_ms // 3),
            )
            try:
                await producer.start()
                await consumer.start()
            except (KafkaConnectionError, KafkaError, OSError) as exc:
                log.warning("broker %s unreachable (%s); retrying in %.1fs", k.bootstrap, exc, delay)
                await _quietly(producer.stop())
                await _quietly(consumer.stop())
                try:
                    await asyncio.wait_for(self.stopping.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, 30.0)
                continue
            consumer.subscribe([k.topics.requests, k.topics.replay], listener=_Rebalance(self))
            self.producer, self.consumer = producer, consumer
            self.publisher = Publisher(producer, k.topics.results, k.topics.dlq)
            self.connected = True
            log.info("connected to %s as group %s; consuming %s and %s",
                     k.bootstrap, k.group, k.topics.requests, k.topics.replay)
            return

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)

    def request_stop(self, why: str = "stop requested") -> None:
        if not self.stopping.is_set():
            log.info("%s: draining in-flight requests (deadline %.0fs)", why, self.config.drain_timeout_s)
            self.stopping.set()

    async def run(self) -> None:
        """Consume until `request_stop`; then drain, commit and close."""
        async with ImageFetcher(self.config.fetch) as fetcher:
            self.fetcher = fetcher
            await self._connect()
            if self.consumer is None:
                return
            try:
                await self._consume()
            finally:
                await self._shutdown()

    async def _consume(self) -> None:
        assert self.consumer is not None
        while not self.stopping.is_set():
            self._apply_backpressure()
            try:
                batches = await self.consumer.getmany(timeout_ms=POLL_TIMEOUT_MS,
                                                      max_records=self.config.max_in_flight)
            except KafkaError as exc:
                log.warning("poll failed: %s; retrying", exc)
                await asyncio.sleep(1.0)
                continue
            for tp, records in batches.items():
                for record in records:
                    self._start(tp, record)
                if records:
                    self._positions[tp] = records[-1].offset + 1
            await self.commit()

    def _apply_backpressure(self) -> None:
        """Pause every assigned partition at the in-flight bound; polling goes on (heartbeats)."""
        assert self.consumer is not None
        busy = self.tracker.in_flight() >= self.config.max_in_flight
        if busy and not self._paused:
            self.consumer.pause(*self.consumer.assignment())
            self._paused = True
            log.debug("paused: %d requests in flight", self.tracker.in_flight())
        elif not busy and self._paused:
            self.consumer.resume(*self.consumer.assignment())
            self._paused = False

    def _start(self, tp: TopicPartition, record: Any) -> None:
        self.tracker.start(tp, record.offset)
        task = asyncio.create_task(self._process(tp, record), name=f"req-{tp.topic}-{tp.partition}-{record.offset}")
        self._tasks[(tp, record.offset)] = task
        task.add_done_callback(lambda _t, key=(tp, record.offset): self._tasks.pop(key, None))

    # -- one request ----------------------------------------------------------------------

    async def _process(self, tp: TopicPartition, record: Any) -> None:
        assert self.publisher is not None
        started = time.perf_counter()
        self.metrics.requests.inc(topic=tp.topic)
        try:
            request = decode_request(record.value)
        except InvalidEvent as exc:
            letter = DeadLetter(reason=exc.reason, error_code=exc.code, source_topic=tp.topic,
                                source_partition=tp.partition, source_offset=record.offset)
            log.warning("%s[%d]@%d to DLQ: %s", tp.topic, tp.partition, record.offset, exc.reason)
            await self.publisher.dead_letter(record.key, record.value, letter)
            self.metrics.dlq.inc(reason=exc.code)
            self.tracker.finish(tp, record.offset)
            return
        request_id_var.set(request.request_id)
        results = await self._analyse(request)
        payloads = []
        for result in results:
            payload, offloaded = fit_result(result, self.config.kafka.max_message_bytes, self.crops)
            payloads.append(payload)
            if offloaded:
                self.metrics.crops_offloaded.inc()
        await self.publisher.results(request.request_id, payloads)
        for result in results:
            self.metrics.results.inc(status=result.status, error_code=result.error_code or "")
        self.tracker.finish(tp, record.offset)
        self.metrics.request_ms.observe((time.perf_counter() - started) * 1000.0)
        log.info("request %s: %d results (%s)", request.request_id, len(results),
                 ", ".join(f"{r.operation_id}={r.status}" for r in results))

    async def _analyse(self, request: Any) -> list[Any]:
        """Fetch and decode the image once, then run every task through the engine."""
        assert self.fetcher is not None
        timings: dict[str, float] = {}
        try:
            fetched = await self.fetcher.fetch(request.image)
            timings["fetch"] = fetched.elapsed_ms
            self.metrics.fetch_ms.observe(fetched.elapsed_ms)
            t0 = time.perf_counter()
            decoded = await asyncio.to_thread(imaging.decode_image, fetched.data, self.config.decode)
            timings["decode"] = (time.perf_counter() - t0) * 1000.0
        except imaging.ImageError as exc:
            log.info("request %s: %s: %s", request.request_id, exc.code, exc)
            return error_results(request, exc.code, str(exc), image=image_info(request), timings_ms=timings)
        return await self.engine.run(request, decoded, timings_ms=timings)

    # -- commits, rebalances, shutdown ----------------------------------------------------

    async def commit(self, partitions: set[TopicPartition] | None = None, force: bool = False) -> None:
        """Commit the watermark of each partition (all finished below it), at most every 0.5 s."""
        if self.consumer is None:
            return
        now = time.monotonic()
        if not force and now - self._last_commit < COMMIT_INTERVAL_S:
            return
        self._last_commit = now
        assigned = self.consumer.assignment()
        offsets = {tp: o for tp, o in self.tracker.to_commit(partitions).items() if tp in assigned}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            self.metrics.commits.inc(outcome="failed")
            log.warning("commit failed (%s); the next commit retries", exc)
            return
        self.tracker.committed(offsets)
        self.metrics.commits.inc(outcome="ok")

    async def _drain(self, tasks: list[asyncio.Task], deadline_s: float) -> int:
        """Wait for `tasks` up to the deadline; cancel what is left and return how many."""
        if not tasks:
            return 0
        done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        return len(pending)

    async def release(self, revoked: set[TopicPartition]) -> None:
        """On revoke: finish what can finish within the deadline, commit, abandon the rest."""
        if not revoked:
            return
        tasks = [t for (tp, _), t in list(self._tasks.items()) if tp in revoked]
        abandoned = await self._drain(tasks, self.config.drain_timeout_s)
        await self.commit(revoked, force=True)
        self.tracker.forget(revoked)
        for tp in revoked:
            self._positions.pop(tp, None)
        log.info("partitions revoked: %s; %d requests finished, %d abandoned to the new owner",
                 sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked), len(tasks) - abandoned, abandoned)

    async def _shutdown(self) -> None:
        abandoned = await self._drain(list(self._tasks.values()), self.config.drain_timeout_s)
        if abandoned:
            log.warning("shutdown: %d requests abandoned at the deadline; they will be redone", abandoned)
        await self.commit(force=True)
        if self.consumer is not None:
            await _quietly(self.consumer.stop())
        if self.producer is not None:
            await _quietly(self.producer.stop())
        self.connected = False
        log.info("worker stopped")

    # -- observability --------------------------------------------------------------------

    def _register_gauges(self) -> None:
        m = self.metrics
        m.add_gauge("imgstream_requests_in_flight", "Requests being processed.",
                    lambda: [({}, self.tracker.in_flight())])
        m.add_gauge("imgstream_consumer_lag", "Messages behind the partition's high watermark.", self._lag)
        m.add_gauge("imgstream_model_batches", "Model calls (batches) per model.",
                    lambda: [({"model": k}, s["calls"]) for k, s in self.engine.batch_stats().items()])
        m.add_gauge("imgstream_model_items", "Items run per model.",
                    lambda: [({"model": k}, s["items"]) for k, s in self.engine.batch_stats().items()])
        m.add_gauge("imgstream_model_mean_batch_size", "Mean batch size per model.",
                    lambda: [({"model": k}, s["mean_batch"]) for k, s in self.engine.batch_stats().items()])
        m.add_gauge("imgstream_model_queue_wait_ms_sum", "Total time items waited for a batch, per model.",
                    lambda: [({"model": k}, s["queue_wait_ms_total"]) for k, s in self.engine.batch_stats().items()])
        m.add_gauge("imgstream_model_queue_depth", "Items waiting in each model's batcher.",
                    lambda: [({"model": k}, v) for k, v in self.engine.queued().items()])

    def _lag(self) -> list[tuple[dict[str, str], float]]:
        # highwater() is read from fetch responses: end_offsets() can under-report on some brokers.
        if self.consumer is None:
            return []
        out = []
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            position = self._positions.get(tp)
            if high is not None and position is not None:
                out.append(({"topic": tp.topic, "partition": str(tp.partition)}, max(0, high - position)))
        return out


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except Exception:  # noqa: BLE001 - best effort while closing
        pass
