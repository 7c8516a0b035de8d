"""Results produced as one batch per partition and linger, with one acknowledgement for the whole batch.

aiokafka's `send()` is a coroutine per record: it looks up the topic's metadata, copies the partition
lists for the partitioner, appends the record to its accumulator with a future of its own, and answers
each future with a RecordMetadata of its own when the broker acknowledges. On W4 that was a sixth of
the worker's CPU. Here a record is appended straight to an open batch of its partition (aiokafka's
BatchBuilder, the client's own batch interface), and the batch goes out through `send_batch` when
`linger_ms` has passed since its first record, or when it is full; the requests waiting on it are
woken by one acknowledgement.

The partition is the one aiokafka's partitioner and the Java client's give the key (murmur2). A record
this path does not take (no metadata for the topic yet, or larger than a request may be) returns None
from `add`, and a batch the broker
fails fails its waiters: the Publisher sends those records alone through its retrying path, which
classifies the error (a missing topic, an authorization refusal, a record too large) as before.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaProducer

from imgstream.kafka_clients.partitioner import murmur2

log = logging.getLogger(__name__)

# What a record adds to its key, value and headers in a batch, at most (varints, attributes, deltas).
RECORD_FRAMING_BYTES = 64


class _Open:
    """A batch being filled: aiokafka's builder and the futures of the records in it."""

    __slots__ = ("builder", "waiters")

    def __init__(self, builder: Any) -> None:
        self.builder = builder
        self.waiters: list[asyncio.Future[None]] = []


class PartitionBatches:
    """Open batches of one topic by partition; `add` a record, await the future it returns."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, linger_s: float,
                 max_record_bytes: int | None = None) -> None:
        self.producer = producer
        self.topic = topic
        self.linger_s = linger_s
        # A builder takes any first record whatever its size; `send` refuses one over the request size itself.
        self.max_record_bytes = max_record_bytes
        self.batches_sent = 0
        self.records_sent = 0
        self._open: dict[int, _Open] = {}
        self._partitions: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._enqueue: dict[int, asyncio.Lock] = {}  # keeps each partition's batches in the order they closed
        self._deliveries: set[asyncio.Task[None]] = set()

    def add(self, key: bytes, value: bytes, headers: list[tuple[str, bytes]] | None) -> asyncio.Future[None] | None:
        """The record appended to its partition's open batch; None when it must go alone (`send`)."""
        if self.max_record_bytes is not None and len(key) + len(value) + RECORD_FRAMING_BYTES + sum(
                len(k) + len(v) for k, v in headers or ()) > self.max_record_bytes:
            return None
        count = self._partitions
        if count is None:
            count = self._partitions = self._partition_count()
            if count is None:
                return None
        partition = (murmur2(key) & 0x7FFFFFFF) % count
        batch = self._open.get(partition) or self._start(partition)
        try:
            if batch.builder.append(key=key, value=value, timestamp=None, headers=headers or []) is None:
                self._close(partition)  # full: out it goes, and the record starts the next one
                batch = self._start(partition)
                if batch.builder.append(key=key, value=value, timestamp=None, headers=headers or []) is None:
                    return None
        except Exception:  # noqa: BLE001 - a record the builder refuses (its types): `send` says why
            return None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch.waiters.append(waiter)
        return waiter

    async def close(self) -> None:
        """Send what is open and wait for every batch under way (at shutdown, before the producer stops)."""
        self._flush()
        if self._deliveries:
            await asyncio.wait(list(self._deliveries))

    def _partition_count(self) -> int | None:
        partitions = self.producer.client.cluster.partitions_for_topic(self.topic)
        return len(partitions) if partitions else None

    def _start(self, partition: int) -> _Open:
        """A new open batch for `partition`, sent within a linger."""
        batch = self._open[partition] = _Open(self.producer.create_batch())
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.linger_s, self._flush)
        return batch

    def _flush(self) -> None:
        self._timer = None
        for partition in list(self._open):
            self._close(partition)
        self._partitions = self._partition_count()  # a topic given more partitions is seen within a linger

    def _close(self, partition: int) -> None:
        batch = self._open.pop(partition)
        batch.builder.close()  # complete: aiokafka sends it at once instead of lingering on it again
        lock = self._enqueue.get(partition)
        if lock is None:
            lock = self._enqueue[partition] = asyncio.Lock()
        task = asyncio.get_running_loop().create_task(self._deliver(partition, batch, lock))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, partition: int, batch: _Open, lock: asyncio.Lock) -> None:
        try:
            async with lock:  # aiokafka queues one batch per partition: the next waits for this one's turn
                acknowledged = await self.producer.send_batch(batch.builder, self.topic, partition=partition)
            await acknowledged
        except Exception as exc:  # noqa: BLE001 - each waiter's record is tried again alone
            for waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        except asyncio.CancelledError:
            for waiter in batch.waiters:
                waiter.cancel()
            raise
        self.batches_sent += 1
        self.records_sent += len(batch.waiters)
        for waiter in batch.waiters:
            if not waiter.done():
                waiter.set_result(None)
