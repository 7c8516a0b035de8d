"""Publishing results and dead letters, acknowledged by the broker before a commit."""

from __future__ import annotations

import asyncio
import base64
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError

from blobs import BlobStore, open_blob_store
from schemas.codec import encode
from schemas.config import BlobConfig
from schemas.events import DeadLetter, ResultEvent

log = logging.getLogger(__name__)

# Room left for the record's key, headers and framing under the topic's message limit.
RECORD_OVERHEAD_BYTES = 4096


def crop_store(blobs: BlobConfig) -> BlobStore:
    """Where crops too large to inline go: `crops/` in the configured blob store (directory or s3://)."""
    return open_blob_store(blobs.dir.rstrip("/") + "/crops", s3_endpoint_url=blobs.s3_endpoint_url,
                           s3_region=blobs.s3_region)


def fit_result(result: ResultEvent, limit: int, crops: BlobStore) -> tuple[bytes, bool]:
    """Encode `result` under `limit` bytes, moving an inline crop to the blob store if needed."""
    payload = encode(result)
    budget = limit - RECORD_OVERHEAD_BYTES
    if len(payload) <= budget:
        return payload, False
    if result.cropped_image_base64 is not None:
        ref = crops.put_bytes(base64.b64decode(result.cropped_image_base64), ".png")
        result = result.model_copy(update={"cropped_image_base64": None, "cropped_image_ref": ref})
        payload = encode(result)
        if len(payload) <= budget:
            return payload, True
    too_big = result.model_copy(update={
        "status": "error", "data": None, "cropped_image_base64": None, "error_code": "result_too_large",
        "error_message": f"result of {len(payload)} bytes does not fit the {limit}-byte message limit",
    })
    return encode(too_big), False


# The producer refuses these before sending; retrying the same record cannot help.
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)


class Publisher:
    """Sends results and DLQ records; each call returns once the broker acknowledged."""

    def __init__(self, producer: AIOKafkaProducer, results_topic: str, dlq_topic: str,
                 max_message_bytes: int | None = None) -> None:
        self.producer = producer
        self.results_topic = results_topic
        self.dlq_topic = dlq_topic
        self.max_message_bytes = max_message_bytes

    async def _send(self, topic: str, key: bytes | None, value: bytes,
                    headers: list[tuple[str, bytes]] | None = None, stop: asyncio.Event | None = None) -> None:
        delay = 0.2
        while True:
            try:
                await self.producer.send_and_wait(topic, value=value, key=key, headers=headers)
                return
            except _TOO_LARGE:
                raise
            except KafkaError as exc:
                # Keep trying: the request's offset is not committed until this succeeds.
                if stop is not None and stop.is_set():
                    raise
                log.warning("publish to %s failed (%s); retrying in %.1fs", topic, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def results(self, request_id: str, payloads: list[bytes], stop: asyncio.Event | None = None) -> None:
        key = request_id.encode()
        await asyncio.gather(*(self._send(self.results_topic, key, p, stop=stop) for p in payloads))

    async def dead_letter(self, key: bytes | None, value: bytes | None, letter: DeadLetter,
                          stop: asyncio.Event | None = None) -> None:
        """The original bytes with the reason in headers; cut to fit the message limit if they do not."""
        value = value or b""
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
                headers = letter.headers() + [(letter.HEADER_PREFIX + "original_bytes", str(len(value)).encode())]
                await self._send(self.dlq_topic, key, value[:room], headers, stop=stop)
                return
        await self._send(self.dlq_topic, key, value, letter.headers(), stop=stop)
