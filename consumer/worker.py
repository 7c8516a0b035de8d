"""The worker: consume requests -> fetch + decode -> engine -> publish -> commit watermark."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from imgstream.analysis import imaging
from imgstream.analysis.batcher import LIVE, REPLAY
from imgstream.analysis.engine import Engine
from imgstream.analysis.results import error_results, image_info
from imgstream.consumer.deferred import RETRY, Attempt, Deferral, DeferredRetries
from imgstream.consumer.fetch import FileBlobReader, ImageFetcher, TransientFetchError
from imgstream.consumer.image_budget import ImageBudget
from imgstream.service.logs import request_id_var
from imgstream.consumer.metrics import WorkerMetrics
from imgstream.consumer.offsets import OffsetTracker
from imgstream.consumer.publish import Fitted, PublishAbandoned, Publisher, crop_store, failed_result, fit_result
from imgstream.blobs.s3read import S3BlobReader
from imgstream.service.signals import on_stop_signals, sleep_unless
from imgstream.kafka_clients import (
    BrokerUnreachable,
    KafkaSetupError,
    PublishForbidden,
    explain_runtime_error,
    open_consumer,
    open_producer,
)
from imgstream.schemas.codec import InvalidEvent, decode_request, encode
from imgstream.schemas.config import WorkerConfig
from imgstream.schemas.events import AnalysisRequest, DeadLetter, ResultEvent

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.5
POLL_TIMEOUT_MS = 200
# getmany waits without a timeout while a rebalance is in progress; bounding each call keeps
# the loop responsive to SIGTERM and to backpressure even then.
POLL_GUARD_S = 1.0
# At a bound the consumer waits for a request to finish; a bound that lasts longer pauses the partitions.
PAUSE_AFTER_S = 0.5
# The live lane counts as idle (replay may use every slot) once no live request started for this long.
LIVE_IDLE_AFTER_S = 2.0
BROKER_PROBE_INTERVAL_S = 2.0
BROKER_PROBE_TIMEOUT_S = 3.0
CLOSE_TIMEOUT_S = 5.0


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.release(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.worker.assigned(set(assigned))


class Worker:
    """Owns the consumer, producer, fetcher and engine; processes requests until stopped."""

    def __init__(self, config: WorkerConfig, engine: Engine, metrics: WorkerMetrics | None = None) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics or WorkerMetrics()
        self.tracker = OffsetTracker()
        self.images = ImageBudget(config.max_in_flight_image_bytes,
                                  worst_case=config.fetch.max_bytes + 3 * config.decode.max_pixels)
        self.crops = crop_store(config.blobs)
        self.retries = DeferredRetries(config.fetch, config.kafka.topics.retry)
        # Replay items take at most this share of a model batch while live items wait.
        engine.scheduler.replay_share = config.replay_share
        self.stopping = asyncio.Event()
        self.abandon = asyncio.Event()  # a second signal: stop draining now
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.publisher: Publisher | None = None
        self.fetcher: ImageFetcher | None = None
        self._tasks: dict[tuple[TopicPartition, int], asyncio.Task] = {}
        self._revoking: set[TopicPartition] = set()
        self._busy = False
        self._room_freed = asyncio.Event()  # set whenever a request or its image bytes are let go
        self._last_live_start = float("-inf")
        self._positions: dict[TopicPartition, int] = {}
        self._last_commit = 0.0
        self._watcher: asyncio.Task | None = None
        self._reporter: asyncio.Task | None = None
        self.counts: Counter[str] = Counter()  # requests and results by status, for the summary log line
        self.connected = False
        self.broker_reachable = False
        self.failure: KafkaSetupError | None = None  # why the worker stopped itself (exit non-zero)
        self._register_gauges()

    # -- lifecycle ------------------------------------------------------------------------

    async def _connect(self) -> None:
        """Start producer and consumer, retrying with backoff while the broker is unreachable.

        Settings the cluster refuses (login, certificate, permission) are not retried: the worker
        stops with `failure` saying what to change.
        """
        k = self.config.kafka
        delay = 0.5
        attempt = 0
        while not self.stopping.is_set():
            attempt += 1
            try:
                clients = await self._unless_stopping(self._open_clients())
            except KafkaSetupError as exc:
                self.fail(exc)
                return
            except BrokerUnreachable as exc:
                log.warning("broker %s unreachable (attempt %d: %s); retrying in %.1fs",
                            k.bootstrap, attempt, _brief(exc), delay)
                await sleep_unless(self.stopping, delay)
                delay = min(delay * 2, 30.0)
                continue
            if clients is None:
                return
            self.producer, self.consumer = clients
            self.publisher = Publisher(self.producer, k.topics.results, k.topics.dlq, k.max_message_bytes,
                                       retry_topic=k.topics.retry)
            self.connected = self.broker_reachable = True
            log.info("connected to %s (%s) as group %s; consuming %s, %s and %s", k.bootstrap,
                     k.security_protocol, k.group, k.topics.requests, k.topics.replay, k.topics.retry)
            return

    async def _open_clients(self) -> tuple[AIOKafkaProducer, AIOKafkaConsumer]:
        k = self.config.kafka
        producer = await open_producer(k, role="producer")
        try:
            consumer = await open_consumer(
                k, k.topics.requests, k.topics.replay, k.topics.retry, role="consumer", group_id=k.group,
                listener=_Rebalance(self),
                # The group waits this long for members to rejoin; aiokafka's default (the session
                # timeout) would evict a member still draining its revoked partitions.
                rebalance_timeout_ms=self.rebalance_timeout_ms)
        except BaseException:
            await _quietly(asyncio.wait_for(producer.stop(), CLOSE_TIMEOUT_S))
            raise
        return producer, consumer

    def _fatal(self, exc: BaseException, action: str) -> bool:
        """Whether `exc` (from the consumer) is one no retry can fix; if so, the worker stops with it."""
        k = self.config.kafka
        error = explain_runtime_error(exc, f"{action} {k.topics.requests} and {k.topics.replay} as group {k.group}")
        if error is not None:
            self.fail(error)
        return error is not None

    def fail(self, error: KafkaSetupError) -> None:
        """Stop for good: the cluster refuses something only a changed setting or permission can fix."""
        if self.failure is None:
            self.failure = error
            log.error("%s", error.message)
        self.request_stop(f"stopping: {error.kind} failure")

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

    @property
    def rebalance_timeout_ms(self) -> int:
        return max(self.config.kafka.session_timeout_ms, int((self.config.revoke_timeout_s + 5.0) * 1000))

    def install_signal_handlers(self) -> None:
        on_stop_signals(self.request_stop)

    def request_stop(self, why: str = "stop requested") -> None:
        if not self.stopping.is_set():
            log.info("%s: draining in-flight requests (deadline %.0fs)", why, self.config.drain_timeout_s)
            self.stopping.set()
        elif not self.abandon.is_set():
            log.warning("%s again: abandoning the requests in flight; they will be redone", why)
            self.abandon.set()

    async def run(self) -> None:
        """Consume until `request_stop`; then drain, commit and close."""
        async with ImageFetcher(self.config.fetch) as fetcher:
            blobs = self.config.blobs
            fetcher.register_blob_reader("file", FileBlobReader(self.config.file_blob_roots()))
            fetcher.register_blob_reader("s3", S3BlobReader(blobs.s3_endpoint_url, blobs.s3_region,
                                                            self.config.s3_blob_scopes()))
            self.fetcher = fetcher
            await self._connect()
            if self.consumer is None:
                return
            self._watcher = asyncio.create_task(self._watch_broker(), name="broker-watch")
            if self.config.report_interval_s > 0:
                self._reporter = asyncio.create_task(self._report_periodically(), name="worker-report")
            try:
                await self._consume()
            finally:
                await self._shutdown()

    async def _consume(self) -> None:
        assert self.consumer is not None
        while not self.stopping.is_set():
            room = self._room()
            if room <= 0:
                await self._wait_for_room()
                continue
            replay_room = self._replay_room(room)
            self._pause(self._held_replay(replay_room) | self.retries.held())
            try:
                batches = await asyncio.wait_for(
                    self.consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=room), POLL_GUARD_S)
            except asyncio.TimeoutError:
                batches = {}
            except KafkaError as exc:
                if self._fatal(exc, "read"):
                    break
                log.warning("poll failed (%s); retrying", _brief(exc))
                await asyncio.sleep(1.0)
                continue
            self._take(batches, room, replay_room)
            await self.commit()

    def _room(self) -> int:
        """How many more requests may start now (0 at either bound)."""
        if self.images.full():
            return 0
        return max(0, self.config.max_in_flight - self.tracker.in_flight())

    # -- lanes: live before replay; deferred retries when due -----------------------------------

    def lane(self, tp: TopicPartition) -> str:
        topics = self.config.kafka.topics
        return REPLAY if tp.topic == topics.replay else RETRY if tp.topic == topics.retry else LIVE

    def in_flight_by_lane(self) -> dict[str, int]:
        counts = {LIVE: 0, REPLAY: 0, RETRY: 0}
        for tp in self.tracker.partitions():
            counts[self.lane(tp)] += self.tracker.in_flight(tp)
        return counts

    def _live_has_work(self) -> bool:
        """Live requests in flight, started lately, or waiting on an assigned live partition (as far as
        the last fetch saw). "Lately" keeps a trickle of live requests from looking idle between two
        of them, which would let replay fill every slot just before the next one arrives."""
        if self.in_flight_by_lane()[LIVE] or time.monotonic() - self._last_live_start < LIVE_IDLE_AFTER_S:
            return True
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            if self.lane(tp) == LIVE:
                high, position = self.consumer.highwater(tp), self._positions.get(tp)
                if high is not None and position is not None and high > position:
                    return True
        return False

    @property
    def replay_slots(self) -> int:
        """The in-flight slots replay may hold while live work waits (replay_share of max_in_flight)."""
        return int(self.config.replay_share * self.config.max_in_flight)

    def _replay_room(self, room: int) -> int:
        """Replay requests that may start now: all the room while live is idle, else what is left of its share."""
        if not self._live_has_work():
            return room
        return max(0, min(room, self.replay_slots - self.in_flight_by_lane()[REPLAY]))

    def _held_replay(self, replay_room: int) -> set[TopicPartition]:
        """Replay partitions to keep paused: at their share; resumed only once half of it is free again,
        so finishing one replay request does not pause and resume (and refetch) them every time."""
        assert self.consumer is not None
        replay = {tp for tp in self.consumer.assignment() if self.lane(tp) == REPLAY}
        paused = self.consumer.paused() & replay
        resume_at = max(1, self.replay_slots // 2)
        if replay_room <= 0 or (paused and replay_room < resume_at):
            return replay
        return set()

    async def _wait_for_room(self) -> None:
        """At a bound: wait for a request to finish, not for a poll timer.

        A bound that lasts (PAUSE_AFTER_S) pauses every assigned partition and keeps polling, so
        the member stays in its group (heartbeats, max.poll.interval); a short one pauses nothing,
        which keeps the records aiokafka has prefetched (pausing discards them).
        """
        assert self.consumer is not None
        self._room_freed.clear()
        if self._room() > 0:
            return
        try:
            await asyncio.wait_for(self._room_freed.wait(), PAUSE_AFTER_S)
            return
        except asyncio.TimeoutError:
            pass
        # Checked every round: partitions assigned by a rebalance arrive unpaused.
        self._pause(self.consumer.assignment())
        try:
            await asyncio.wait_for(self.consumer.getmany(timeout_ms=0), POLL_GUARD_S)
        except asyncio.TimeoutError:
            pass
        except KafkaError as exc:
            self._fatal(exc, "read")
        await self.commit()

    def _pause(self, partitions: set[TopicPartition]) -> None:
        """Pause exactly `partitions` of the assignment; resume the others."""
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        want = set(partitions) & assigned
        paused = self.consumer.paused() & assigned
        try:
            if want - paused:
                self.consumer.pause(*(want - paused))
            if paused - want:
                self.consumer.resume(*(paused - want))
        except IllegalStateError:  # the assignment changed under us; next round sees the new one
            return
        busy = bool(want)
        if busy != self._busy:
            self._busy = busy
            log.debug("%s: %d requests and %d image bytes in flight (bounds %d and %d)",
                      "paused partitions" if busy else "resumed partitions", self.tracker.in_flight(),
                      self.images.held, self.config.max_in_flight, self.config.max_in_flight_image_bytes)

    def _take(self, batches: dict[TopicPartition, list[Any]], room: int, replay_room: int) -> None:
        """Start the fetched records that fit (replay ones within `replay_room`, retries once due); rewind
        each partition to its first one left over."""
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        # Live partitions first: a poll that returns both lanes must not let replay take the room.
        for tp, records in sorted(batches.items(), key=lambda item: _LANE_ORDER[self.lane(item[0])]):
            if tp in self._revoking or tp not in assigned:
                continue  # its new owner starts from the committed watermark
            replay = self.lane(tp) == REPLAY
            for record in records:
                if room <= 0 or (replay and replay_room <= 0):
                    # A rebalance can hand over unpaused partitions mid-poll; give back the excess.
                    self.consumer.seek(tp, record.offset)
                    break
                if self.lane(tp) == RETRY and self.retries.hold_until_due(tp, record):
                    # Not due: wait at this record, paused (not polled) until it is.
                    self.consumer.seek(tp, record.offset)
                    self.consumer.pause(tp)
                    break
                self._start(tp, record)
                self._positions[tp] = record.offset + 1
                room -= 1
                replay_room -= replay

    def _start(self, tp: TopicPartition, record: Any) -> None:
        self.tracker.start(tp, record.offset)
        if self.lane(tp) == LIVE:
            self._last_live_start = time.monotonic()
        task = asyncio.create_task(self._process(tp, record), name=f"req-{tp.topic}-{tp.partition}-{record.offset}")
        self._tasks[(tp, record.offset)] = task
        task.add_done_callback(lambda _t, key=(tp, record.offset): self._tasks.pop(key, None))

    # -- one request ----------------------------------------------------------------------

    async def _process(self, tp: TopicPartition, record: Any) -> None:
        """Handle one record; whatever fails, its offset is finished unless the worker gave up at shutdown."""
        started = time.perf_counter()
        self.metrics.requests.labels(topic=tp.topic).inc()
        self.counts["requests"] += 1
        try:
            try:
                await self._handle(tp, record)
            except (PublishAbandoned, PublishForbidden):
                raise
            except Exception as exc:  # noqa: BLE001 - even the fallbacks failed: the DLQ keeps the event
                log.exception("%s[%d]@%d could not be answered; to DLQ", tp.topic, tp.partition, record.offset)
                await self._dead_letter(tp, record, "request_failed",
                                        f"the request could not be answered: {type(exc).__name__}: {_brief(exc)}")
        except PublishAbandoned as exc:
            # Stopping: left unfinished, so not committed; it is redone after the restart.
            log.warning("%s[%d]@%d left for redelivery: %s", tp.topic, tp.partition, record.offset, exc)
            return
        except PublishForbidden as exc:
            # Left unfinished, so nothing is committed past it; the worker stops and says what to change.
            self.fail(exc)
            return
        except Exception:  # noqa: BLE001 - not even the DLQ took it; never hold the partition for it
            self.metrics.unhandled.inc()
            log.exception("%s[%d]@%d could be neither answered nor dead-lettered; its offset is released",
                          tp.topic, tp.partition, record.offset)
        self.tracker.finish(tp, record.offset)
        self._room_freed.set()
        self.metrics.request_ms.observe((time.perf_counter() - started) * 1000.0)

    async def _handle(self, tp: TopicPartition, record: Any) -> None:
        try:
            request = decode_request(record.value)
        except InvalidEvent as exc:
            log.warning("%s[%d]@%d to DLQ: %s", tp.topic, tp.partition, record.offset, exc.reason)
            await self._dead_letter(tp, record, exc.code, exc.reason)
            return
        request_id_var.set(request.request_id)
        attempt = self.retries.attempt(tp, record)
        if self.retries.superseded(attempt):
            log.info("request %s: attempt %d dropped: another delivery of it was answered", request.request_id,
                     attempt.number)
            return
        try:
            results = await self._analyse(request, self.lane(tp), attempt)
            if any(r.cropped_image_base64 for r in results):
                # Off the loop: a crop too large to inline is written to the blob store (a file or an S3 put).
                fitted = await asyncio.to_thread(self._fit_all, results)
            else:  # encoding alone costs less than a thread hop
                fitted = self._fit_all(results)
        except Deferral as deferral:
            deferred = await self._defer(record, request, attempt, deferral)
            if deferred is None:
                return
            fitted = deferred
        except Exception as exc:  # noqa: BLE001 - the whole request failed: every task gets its error result
            log.exception("request %s: failed", request.request_id)
            message = f"Internal error: {type(exc).__name__}: {exc}"
            try:
                # Error results carry no crop, so they fit as they are.
                fitted = [Fitted(r, encode(r)) for r in error_results(request, "internal_error", message,
                                                                       image=image_info(request))]
            except Exception as again:  # noqa: BLE001 - what every result echoes cannot be written
                # The last line of defence: validation should have refused such a request.
                reason = f"no result of this request can be encoded: {type(again).__name__}: {again}"
                log.error("%s[%d]@%d to DLQ: %s", tp.topic, tp.partition, record.offset, reason)
                await self._dead_letter(tp, record, "unencodable_result", reason)
                return
        await self._publish(tp, record, request, fitted)
        self.retries.answered(attempt)

    async def _defer(self, record: Any, request: AnalysisRequest, attempt: Attempt,
                     deferral: Deferral) -> list[Fitted] | None:
        """Send the request to the retry topic for its next attempt (None); if it cannot go there, its
        image_fetch_failed results to publish now instead."""
        assert self.publisher is not None
        if deferral.decision == "drop":
            log.info("request %s: fetch failed (%s); another delivery of it waits on %s and answers",
                     request.request_id, deferral.error, self.retries.topic)
            return None
        retry = self.retries.next_retry(attempt, deferral.error)
        try:
            await self.publisher.defer(request.request_id, record.value or b"", self.retries.headers(record, retry),
                                       stop=self.stopping)
        except PublishAbandoned:
            raise
        except Exception as exc:  # noqa: BLE001 - refused for good: answer now, as before deferrals existed
            log.error("request %s: could not be deferred to %s (%s); answered now", request.request_id,
                      self.retries.topic, _brief(exc))
            message = f"{deferral.error}; deferring it to {self.retries.topic} failed: {_brief(exc)}"
            return [Fitted(r, encode(r)) for r in error_results(request, deferral.error.code, message,
                                                               image=image_info(request))]
        self.retries.scheduled()
        log.info("request %s: fetch failed (%s); attempt %d of %d is due at %s", request.request_id, deferral.error,
                 retry.attempt, self.config.fetch.deferred_attempts, f"{retry.due_at:%H:%M:%S}")
        return None

    def _fit(self, result: ResultEvent) -> Fitted:
        return fit_result(result, self.config.kafka.max_message_bytes, self.crops)

    def _fit_all(self, results: list[ResultEvent]) -> list[Fitted]:
        """Each result encoded to fit; one that cannot be built becomes that task's error result."""
        fitted = []
        for result in results:
            try:
                fitted.append(self._fit(result))
            except Exception as exc:  # noqa: BLE001 - one task's failure must not take its siblings down
                log.exception("%s: result could not be built", result.event_id)
                fitted.append(failed_result(result, "internal_error",
                                            f"the result could not be built: {type(exc).__name__}: {exc}"))
        return fitted

    async def _publish(self, tp: TopicPartition, record: Any, request: AnalysisRequest,
                       fitted: list[Fitted]) -> None:
        """Publish every result; the ones the broker refuses become error results, and the request goes to the DLQ."""
        assert self.publisher is not None
        stop = self.stopping
        refused = await self.publisher.results(request.request_id, [f.payload for f in fitted], stop=stop)
        if refused:
            why = "; ".join(f"{fitted[i].result.operation_id}: {_brief(exc)}" for i, exc in sorted(refused.items()))
            log.error("request %s: results refused (%s); request goes to the DLQ",
                      request.request_id, why)
            order = sorted(refused)
            stand_ins = [failed_result(fitted[i].result, "publish_failed",
                                       f"the result could not be published: {_brief(refused[i])}") for i in order]
            again = await self.publisher.results(request.request_id, [f.payload for f in stand_ins], stop=stop)
            await self._dead_letter(tp, record, "publish_failed", f"results could not be published: {why}")
            lost = {order[j] for j in again}  # refused even as error results: only the DLQ record tells of them
            fitted = list(fitted)
            for i, stand_in in zip(order, stand_ins):
                fitted[i] = stand_in
            published = [f for i, f in enumerate(fitted) if i not in lost]
        else:
            published = fitted
        self.metrics.crops_offloaded.inc(sum(f.offloaded for f in published))
        for f in published:
            self.metrics.results.labels(status=f.result.status, error_code=f.result.error_code or "").inc()
            self.counts[f.result.status] += 1
        # One line per request at DEBUG (a busy worker answers a thousand a second); the summary
        # line every report_interval_s, and failures, come at INFO and above.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s: %d results (%s)", request.request_id, len(fitted),
                      ", ".join(f"{f.result.operation_id}={f.result.status}" for f in fitted))

    async def _dead_letter(self, tp: TopicPartition, record: Any, code: str, reason: str) -> None:
        assert self.publisher is not None
        letter = DeadLetter(reason=reason, error_code=code, source_topic=tp.topic,
                            source_partition=tp.partition, source_offset=record.offset)
        await self.publisher.dead_letter(record.key, record.value, letter, stop=self.stopping)
        self.metrics.dlq.labels(reason=code).inc()

    async def _analyse(self, request: Any, lane: str = LIVE, attempt: Attempt | None = None) -> list[Any]:
        """Fetch and decode the image once, then run every task through the engine.

        The image's bytes (fetched and decoded) count against `max_in_flight_image_bytes`
        until the engine is done with it. A transient fetch failure with attempts left raises Deferral.
        """
        assert self.fetcher is not None
        lane = REPLAY if lane == REPLAY else LIVE  # the engine's lanes: deferred retries are live work
        timings: dict[str, float] = {}
        hold = await self.images.acquire()
        try:
            t0 = time.perf_counter()
            try:
                fetched = await self.fetcher.fetch(request.image)
            except imaging.ImageError as exc:
                self.metrics.fetch_ms.labels(outcome=exc.code).observe((time.perf_counter() - t0) * 1000.0)
                raise
            self.images.add(hold, len(fetched.data))
            timings["fetch"] = fetched.elapsed_ms
            self.metrics.fetch_ms.labels(outcome="ok").observe(fetched.elapsed_ms)
            t0 = time.perf_counter()
            decoded = await self.engine.decode(fetched.data, self.config.decode, lane)
            del fetched
            timings["decode"] = (time.perf_counter() - t0) * 1000.0
            self.images.add(hold, decoded.nbytes)
            self.images.settle(hold)
            return await self.engine.run(request, decoded, timings_ms=timings, lane=lane)
        except imaging.ImageError as exc:
            decision = self.retries.decide(exc, attempt)
            if decision != "answer":
                assert isinstance(exc, TransientFetchError)
                raise Deferral(exc, decision) from None
            message = self.retries.final_message(exc, attempt)
            log.info("request %s: %s: %s", request.request_id, exc.code, message)
            return error_results(request, exc.code, message, image=image_info(request), timings_ms=timings)
        except Exception as exc:  # noqa: BLE001 - one bad image must never stop the partition
            log.exception("request %s: unexpected failure", request.request_id)
            return error_results(request, "internal_error", f"Internal error: {type(exc).__name__}: {exc}",
                                 image=image_info(request), timings_ms=timings)
        finally:
            self.images.release(hold)
            self._room_freed.set()

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
            self.metrics.commits.labels(outcome="failed").inc()
            if not self._fatal(exc, "commit the offsets of"):
                log.warning("commit of %s failed (%s); the next commit retries", _names(offsets), _brief(exc))
            return
        self.tracker.committed(offsets)
        self.metrics.commits.labels(outcome="ok").inc()

    async def _drain(self, tasks: list[asyncio.Task], deadline_s: float) -> int:
        """Wait for `tasks` up to the deadline (or a second signal); cancel the rest, return how many."""
        if not tasks:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        pending = set(tasks)
        abandon = asyncio.ensure_future(self.abandon.wait())
        try:
            while pending and not abandon.done():
                left = deadline - loop.time()
                if left <= 0:
                    break
                done, _ = await asyncio.wait(pending | {abandon}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                pending -= done
        finally:
            abandon.cancel()
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        return len(pending)

    def assigned(self, partitions: set[TopicPartition]) -> None:
        self._revoking.clear()
        self.metrics.rebalances.labels(event="assigned").inc()
        log.info("partitions assigned: %s", _names(partitions))

    async def release(self, revoked: set[TopicPartition]) -> None:
        """On revoke: take nothing more from them, finish what can within the deadline, commit, abandon the rest."""
        if not revoked:
            return
        self._revoking |= revoked
        self.metrics.rebalances.labels(event="revoked").inc()
        tasks = [t for (tp, _), t in list(self._tasks.items()) if tp in revoked]
        abandoned = await self._drain(tasks, self.config.revoke_timeout_s)
        await self.commit(revoked, force=True)
        self.tracker.forget(revoked)
        self.retries.forget(revoked)
        for tp in revoked:
            self._positions.pop(tp, None)
        self.metrics.abandoned.inc(abandoned)
        log.info("partitions revoked: %s; %d requests finished, %d abandoned to the new owner",
                 _names(revoked), len(tasks) - abandoned, abandoned)

    async def _shutdown(self) -> None:
        abandoned = await self._drain(list(self._tasks.values()), self.config.drain_timeout_s)
        if abandoned:
            self.metrics.abandoned.inc(abandoned)
            log.warning("shutdown: %d requests abandoned unfinished; they will be redone", abandoned)
        await self.commit(force=True)
        for task in (self._watcher, self._reporter):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        # Closing talks to the broker (leave group, flush); a broker that went away must not hang the exit.
        if self.consumer is not None:
            await _quietly(asyncio.wait_for(self.consumer.stop(), CLOSE_TIMEOUT_S))
        if self.producer is not None:
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
                reachable, why = False, _brief(exc) or type(exc).__name__
            if reachable != self.broker_reachable:
                if reachable:
                    log.info("broker %s reachable again", k.bootstrap)
                else:
                    log.warning("broker %s unreachable (%s); the consumer and producer keep retrying",
                                k.bootstrap, why)
            self.broker_reachable = reachable

    # -- observability --------------------------------------------------------------------

    async def _report_periodically(self) -> None:
        """One INFO line per interval: what an operator tailing the log wants to see."""
        interval = self.config.report_interval_s
        previous: Counter[str] = Counter()
        previous_reused: Counter[str] = Counter()
        previous_batches: dict[str, tuple[int, int]] = {}
        while True:
            await asyncio.sleep(interval)
            now, reused = Counter(self.counts), Counter(self.engine.reused)
            done = {k: now[k] - previous[k] for k in ("requests", "success", "skipped", "error")}
            results = done["success"] + done["skipped"] + done["error"]
            shared = {k: reused[k] - previous_reused[k] for k in ("in_flight", "cached")}
            batches = []
            for key, stats in self.engine.batch_stats().items():
                calls, items = stats["calls"], stats["items"]
                last_calls, last_items = previous_batches.get(key, (0, 0))
                if calls > last_calls:
                    batches.append(f"{key} {(items - last_items) / (calls - last_calls):.1f}")
                previous_batches[key] = (calls, items)
            lanes = self.in_flight_by_lane()
            cache = self.engine.reuse
            log.info(
                "last %.0fs: %d requests (%.1f/s), results %d ok, %d skipped, %d error; in flight %d live, %d replay, "
                "%d retry; reused %.0f%% (%d in flight, %d cached; cache %d entries, %.1f MiB); mean batch %s",
                interval, done["requests"], done["requests"] / interval, done["success"], done["skipped"],
                done["error"], lanes[LIVE], lanes[REPLAY], lanes[RETRY],
                100.0 * sum(shared.values()) / results if results else 0.0,
                shared["in_flight"], shared["cached"], cache.entries if cache else 0,
                (cache.bytes if cache else 0) / 2**20, ", ".join(batches) or "-")
            previous, previous_reused = now, reused

    def _register_gauges(self) -> None:
        m = self.metrics
        m.add_gauge("imgstream_requests_in_flight", "Requests being processed.",
                    lambda: [({}, self.tracker.in_flight())])
        m.add_gauge("imgstream_image_bytes_in_flight", "Fetched plus decoded image bytes held by requests.",
                    lambda: [({}, self.images.held)])
        m.add_gauge("imgstream_image_bytes_reserved", "Image bytes counted against the bound (estimates included).",
                    lambda: [({}, self.images.used)])
        # Retry partitions waiting for their due time are not backpressure (imgstream_retry_partitions_waiting).
        m.add_gauge("imgstream_partitions_paused", "Assigned partitions paused by backpressure.",
                    lambda: [({}, len(self.consumer.paused() - self.retries.held()) if self.consumer else 0)])
        m.add_gauge("imgstream_broker_reachable", "1 when the last broker probe succeeded.",
                    lambda: [({}, 1 if self.broker_reachable else 0)])
        m.add_gauge("imgstream_consumer_lag", "Messages behind the partition's high watermark.", self._lag)
        m.add_live_counter("imgstream_model_batches_total", "Model calls (batches), per model.",
                           lambda: [({"model": k}, s["calls"]) for k, s in self.engine.batch_stats().items()])
        m.add_live_counter("imgstream_model_items_total", "Items run, per model.",
                           lambda: [({"model": k}, s["items"]) for k, s in self.engine.batch_stats().items()])
        m.add_live_counter("imgstream_model_queue_wait_ms_total",
                           "Time items waited in the model's batcher, summed, per model "
                           "(divide by imgstream_model_items_total for the mean).",
                           lambda: [({"model": k}, s["queue_wait_ms_total"])
                                    for k, s in self.engine.batch_stats().items()])
        m.add_live_histogram("imgstream_model_batch_size", "Items per model call, per model.",
                             lambda: [({"model": k}, s["batch_sizes"], float(s["items"]))
                                      for k, s in self.engine.batch_stats().items()])
        m.add_live_counter("imgstream_publish_failures_total",
                           "Publishes that failed, by kind (results, dlq) and outcome (retried; abandoned at "
                           "shutdown; refused for good).", self._publish_failures)
        m.add_live_counter("imgstream_device_busy_seconds_total",
                           "Seconds each device (cpu, cuda:N) spent running batches; its rate is the "
                           "device's utilisation.",
                           lambda: [({"device": k}, v["busy_s"]) for k, v in self.engine.device_stats().items()])
        m.add_live_counter("imgstream_device_batches_total", "Batches each device ran.",
                           lambda: [({"device": k}, v["batches"]) for k, v in self.engine.device_stats().items()])
        m.add_gauge("imgstream_lane_requests_in_flight", "Requests being processed, per lane (live, replay).",
                    lambda: [({"lane": lane}, n) for lane, n in self.in_flight_by_lane().items()])
        m.add_live_counter("imgstream_reuse_total",
                           "Task results taken from identical work on the same image bytes, by kind: in_flight "
                           "(shared with a concurrent request) or cached (a recent outcome).",
                           lambda: [({"kind": kind}, self.engine.reused[kind]) for kind in ("in_flight", "cached")])
        m.add_gauge("imgstream_reuse_cache_bytes", "Memory held by recent outcomes kept for reuse.",
                    lambda: [({}, self.engine.reuse.bytes if self.engine.reuse else 0)])
        m.add_gauge("imgstream_reuse_cache_entries", "Recent outcomes kept for reuse.",
                    lambda: [({}, self.engine.reuse.entries if self.engine.reuse else 0)])
        m.add_gauge("imgstream_model_queue_depth", "Items waiting in each model's batcher.",
                    lambda: [({"model": k}, v) for k, v in self.engine.queued().items()])
        m.add_live_counter("imgstream_deferred_retries_total",
                           "Deferred fetch retries, by event: scheduled (sent to the retry topic), due (taken from "
                           "it), exhausted (final image_fetch_failed after the last attempt), superseded (left "
                           "unanswered: another delivery of the request answers).",
                           lambda: [({"event": event}, n) for event, n in self.retries.counts.items()])
        m.add_gauge("imgstream_retry_partitions_waiting",
                    "Retry topic partitions paused until their first record is due.",
                    lambda: [({}, len(self.retries.held()))])
        m.add_live_counter("imgstream_fetch_host_waits_total",
                           "Fetches that waited for their host, by reason: slot (fetch.per_host_concurrent "
                           "reached) or retry_after (the host's Retry-After).", self._host_waits)
        m.add_live_counter("imgstream_fetch_host_deferrals_total",
                           "Fetches given up at once because their host's Retry-After outlasts the fetch deadline "
                           "(deferred to the retry topic).",
                           lambda: [({}, self.fetcher.hosts.backoffs if self.fetcher else 0)])

    def _host_waits(self) -> list[tuple[dict[str, str], float]]:
        waits = self.fetcher.hosts.waits if self.fetcher else {}
        return [({"reason": reason}, waits.get(reason, 0)) for reason in ("slot", "retry_after")]

    def _publish_failures(self) -> list[tuple[dict[str, str], float]]:
        return self.publisher.failure_samples() if self.publisher else []

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


# Live requests first, then due retries, then replay.
_LANE_ORDER = {LIVE: 0, RETRY: 1, REPLAY: 2}


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except Exception:  # noqa: BLE001 - best effort while closing
        pass


def _names(partitions: Any) -> str:
    return ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)) or "none"


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 160 else text[:157] + "..."
