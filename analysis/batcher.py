"""A per-model micro-batcher: callers await one item, the model sees batches.

Items from every request in flight are collected until `max_batch_size` is reached or
`max_wait_ms` has passed since the first item, then run as one model call on the
device's worker thread, so the event loop (heartbeats, fetches, publishing) never blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from schemas.config import BatchConfig

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


@dataclass
class BatchStats:
    """Counters of one batcher, read by tests, benchmarks and /metrics."""

    calls: int = 0
    items: int = 0
    failed_calls: int = 0
    max_batch: int = 0
    queue_wait_ms_total: float = 0.0
    compute_ms_total: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)

    def record(self, size: int, queue_ms: float, compute_ms: float) -> None:
        self.calls += 1
        self.items += size
        self.max_batch = max(self.max_batch, size)
        self.queue_wait_ms_total += queue_ms
        self.compute_ms_total += compute_ms
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "items": self.items,
            "failed_calls": self.failed_calls,
            "max_batch": self.max_batch,
            "mean_batch": (self.items / self.calls) if self.calls else 0.0,
            "queue_wait_ms_total": self.queue_wait_ms_total,
            "compute_ms_total": self.compute_ms_total,
            "batch_sizes": dict(sorted(self.batch_sizes.items())),
        }


@dataclass
class Timed(Generic[R]):
    """A batcher's answer for one item, with the time it queued and the batch's compute time."""

    value: R
    queue_ms: float
    compute_ms: float


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    enqueued: float


class MicroBatcher(Generic[T, R]):
    """Collects items into batches for `run_batch(list[T]) -> list[R]` on `executor`."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[T]], list[R]],
        executor: Executor,
        config: BatchConfig,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self._executor = executor
        self.config = config
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending[T]] | None = None
        self._runner: asyncio.Task | None = None

    def _ensure_running(self) -> asyncio.Queue[_Pending[T]]:
        # Created lazily so the batcher binds to the loop that first uses it.
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=self.config.max_queue)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")
        return self._queue

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, item: T) -> Timed[R]:
        """Queue one item (waiting while the queue is full) and await its result."""
        queue = self._ensure_running()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await queue.put(_Pending(item, future, time.perf_counter()))
        return await future

    async def _collect(self, queue: asyncio.Queue[_Pending[T]]) -> list[_Pending[T]]:
        batch = [await queue.get()]
        deadline = time.perf_counter() + self.config.max_wait_ms / 1000.0
        while len(batch) < self.config.max_batch_size:
            try:
                batch.append(queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(self._queue)
            batch = [p for p in batch if not p.future.cancelled()]
            if not batch:
                continue
            started = time.perf_counter()
            queue_ms = [(started - p.enqueued) * 1000.0 for p in batch]
            try:
                outputs = await loop.run_in_executor(self._executor, self._run_batch, [p.item for p in batch])
                if len(outputs) != len(batch):
                    raise RuntimeError(f"{self.name}: model returned {len(outputs)} outputs for {len(batch)} items")
            except Exception as exc:  # noqa: BLE001 - isolate the failing item instead of failing the batch
                self.stats.failed_calls += 1
                await self._run_singly(batch, queue_ms, exc)
                continue
            compute_ms = (time.perf_counter() - started) * 1000.0
            self.stats.record(len(batch), sum(queue_ms), compute_ms)
            for pending, output, waited in zip(batch, outputs, queue_ms):
                if not pending.future.done():
                    pending.future.set_result(Timed(output, waited, compute_ms))

    async def _run_singly(self, batch: list[_Pending[T]], queue_ms: list[float], exc: Exception) -> None:
        """After a failed batch, run each item alone so one bad item fails only its own request."""
        if len(batch) == 1:
            log.warning("batcher %s: model call failed: %s", self.name, exc)
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        log.warning("batcher %s: batch of %d failed (%s); retrying items one by one", self.name, len(batch), exc)
        loop = asyncio.get_running_loop()
        for pending, waited in zip(batch, queue_ms):
            started = time.perf_counter()
            try:
                (output,) = await loop.run_in_executor(self._executor, self._run_batch, [pending.item])
            except Exception as item_exc:  # noqa: BLE001
                self.stats.failed_calls += 1
                if not pending.future.done():
                    pending.future.set_exception(item_exc)
                continue
            compute_ms = (time.perf_counter() - started) * 1000.0
            self.stats.record(1, waited, compute_ms)
            if not pending.future.done():
                pending.future.set_result(Timed(output, waited, compute_ms))

    async def close(self) -> None:
        """Stop the runner; items still queued get a cancelled future."""
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except (asyncio.CancelledError, Exception):
                pass
            self._runner = None
        if self._queue is not None:
            while not self._queue.empty():
                pending = self._queue.get_nowait()
                if not pending.future.done():
                    pending.future.cancel()
