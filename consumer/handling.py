"""Request handling: one record in, its results (or a deferral, or a dead letter) out.

Decode the event, fetch and decode the image once, run every task through the engine, encode each
result to fit the topic, publish and wait for the broker's acknowledgement. Whatever fails, the
record ends as results or a DLQ record; only a publish abandoned at shutdown, or refused for good by
the cluster, leaves it unfinished (and so uncommitted).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from aiokafka import TopicPartition

from imgstream.analysis import imaging
from imgstream.analysis.batcher import LIVE, REPLAY
from imgstream.analysis.engine import Engine
from imgstream.analysis.results import error_results, image_info
from imgstream.consumer.deferred import RETRY, Attempt, Deferral, DeferredRetries
from imgstream.consumer.fetch import ImageFetcher, TransientFetchError
from imgstream.consumer.image_budget import ImageBudget
from imgstream.consumer.lifecycle import Lifecycle
from imgstream.consumer.metrics import WorkerMetrics
from imgstream.consumer.publish import EncodedResult, PublishAbandoned, Publisher, crop_store, failed_result, fit_result
from imgstream.kafka_clients import PublishForbidden, brief
from imgstream.schemas.codec import InvalidEvent, decode_request, encode
from imgstream.schemas.config import WorkerConfig
from imgstream.schemas.events import AnalysisRequest, DeadLetter, ResultEvent
from imgstream.service.logs import request_id_var
from imgstream.service.tracing import NO_TRACING, Tracing, trace_headers, with_trace

log = logging.getLogger("imgstream.consumer.worker")


class RequestHandler:
    """Handles records; `fetcher` and `publisher` are set once the worker has its clients."""

    def __init__(self, config: WorkerConfig, engine: Engine, metrics: WorkerMetrics, images: ImageBudget,
                 retries: DeferredRetries, lifecycle: Lifecycle, room_freed: asyncio.Event) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.images = images
        self.retries = retries
        self.lifecycle = lifecycle
        self.room_freed = room_freed  # set whenever a request's image bytes are let go
        self.crops = crop_store(config.blobs)
        self.fetcher: ImageFetcher | None = None
        self.publisher: Publisher | None = None
        self.tracing: Tracing = NO_TRACING  # the worker's; its hooks here cost one test of `enabled` when off
        self.counts: Counter[str] = Counter()  # requests and results by status, for the summary log line

    async def process(self, tp: TopicPartition, record: Any) -> bool:
        """Handle one record; True when it is finished (answered or dead-lettered), False when it is left for
        redelivery (a publish given up at shutdown, or refused by the cluster: the worker then stops)."""
        started = time.perf_counter()
        self.metrics.requests.labels(topic=tp.topic).inc()
        self.counts["requests"] += 1
        try:
            try:
                await self.handle(tp, record)
            except (PublishAbandoned, PublishForbidden):
                raise
            except Exception as exc:  # noqa: BLE001 - even the fallbacks failed: the DLQ keeps the event
                log.exception("%s[%d]@%d could not be answered; to DLQ", tp.topic, tp.partition, record.offset)
                await self.dead_letter(tp, record, "request_failed",
                                       f"the request could not be answered: {type(exc).__name__}: {brief(exc)}")
        except PublishAbandoned as exc:
            # Stopping: left unfinished, so not committed; it is redone after the restart.
            log.warning("%s[%d]@%d left for redelivery: %s", tp.topic, tp.partition, record.offset, exc)
            return False
        except PublishForbidden as exc:
            # Left unfinished, so nothing is committed past it; the worker stops and says what to change.
            self.lifecycle.fail(exc)
            return False
        except Exception:  # noqa: BLE001 - not even the DLQ took it; never hold the partition for it
            self.metrics.unhandled.inc()
            log.exception("%s[%d]@%d could be neither answered nor dead-lettered; its offset is released",
                          tp.topic, tp.partition, record.offset)
        self.metrics.request_ms.observe((time.perf_counter() - started) * 1000.0)
        return True

    async def handle(self, tp: TopicPartition, record: Any) -> None:
        try:
            request = decode_request(record.value)
        except InvalidEvent as exc:
            log.warning("%s[%d]@%d to DLQ: %s", tp.topic, tp.partition, record.offset, exc.reason)
            await self.dead_letter(tp, record, exc.code, exc.reason)
            return
        request_id_var.set(request.request_id)
        attempt = self.retries.attempt(tp, record)
        if self.retries.superseded(attempt):
            log.info("request %s: attempt %d dropped: another delivery of it was answered", request.request_id,
                     attempt.number)
            return
        try:
            results = await self.analyse(request, lane_of(tp, self.config), attempt)
            if any(r.cropped_image_base64 for r in results):
                # Off the loop: a crop too large to inline is written to the blob store (a file or an S3 put).
                fitted = await asyncio.to_thread(self.fit_all, results)
            else:  # encoding alone costs less than a thread hop
                fitted = self.fit_all(results)
        except Deferral as deferral:
            deferred = await self.defer(record, request, attempt, deferral)
            if deferred is None:
                return
            fitted = deferred
        except Exception as exc:  # noqa: BLE001 - the whole request failed: every task gets its error result
            log.exception("request %s: failed", request.request_id)
            message = f"Internal error: {type(exc).__name__}: {exc}"
            try:
                # Error results carry no crop, so they fit as they are.
                fitted = [EncodedResult(r, encode(r)) for r in error_results(request, "internal_error", message,
                                                                       image=image_info(request))]
            except Exception as again:  # noqa: BLE001 - what every result echoes cannot be written
                # The last line of defence: validation should have refused such a request.
                reason = f"no result of this request can be encoded: {type(again).__name__}: {again}"
                log.error("%s[%d]@%d to DLQ: %s", tp.topic, tp.partition, record.offset, reason)
                await self.dead_letter(tp, record, "unencodable_result", reason)
                return
        await self.publish(tp, record, request, fitted)
        self.retries.answered(attempt)

    async def defer(self, record: Any, request: AnalysisRequest, attempt: Attempt,
                    deferral: Deferral) -> list[EncodedResult] | None:
        """Send the request to the retry topic for its next attempt (None); if it cannot go there, its
        image_fetch_failed results to publish now instead."""
        assert self.publisher is not None
        if deferral.decision == "drop":
            log.info("request %s: fetch failed (%s); another delivery of it waits on %s and answers",
                     request.request_id, deferral.error, self.retries.topic)
            return None
        retry = self.retries.next_retry(attempt, deferral.error)
        try:
            # The retry record keeps the request's trace: its next attempt's span continues it.
            headers = with_trace(self.retries.headers(record, retry))
            sending = self.publisher.defer(request.request_id, record.value or b"", headers,
                                           stop=self.lifecycle.stopping)
            await (self.tracing.send(self.retries.topic, request.request_id, 1, sending) if self.tracing.enabled
                   else sending)
        except PublishAbandoned:
            raise
        except Exception as exc:  # noqa: BLE001 - refused for good: answer now, as before deferrals existed
            log.error("request %s: could not be deferred to %s (%s); answered now", request.request_id,
                      self.retries.topic, brief(exc))
            message = f"{deferral.error}; deferring it to {self.retries.topic} failed: {brief(exc)}"
            return [EncodedResult(r, encode(r)) for r in error_results(request, deferral.error.code, message,
                                                               image=image_info(request))]
        self.retries.scheduled()
        log.info("request %s: fetch failed (%s); attempt %d of %d is due at %s", request.request_id, deferral.error,
                 retry.attempt, self.config.fetch.deferred_attempts, f"{retry.due_at:%H:%M:%S}")
        return None

    def fit_all(self, results: list[ResultEvent]) -> list[EncodedResult]:
        """Each result encoded to fit; one that cannot be built becomes that task's error result."""
        fitted = []
        for result in results:
            try:
                fitted.append(fit_result(result, self.config.kafka.max_message_bytes, self.crops))
            except Exception as exc:  # noqa: BLE001 - one task's failure must not take its siblings down
                log.exception("%s: result could not be built", result.event_id)
                fitted.append(failed_result(result, "internal_error",
                                            f"the result could not be built: {type(exc).__name__}: {exc}"))
        return fitted

    async def publish(self, tp: TopicPartition, record: Any, request: AnalysisRequest,
                      fitted: list[EncodedResult]) -> None:
        """Publish every result; the ones the broker refuses become error results, and the request goes to the DLQ."""
        assert self.publisher is not None
        stop = self.lifecycle.stopping
        trace = trace_headers(record.headers)  # the request's trace goes on with every result
        sending = self.publisher.results(request.request_id, [f.payload for f in fitted], stop=stop, headers=trace)
        refused = await (self.tracing.send(self.publisher.results_topic, request.request_id, len(fitted), sending)
                         if self.tracing.enabled else sending)
        if refused:
            why = "; ".join(f"{fitted[i].result.operation_id}: {brief(exc)}" for i, exc in sorted(refused.items()))
            log.error("request %s: results refused (%s); request goes to the DLQ",
                      request.request_id, why)
            order = sorted(refused)
            stand_ins = [failed_result(fitted[i].result, "publish_failed",
                                       f"the result could not be published: {brief(refused[i])}") for i in order]
            again = await self.publisher.results(request.request_id, [f.payload for f in stand_ins], stop=stop,
                                                 headers=trace)
            await self.dead_letter(tp, record, "publish_failed", f"results could not be published: {why}")
            lost = {order[j] for j in again}  # refused even as error results: only the DLQ record tells of them
            fitted = list(fitted)
            for i, stand_in in zip(order, stand_ins):
                fitted[i] = stand_in
            published = [f for i, f in enumerate(fitted) if i not in lost]
        else:
            published = fitted
        offloaded = sum(f.offloaded for f in published)
        if offloaded:  # rare: a counter's inc takes a lock, so none for nothing
            self.metrics.crops_offloaded.inc(offloaded)
        for f in published:
            self.metrics.results.labels(status=f.result.status, error_code=f.result.error_code or "").inc()
            self.counts[f.result.status] += 1
        # One line per request at DEBUG (a busy worker answers a thousand a second); the summary
        # line every report_interval_s, and failures, come at INFO and above.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s: %d results (%s)", request.request_id, len(fitted),
                      ", ".join(f"{f.result.operation_id}={f.result.status}" for f in fitted))

    async def dead_letter(self, tp: TopicPartition, record: Any, code: str, reason: str) -> None:
        assert self.publisher is not None
        letter = DeadLetter(reason=reason, error_code=code, source_topic=tp.topic,
                            source_partition=tp.partition, source_offset=record.offset)
        sending = self.publisher.dead_letter(record.key, record.value, letter, stop=self.lifecycle.stopping,
                                             trace=trace_headers(record.headers))
        await (self.tracing.send(self.publisher.dlq_topic, None, 1, sending) if self.tracing.enabled else sending)
        self.metrics.dlq.labels(reason=code).inc()

    async def analyse(self, request: Any, lane: str = LIVE, attempt: Attempt | None = None) -> list[Any]:
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
            decoding = self.engine.decode(fetched.data, self.config.decode, lane)
            decoded = await (self.tracing.span("decode", decoding, {"imgstream.image.bytes": len(fetched.data)})
                             if self.tracing.enabled else decoding)
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
            self.room_freed.set()


def lane_of(tp: TopicPartition, config: WorkerConfig) -> str:
    """The lane of a partition's requests: live (requests), replay, or retry (deferred fetches)."""
    topics = config.kafka.topics
    return REPLAY if tp.topic == topics.replay else RETRY if tp.topic == topics.retry else LIVE
