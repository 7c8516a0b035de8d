"""Checkpoints: the offsets of the requests in flight, commits of each partition's watermark, and what a
rebalance does to them (revoked partitions finish or are abandoned within a deadline, then commit)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from imgstream.consumer.deferred import DeferredRetries
from imgstream.consumer.lifecycle import Lifecycle
from imgstream.consumer.metrics import WorkerMetrics
from imgstream.consumer.offsets import OffsetTracker
from imgstream.kafka_clients import brief
from imgstream.schemas.config import WorkerConfig

log = logging.getLogger("imgstream.consumer.worker")

COMMIT_INTERVAL_S = 0.5


class Checkpoint:
    """Owns the offset tracker and the request tasks per partition; commits below the oldest unfinished."""

    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics, lifecycle: Lifecycle,
                 retries: DeferredRetries) -> None:
        self.config = config
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.retries = retries
        self.tracker = OffsetTracker()
        self.consumer: AIOKafkaConsumer | None = None
        self.positions: dict[TopicPartition, int] = {}  # the next offset to take, per partition (for lag)
        self.revoking: set[TopicPartition] = set()
        self.tasks: dict[tuple[TopicPartition, int], asyncio.Task] = {}
        self._last_commit = 0.0

    def started(self, tp: TopicPartition, offset: int, task: asyncio.Task) -> None:
        self.tracker.start(tp, offset)
        self.positions[tp] = offset + 1
        self.tasks[(tp, offset)] = task
        task.add_done_callback(lambda _t, key=(tp, offset): self.tasks.pop(key, None))

    def finished(self, tp: TopicPartition, offset: int) -> None:
        self.tracker.finish(tp, offset)

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
            if not self.lifecycle.refused(exc, "commit the offsets of"):
                log.warning("commit of %s failed (%s); the next commit retries", names(offsets), brief(exc))
            return
        self.tracker.committed(offsets)
        self.metrics.commits.labels(outcome="ok").inc()

    async def drain(self, tasks: list[asyncio.Task], deadline_s: float) -> int:
        """Wait for `tasks` up to the deadline (or a second signal); cancel the rest, return how many."""
        if not tasks:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        pending = set(tasks)
        abandon = asyncio.ensure_future(self.lifecycle.abandon.wait())
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
        self.revoking.clear()
        self.metrics.rebalances.labels(event="assigned").inc()
        log.info("partitions assigned: %s", names(partitions))

    async def release(self, revoked: set[TopicPartition]) -> None:
        """On revoke: take nothing more from them, finish what can within the deadline, commit, abandon the rest."""
        if not revoked:
            return
        self.revoking |= revoked
        self.metrics.rebalances.labels(event="revoked").inc()
        tasks = [t for (tp, _), t in list(self.tasks.items()) if tp in revoked]
        abandoned = await self.drain(tasks, self.config.revoke_timeout_s)
        await self.commit(revoked, force=True)
        self.tracker.forget(revoked)
        self.retries.forget(revoked)
        for tp in revoked:
            self.positions.pop(tp, None)
        self.metrics.abandoned.inc(abandoned)
        log.info("partitions revoked: %s; %d requests finished, %d abandoned to the new owner",
                 names(revoked), len(tasks) - abandoned, abandoned)

    def listener(self) -> ConsumerRebalanceListener:
        return _Rebalance(self)

    def lag(self) -> list[tuple[dict[str, str], float]]:
        """Records behind each assigned partition's high watermark (from fetch responses: end_offsets() can
        under-report on some brokers)."""
        if self.consumer is None:
            return []
        out = []
        for tp in self.consumer.assignment():
            high, position = self.consumer.highwater(tp), self.positions.get(tp)
            if high is not None and position is not None:
                out.append(({"topic": tp.topic, "partition": str(tp.partition)}, max(0, high - position)))
        return out


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.checkpoint.release(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.checkpoint.assigned(set(assigned))


def names(partitions: Any) -> str:
    return ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)) or "none"
