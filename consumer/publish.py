"""Publishing results and dead letters, acknowledged by the broker before a commit."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import Counter
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    RecordTooLargeError,
    UnknownTopicOrPartitionError,
)

from imgstream.blobs import BlobStore, open_blob_store
from imgstream.consumer.batches import PartitionBatches
from imgstream.kafka_clients import PublishForbidden, explain_runtime_error
from imgstream.schemas.codec import encode
from imgstream.schemas.config import BlobConfig
from imgstream.schemas.events import DeadLetter, ResultEvent
from imgstream.service.retry import Backoff

log = logging.getLogger(__name__)

# A publish the broker failed is tried again after these delays, for as long as it takes (the request's
# offset is not committed until it succeeds).
PUBLISH_BACKOFF = Backoff(first_s=0.2, max_s=10.0)
# Room left for the record's key, headers and framing under the topic's message limit.
RECORD_OVERHEAD_BYTES = 4096
# A deferral that cannot be published for this long is given up: the request is answered now instead.
DEFER_PATIENCE_S = 30.0


def crop_store(blobs: BlobConfig) -> BlobStore:
    """Where crops too large to inline go: `crops/` in the configured blob store (directory or s3://)."""
    return open_blob_store(blobs.dir.rstrip("/") + "/crops", s3_endpoint_url=blobs.s3_endpoint_url,
                           s3_region=blobs.s3_region)


@dataclass(frozen=True)
class EncodedResult:
    """A result as it will be sent (an error result when it could not be made to fit) and its bytes."""

    result: ResultEvent
    payload: bytes
    offloaded: bool = False


def failed_result(result: ResultEvent, code: str, message: str) -> EncodedResult:
    """`result` turned into an `error` result with `code`, without data or crop."""
    failed = result.model_copy(update={
        "status": "error", "data": None, "cropped_image_base64": None, "cropped_image_ref": None,
        "error_code": code, "error_message": message,
    })
    return EncodedResult(failed, encode(failed))


def fit_result(result: ResultEvent, limit: int, crops: BlobStore) -> EncodedResult:
    """Encode `result` under `limit` bytes, moving an inline crop to the blob store if needed."""
    payload = encode(result)
    budget = limit - RECORD_OVERHEAD_BYTES
    if len(payload) <= budget:
        return EncodedResult(result, payload)
    if result.cropped_image_base64 is not None:
        png = base64.b64decode(result.cropped_image_base64)
        try:
            ref = crops.put_bytes(png, ".png")
        except Exception as exc:  # noqa: BLE001 - a full disk or an S3 error fails this task, not the request
            log.error("%s: crop of %d bytes could not be stored: %s", result.event_id, len(png), exc)
            return failed_result(result, "crop_store_failed",
                                 f"the crop ({len(png)} bytes) is too large to inline and could not be written "
                                 f"to the blob store (blobs.dir): {type(exc).__name__}: {exc}")
        offloaded = result.model_copy(update={"cropped_image_base64": None, "cropped_image_ref": ref})
        payload = encode(offloaded)
        if len(payload) <= budget:
            return EncodedResult(offloaded, payload, offloaded=True)
    return failed_result(result, "result_too_large",
                         f"result of {len(payload)} bytes does not fit the {limit}-byte message limit")


# What aiokafka raises, after request_timeout_ms, for a topic the cluster does not have: never seen
# (UnknownTopicOrPartition), deleted while producing (NotLeaderForPartition), or no metadata at all.
_NO_TOPIC = (UnknownTopicOrPartitionError, NotLeaderForPartitionError, KafkaTimeoutError)
# The producer refuses these before sending; retrying the same record cannot help.
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)


class PublishRefused(Exception):
    """A record the client failed to send for a reason of its own, not the broker's (retrying cannot help)."""


_REFUSED = (*_TOO_LARGE, PublishRefused)


class PublishAbandoned(Exception):
    """A publish given up because the worker is stopping; the request stays uncommitted and is redone."""


