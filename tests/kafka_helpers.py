"""Helpers for tests that talk to a real Kafka-compatible broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from imgstream.schemas.config import Topics


@contextlib.asynccontextmanager
async def running(worker: Any) -> AsyncIterator[Any]:
    """An in-process `Worker` running while the block runs; stopped (drained, committed) after it."""
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.request_stop("test finished")
        await asyncio.wait_for(task, 60)


# Tansu holds every JoinGroup for about half the session timeout (5 s at aiokafka's default
# of 10 s), and a group's first generation is 0, for which aiokafka sends no LeaveGroup on
# stop: the next member waits out the old one's session. A short session keeps tests quick.
FAST_GROUP = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 500}


def unique_topics(prefix: str = "t") -> Topics:
    """A set of topic names no other test uses."""
    u = uuid.uuid4().hex[:12]
    return Topics(
        requests=f"{prefix}-{u}.requests",
        replay=f"{prefix}-{u}.replay",
        results=f"{prefix}-{u}.results",
        dlq=f"{prefix}-{u}.dlq",
        retry=f"{prefix}-{u}.retry",
    )


async def produce(
    bootstrap: str,
    topic: str,
    messages: Iterable[tuple[bytes | None, bytes, list[tuple[str, bytes]]]],
) -> None:
    """Produce (key, value, headers) messages and wait until the broker acknowledged all of them."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sent = [await producer.send(topic, value, key=key, headers=headers) for key, value, headers in messages]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def consume_all(
    bootstrap: str, topic: str, expected_count: int, timeout_s: float = 15.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read `topic` from the beginning with a group-less consumer until `expected_count` records or the timeout.

    Counts records rather than trusting end_offsets(), which Tansu can under-report.
    """
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < expected_count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


class TopicReader:
    """Reads `topics` from the start in the background with a group-less consumer; `take` sees each record."""

    def __init__(self, bootstrap: str, *topics: str) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self._task: asyncio.Task | None = None

    def take(self, record: ConsumerRecord[bytes, bytes]) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> TopicReader:
        consumer = AIOKafkaConsumer(*self.topics, bootstrap_servers=self.bootstrap, group_id=None,
                                    auto_offset_reset="earliest")
        await consumer.start()
        self._task = asyncio.create_task(self._read(consumer))
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait([self._task])

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while True:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        self.take(record)
        finally:
            await consumer.stop()


class Background:
    """Runs `run()` in a task from `async with` until `stop()` (or the block's end); `run` watches `stopping`."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def run(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Background:
        self._task = asyncio.create_task(self.run())
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Ask `run` to stop, and wait until it has."""
        self.stopping.set()
        if self._task is not None:
            await self._task
