"""The worker, the application that wires its rooms: consume requests -> fetch + decode -> engine ->
publish -> commit watermark.

It owns the Kafka clients and the fetcher; `Intake` (consumer/intake.py) polls and starts requests,
`RequestHandler` (consumer/handling.py) answers each, `Checkpoint` (consumer/checkpoint.py) tracks offsets,
commits and rebalances, `Lifecycle` (consumer/lifecycle.py) says when and why to stop. It connects
(retrying while the broker is unreachable), runs, drains, commits and closes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from imgstream.analysis.engine import Engine
from imgstream.consumer.blob_readers import FileBlobReader
from imgstream.consumer.checkpoint import Checkpoint
from imgstream.consumer.deferred import DeferredRetries
from imgstream.consumer.fetch import ImageFetcher
from imgstream.consumer.handling import RequestHandler
from imgstream.consumer.image_budget import ImageBudget
from imgstream.consumer.intake import Intake
from imgstream.consumer.lifecycle import Lifecycle
from imgstream.consumer.metrics import WorkerMetrics
from imgstream.consumer.offsets import OffsetTracker
from imgstream.consumer.publish import Publisher
from imgstream.consumer.report import register_gauges, report_periodically
from imgstream.consumer.s3_reader import S3BlobReader
from imgstream.kafka_clients import BrokerUnreachable, KafkaSetupError, brief, open_consumer, open_producer
from imgstream.schemas.config import WorkerConfig
from imgstream.service.retry import retry
from imgstream.service.signals import on_stop_signals
from imgstream.service.tracing import NO_TRACING, Tracing

log = logging.getLogger(__name__)

BROKER_PROBE_INTERVAL_S = 2.0
BROKER_PROBE_TIMEOUT_S = 3.0
CLOSE_TIMEOUT_S = 5.0


class Worker:
    """Owns the consumer, producer, fetcher and engine; processes requests until stopped."""

    def __init__(self, config: WorkerConfig, engine: Engine, metrics: WorkerMetrics | None = None,
                 tracing: Tracing = NO_TRACING) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics or WorkerMetrics()
        self.tracing = tracing
        self.lifecycle = Lifecycle(config)
        self.images = ImageBudget(config.max_in_flight_image_bytes,
                                  worst_case=config.fetch.max_bytes + 3 * config.decode.max_pixels)
        self.retries = DeferredRetries(config.fetch, config.kafka.topics.retry)
        # Replay items take at most this share of a model batch while live items wait.
        engine.scheduler.set_replay_share(config.replay_share)
        # Model batches are traced while tracing is on, and never otherwise (an engine may outlive its worker).
        engine.scheduler.tracer = tracing if tracing.enabled else None
        room_freed = asyncio.Event()
        self.checkpoint = Checkpoint(config, self.metrics, self.lifecycle, self.retries)
        self.handler = RequestHandler(config, engine, self.metrics, self.images, self.retries, self.lifecycle,
                                      room_freed)
        self.handler.tracing = tracing
        self.intake = Intake(config, self.checkpoint, self.handler, self.images, self.retries, self.lifecycle,
                             room_freed)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.connected = False
        self.broker_reachable = False
        self._watcher: asyncio.Task | None = None
        self._reporter: asyncio.Task | None = None
        register_gauges(self)

    # -- what the rooms hold, by the names tests and the report use ---------------------------

    @property
    def tracker(self) -> OffsetTracker:
        return self.checkpoint.tracker

    @property
    def fetcher(self) -> ImageFetcher | None:
        return self.handler.fetcher

    @property
    def publisher(self) -> Publisher | None:
        return self.handler.publisher

    @property
    def stopping(self) -> asyncio.Event:
        return self.lifecycle.stopping

    @property
    def failure(self) -> KafkaSetupError | None:
        """Why the worker stopped itself (it then exits non-zero), or None."""
        return self.lifecycle.failure

    @property
    def replay_slots(self) -> int:
        return self.intake.replay_slots

    def in_flight_by_lane(self) -> dict[str, int]:
        return self.intake.in_flight_by_lane()

    async def _analyse(self, request: Any, lane: str = "live", attempt: Any = None) -> list[Any]:
        return await self.handler.analyse(request, lane, attempt)

    @property
    def rebalance_timeout_ms(self) -> int:
        return max(self.config.kafka.session_timeout_ms, int((self.config.revoke_timeout_s + 5.0) * 1000))

    # -- lifecycle ------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        on_stop_signals(self.request_stop)

    def request_stop(self, why: str = "stop requested") -> None:
        self.lifecycle.request_stop(why)

    async def run(self) -> None:
        """Consume until `request_stop`; then drain, commit and close."""
        async with ImageFetcher(self.config.fetch, tracing=self.tracing) as fetcher:
            blobs = self.config.blobs
            files = FileBlobReader(self.config.file_blob_roots(), reads=self.config.fetch.blob_reads)
            log.info("file:// blobs are read %s (fetch.blob_reads: %s)",
                     "on the event loop" if files.inline else "in a thread pool", self.config.fetch.blob_reads)
            fetcher.register_blob_reader("file", files)
            fetcher.register_blob_reader("s3", S3BlobReader(blobs.s3_endpoint_url, blobs.s3_region,
                                                            self.config.s3_blob_scopes()))
            self.handler.fetcher = fetcher
            await self._connect()
            if self.consumer is None:
                return
            self._watcher = asyncio.create_task(self._watch_broker(), name="broker-watch")
            if self.config.report_interval_s > 0:
                self._reporter = asyncio.create_task(report_periodically(self), name="worker-report")
            try:
                await self.intake.run()
            finally:
                await self._shutdown()

    async def _connect(self) -> None:
        """Start producer and consumer, retrying with backoff while the broker is unreachable.

        Settings the cluster refuses (login, certificate, permission) are not retried: the worker
        stops with `failure` saying what to change.
        """
        k = self.config.kafka

        def unreachable(attempt: int, exc: BaseException, delay: float) -> None:
            log.warning("broker %s unreachable (attempt %d: %s); retrying in %.1fs", k.bootstrap, attempt,
                        brief(exc), delay)

        try:
            clients = await retry(lambda: self._unless_stopping(self._open_clients()), retry_on=(BrokerUnreachable,),
                                  stop=self.stopping, on_retry=unreachable)
        except KafkaSetupError as exc:
            self.lifecycle.fail(exc)
            return
        if clients is None:
            return
        self.producer, self.consumer = clients
        self.checkpoint.consumer = self.intake.consumer = self.consumer
        self.handler.publisher = Publisher(self.producer, k.topics.results, k.topics.dlq, k.max_message_bytes,
                                           retry_topic=k.topics.retry, batch_linger_s=k.producer.linger_ms / 1000)
        self.connected = self.broker_reachable = True
        log.info("connected to %s (%s) as group %s; consuming %s, %s and %s", k.bootstrap,
                 k.security_protocol, k.group, k.topics.requests, k.topics.replay, k.topics.retry)

    async def _open_clients(self) -> tuple[AIOKafkaProducer, AIOKafkaConsumer]:
        k = self.config.kafka
        producer = await open_producer(k, role="producer")
        try:
            consumer = await open_consumer(
                k, k.topics.requests, k.topics.replay, k.topics.retry, role="consumer", group_id=k.group,
                listener=self.checkpoint.listener(),
                # The group waits this long for members to rejoin; aiokafka's default (the session
                # timeout) would evict a member still draining its revoked partitions.
                rebalance_timeout_ms=self.rebalance_timeout_ms)
        except BaseException:
            await _quietly(asyncio.wait_for(producer.stop(), CLOSE_TIMEOUT_S))
            raise
        return producer, consumer

    async def _unless_stopping(self, coro: Any) -> Any:
        """`coro`'s result, or None if a stop is requested first (a broker that drops packets
        can hold a connection attempt for the whole request timeout)."""
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
            return None
        return task.result()

    # -- commits, rebalances and shutdown belong to the checkpoint ------------------------

    async def commit(self, partitions: set[TopicPartition] | None = None, force: bool = False) -> None:
        await self.checkpoint.commit(partitions, force)

    async def release(self, revoked: set[TopicPartition]) -> None:
        await self.checkpoint.release(revoked)

    async def _shutdown(self) -> None:
        abandoned = await self.checkpoint.drain(list(self.checkpoint.tasks.values()), self.config.drain_timeout_s)
        if abandoned:
            self.metrics.abandoned.inc(abandoned)
            log.warning("shutdown: %d requests abandoned unfinished; they will be redone", abandoned)
        await self.checkpoint.commit(force=True)
        for task in (self._watcher, self._reporter):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        # Closing talks to the broker (leave group, flush); a broker that went away must not hang the exit.
        if self.consumer is not None:
            await _quietly(asyncio.wait_for(self.consumer.stop(), CLOSE_TIMEOUT_S))
        if self.producer is not None:
            if self.handler.publisher is not None:
                await _quietly(asyncio.wait_for(self.handler.publisher.close(), CLOSE_TIMEOUT_S))
            await _quietly(asyncio.wait_for(self.producer.stop(), CLOSE_TIMEOUT_S))
        self.connected = self.broker_reachable = False
        log.info("worker stopped")

    async def _watch_broker(self) -> None:
        """Probe the broker with a metadata request now and then; log when it goes away or comes back."""
        assert self.consumer is not None
        k = self.config.kafka
        while True:
            await asyncio.sleep(BROKER_PROBE_INTERVAL_S)
            try:
                await asyncio.wait_for(self.consumer.topics(), BROKER_PROBE_TIMEOUT_S)
                reachable, why = True, ""
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                reachable, why = False, brief(exc)
            if reachable != self.broker_reachable:
                if reachable:
                    log.info("broker %s reachable again", k.bootstrap)
                else:
                    log.warning("broker %s unreachable (%s); the consumer and producer keep retrying",
                                k.bootstrap, why)
            self.broker_reachable = reachable


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except Exception:  # noqa: BLE001 - best effort while closing
        pass