class Publisher:
    """Sends results and DLQ records; each call returns once the broker acknowledged.

    `outcomes` counts, per (kind, outcome), what did not go through at the first try:
    kind is "results", "dlq" or "retry", outcome "retried", "abandoned" (given up at shutdown),
    "refused" (the broker or client will never take the record) or "forbidden" (the topic is
    missing or not writable: the worker stops).
    """

    def __init__(self, producer: AIOKafkaProducer, results_topic: str, dlq_topic: str,
                 max_message_bytes: int | None = None, *, retry_topic: str | None = None,
                 batch_linger_s: float | None = None) -> None:
        self.producer = producer
        self.results_topic = results_topic
        self.dlq_topic = dlq_topic
        self.retry_topic = retry_topic
        self.max_message_bytes = max_message_bytes
        self.outcomes: Counter[tuple[str, str]] = Counter()
        # Results go out in batches per partition (consumer/batches.py) unless batch_linger_s is None.
        self.batches = (PartitionBatches(producer, results_topic, batch_linger_s, max_message_bytes)
                        if batch_linger_s is not None else None)

    async def close(self) -> None:
        """Send the results still in open batches (before the producer stops)."""
        if self.batches is not None:
            await self.batches.close()

    def failure_samples(self) -> list[tuple[dict[str, str], float]]:
        """`outcomes` as labelled samples for imgstream_publish_failures_total."""
        return [({"kind": kind, "outcome": outcome}, n) for (kind, outcome), n in self.outcomes.items()]

    async def _send(self, kind: str, topic: str, key: bytes | None, value: bytes,
                    headers: list[tuple[str, bytes]] | None = None, stop: asyncio.Event | None = None,
                    patience_s: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + patience_s if patience_s is not None else None
        for delay in PUBLISH_BACKOFF.delays():
            try:
                await self.producer.send_and_wait(topic, value=value, key=key, headers=headers)
                return
            except _TOO_LARGE:
                self.outcomes[kind, "refused"] += 1
                raise
            except (KafkaError, OSError) as exc:
                forbidden = await self._forbidden(topic, exc)
                if forbidden is not None:
                    self.outcomes[kind, "forbidden"] += 1
                    raise forbidden from exc
                # Keep trying: the request's offset is not committed until this succeeds. At
                # shutdown give up instead; the uncommitted request is redone after the restart.
                if stop is not None and stop.is_set():
                    self.outcomes[kind, "abandoned"] += 1
                    raise PublishAbandoned(f"publish to {topic} given up at shutdown: {exc}") from exc
                if give_up_at is not None and loop.time() >= give_up_at:
                    self.outcomes[kind, "refused"] += 1
                    raise PublishRefused(f"{topic} did not take the record for {patience_s:g} s: {exc}") from exc
                self.outcomes[kind, "retried"] += 1
                log.warning("publish to %s failed (%s); retrying in %.1fs", topic, exc, delay)
                await asyncio.sleep(delay)
            except Exception as exc:  # noqa: BLE001 - not the broker's: the same record would fail again
                self.outcomes[kind, "refused"] += 1
                raise PublishRefused(f"{type(exc).__name__}: {exc}") from exc

    async def _forbidden(self, topic: str, exc: BaseException) -> PublishForbidden | None:
        """A PublishForbidden when `exc` means the cluster will never take records for `topic`."""
        explained = explain_runtime_error(exc, f"write to {topic}", "Write")
        if explained is not None:
            return PublishForbidden(explained.kind, topic, explained.message)
        if not isinstance(exc, _NO_TOPIC):
            return None
        # Missing, or the cluster cannot answer right now (a leader election): a full metadata answer tells.
        try:
            cluster = await self.producer.client.fetch_all_metadata()
        except (KafkaError, OSError):
            return None
        if cluster.brokers() and topic not in cluster.topics():
            return PublishForbidden("topic", topic, f"topic {topic} does not exist on the cluster: create it "
                                    "(imgstream topics create) or fix its name in kafka.topics")
        return None

    async def results(self, request_id: str, payloads: list[bytes], stop: asyncio.Event | None = None,
                      headers: list[tuple[str, bytes]] | None = None) -> dict[int, Exception]:
        """Publish every payload (with `headers`: the request's trace); returns the ones refused for good (by the
        broker or the client), by index.

        Raises PublishAbandoned if the worker began stopping while some could not be sent.
        """
        key = request_id.encode()
        sent: list[object] = [None] * len(payloads)
        alone = await self._batched(key, payloads, headers) if self.batches is not None else list(range(len(payloads)))
        if len(alone) == 1:
            # One result, awaited here (a gather costs a task and a future more).
            try:
                await self._send("results", self.results_topic, key, payloads[alone[0]], headers, stop=stop)
            except Exception as exc:  # noqa: BLE001 - sorted below, as gather's return_exceptions does
                sent[alone[0]] = exc
        elif alone:
            outcomes = await asyncio.gather(*(self._send("results", self.results_topic, key, payloads[i], headers,
                                                         stop=stop) for i in alone), return_exceptions=True)
            for i, outcome in zip(alone, outcomes):
                sent[i] = outcome
        for outcome in sent:
            if isinstance(outcome, BaseException) and not isinstance(outcome, _REFUSED):
                raise outcome
        return {i: outcome for i, outcome in enumerate(sent) if isinstance(outcome, _REFUSED)}

    async def _batched(self, key: bytes, payloads: list[bytes], headers: list[tuple[str, bytes]] | None) -> list[int]:
        """Send the payloads in the partition's batches; the indices of those left to go alone (no batch
        took them, or their batch failed: the retrying path classifies why)."""
        assert self.batches is not None
        waiters = [self.batches.add(key, p, headers) for p in payloads]
        alone = []
        try:
            for i, waiter in enumerate(waiters):
                if waiter is None:
                    alone.append(i)
                    continue
                try:
                    await waiter
                except Exception:  # noqa: BLE001 - the batch failed: the record goes alone, through the retries
                    alone.append(i)
        except asyncio.CancelledError:  # no one will look at the others' outcomes
            for waiter in waiters:
                if waiter is not None:
                    waiter.cancel()
            raise
        return alone

    async def defer(self, request_id: str, value: bytes, headers: list[tuple[str, bytes]],
                    stop: asyncio.Event | None = None) -> None:
        """The request's bytes to the retry topic, keyed by request_id, for a later attempt.

        Raises PublishRefused when the topic does not take it within DEFER_PATIENCE_S (a missing
        topic on a broker that creates none, say), PublishAbandoned at shutdown.
        """
        if self.retry_topic is None:
            raise PublishRefused("this worker has no retry topic")
        await self._send("retry", self.retry_topic, request_id.encode(), value, headers, stop=stop,
                         patience_s=DEFER_PATIENCE_S)

    async def dead_letter(self, key: bytes | None, value: bytes | None, letter: DeadLetter,
                          stop: asyncio.Event | None = None, trace: list[tuple[str, bytes]] | None = None) -> None:
        """The original bytes with the reason (and `trace`, the request's trace) in headers; cut to fit the
        message limit if they do not."""
        value = value or b""
        trace = trace or []
        headers = letter.headers() + trace
        limit = self.max_message_bytes
        if limit is not None:
            budget = limit - RECORD_OVERHEAD_BYTES
            if key is not None and len(key) > budget // 2:
                key = key[: budget // 2]
            room = budget - (len(key) if key else 0)
            if len(value) > room:
                log.warning("DLQ record of %d bytes cut to %d to fit the %d-byte message limit",
                            len(value), room, limit)
                letter = letter.model_copy(update={
                    "reason": f"{letter.reason} (value cut from {len(value)} to {room} bytes to fit the topic)"})
                cut = (letter.HEADER_PREFIX + "original_bytes", str(len(value)).encode())
                headers = letter.headers() + [cut] + trace
                value = value[:room]
        await self._send("dlq", self.dlq_topic, key, value, headers, stop=stop)
