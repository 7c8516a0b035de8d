"""Micro-batching across requests: callers await one item, the models see batches.

One queue per model collects items from every request in flight. A device takes the next
batch as soon as it has room: the queue whose oldest item has waited longest hands over
everything it holds, up to `max_batch_size`. So a batch never waits for a timer when the
device could run it; while the device is busy the queues grow, and the next batch with
them. `max_wait_ms` is only a ceiling: a free device holds a small batch back only while
images that could join it are still being decoded, and never longer than that.

With several devices (GPUs) every model has a replica on each, and a batch goes to the
free device that has been least busy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from imgstream.analysis.devices import Device
from imgstream.analysis.models.base import Model
from imgstream.schemas.config import BatchConfig

R = TypeVar("R")

# Lanes: live requests first; replayed ones (imgstream replay) fill what live work leaves.
LIVE = "live"
REPLAY = "replay"
DEFAULT_REPLAY_SHARE = 0.2

log = logging.getLogger(__name__)

# The largest batch per model when models.batching leaves it unset. On a GPU a batch of one
# leaves the device idle, and embeddings keep scaling into the hundreds (DESIGN "Batching"). On
# the CPU, measured on 2 cores (docs/BENCHMARKS.md): CLIP gains 1.5x from batching and our MTCNN
# cascade 1.3x at 4 (its R-/O-Nets take every image's candidates at once); DINOv2 and captions
# gain nothing; Faster R-CNN loses (0.7x: torchvision pads a batch to its largest image), so it
# runs one image at a time there, and a caption batch stays small enough not to hold the device.
DEFAULT_MAX_BATCH = {
    "cuda": {"clip": 256, "dino": 128, "caption": 64, "face": 32, "person": 8, "decode": 128},
    "cpu": {"clip": 32, "dino": 16, "caption": 4, "face": 4, "person": 1, "decode": 1},
}


def resolve(config: BatchConfig, key: str, device_type: str) -> BatchConfig:
    """`config` with its unset max_batch_size filled from DEFAULT_MAX_BATCH for the device."""
    if config.max_batch_size is not None:
        return config
    size = DEFAULT_MAX_BATCH["cuda" if device_type == "cuda" else "cpu"].get(key, 16)
    return config.model_copy(update={"max_batch_size": size})


@dataclass
class BatchStats:
    """Counters of one model's queue, read by tests, benchmarks and /metrics."""

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
    """A model's answer for one item, with the time it queued and its batch's compute time."""

    value: R
    queue_ms: float
    compute_ms: float


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    enqueued: float


class LaneTicket:
    """The lane of one piece of work that several requests share. A live request that joins
    replay work lifts it, and the items it has queued, into the live lane, so a live request
    never waits behind replay's share."""

    def __init__(self, lane: str) -> None:
        self.lane = lane
        self._queued: list[tuple[_ModelQueue, _Pending]] = []

    def track(self, queue: _ModelQueue, pending: _Pending) -> None:
        """Remember a replay item this work queued, to move it if the work is promoted."""
        self._queued.append((queue, pending))

    def promote(self) -> None:
        if self.lane == LIVE:
            return
        self.lane = LIVE
        for queue, pending in self._queued:
            queue.to_live(pending)
        self._queued.clear()


# The ticket of the shared work the current task computes (set by whoever starts that work);
# Scheduler.submit queues items in its lane.
current_ticket: ContextVar[LaneTicket | None] = ContextVar("imgstream_lane_ticket", default=None)


class _ModelQueue:
    def __init__(self, key: str, config: BatchConfig, replicas: dict[int, Model], prepare_only: bool) -> None:
        assert config.max_batch_size is not None, "resolve() the batch config first"
        self.key = key
        self.config = config
        self.replicas = replicas  # device index -> the model loaded there
        self.prepare_only = prepare_only
        self.lanes: dict[str, deque[_Pending]] = {LIVE: deque(), REPLAY: deque()}
        self.stats = BatchStats()
        self.space = asyncio.Event()
        self.space.set()

    def __len__(self) -> int:
        return len(self.lanes[LIVE]) + len(self.lanes[REPLAY])

    def to_live(self, pending: _Pending) -> None:
        """Move a queued replay item to the live lane, in the order of when it was queued."""
        try:
            self.lanes[REPLAY].remove(pending)
        except ValueError:  # already taken into a batch
            return
        live = self.lanes[LIVE]
        at = next((i for i, other in enumerate(live) if other.enqueued > pending.enqueued), len(live))
        live.insert(at, pending)

    def priority(self) -> tuple[int, float]:
        """Live work first, then the item that has waited longest."""
        live, replay = self.lanes[LIVE], self.lanes[REPLAY]
        return (0, live[0].enqueued) if live else (1, replay[0].enqueued)

    def take(self, replay_share: float) -> list[_Pending]:
        """The next batch: live items first; replay gets at most `replay_share` of it while live items wait."""
        size = self.config.max_batch_size
        live, replay = self.lanes[LIVE], self.lanes[REPLAY]
        replay_room = int(replay_share * size) if live else size
        batch: list[_Pending] = []
        for lane, limit in ((live, size - min(replay_room, len(replay))), (replay, replay_room)):
            taken = 0
            while lane and taken < limit and len(batch) < size:
                pending = lane.popleft()
                if not pending.future.cancelled():
                    batch.append(pending)
                    taken += 1
        if len(self) < self.config.max_queue:
            self.space.set()
        return batch


class Scheduler:
    """Hands batches from the models' queues to free devices."""

    def __init__(self, devices: list[Device]) -> None:
        if not devices:
            raise ValueError("a scheduler needs at least one device")
        self.devices = devices
        self._queues: dict[str, _ModelQueue] = {}
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task] = set()
        # Images being decoded: items they will add may join a small batch that lingers. Of
        # those, the JPEGs whose headers are being read may still join the GPU's decode batch.
        self.decoding = 0
        self.reading_headers = 0
        # The share of a batch replay items may take while live items wait (the worker sets it).
        self.replay_share = DEFAULT_REPLAY_SHARE

    def add(self, key: str, config: BatchConfig, replicas: dict[int, Model], prepare_only: bool = False) -> None:
        """Serve `key` from one replica per device index (prepare_only: it runs wholly on the preparing thread)."""
        device_type = self.devices[0].torch_device.type
        self._queues[key] = _ModelQueue(key, resolve(config, key, device_type), replicas, prepare_only)

    def config(self, key: str) -> BatchConfig:
        return self._queues[key].config

    def has(self, key: str) -> bool:
        return key in self._queues

    def stats(self) -> dict[str, dict[str, Any]]:
        return {key: q.stats.snapshot() for key, q in self._queues.items()}

    def queued(self) -> dict[str, int]:
        return {key: len(q) for key, q in self._queues.items()}

    # -- submitting -----------------------------------------------------------------------

    async def submit(self, key: str, item: Any, lane: str = LIVE) -> Timed:
        """Queue one item for `key` in `lane` (waiting while its queue is full) and await its result.

        Inside shared work (`current_ticket` set) the ticket's lane decides instead.
        """
        queue = self._queues[key]
        self._ensure_running()
        while len(queue) >= queue.config.max_queue:
            queue.space.clear()
            await queue.space.wait()
        ticket = current_ticket.get()
        if ticket is not None:
            lane = ticket.lane
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        pending = _Pending(item, future, time.perf_counter())
        queue.lanes[lane].append(pending)
        if ticket is not None and lane == REPLAY:
            ticket.track(queue, pending)
        self.wake()
        return await future

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _ensure_running(self) -> None:
        # Created lazily so the scheduler binds to the loop that first uses it.
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run(), name="imgstream-scheduler")

    # -- dispatching ----------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Items submitted by callbacks of this same loop turn join this round.
            await asyncio.sleep(0)
            self._dispatch()

    def _dispatch(self) -> None:
        now = time.perf_counter()
        linger_until: float | None = None
        for device in sorted(self.devices, key=lambda d: (d.running, d.busy_s)):
            while device.free:
                waiting = [q for q in self._queues.values() if len(q) and device.index in q.replicas]
                if not waiting:
                    break
                queue = min(waiting, key=_ModelQueue.priority)
                deadline = queue.priority()[1] + queue.config.max_wait_ms / 1000.0
                joining = self.reading_headers if queue.key == "decode" else self.decoding
                if len(queue) < queue.config.max_batch_size and joining and now < deadline:
                    # More images are being decoded and may join: hold back, up to max_wait_ms.
                    linger_until = deadline if linger_until is None else min(linger_until, deadline)
                    break
                batch = queue.take(self.replay_share)
                if batch:
                    device.running += 1
                    task = asyncio.create_task(self._execute(device, queue, batch))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
        if linger_until is not None:
            if self._timer is not None:
                self._timer.cancel()
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(0.0, linger_until - now), self.wake)

    async def _execute(self, device: Device, queue: _ModelQueue, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        queue_ms = [(started - p.enqueued) * 1000.0 for p in batch]
        model = queue.replicas[device.index]
        try:
            try:
                outputs = await device.run(model, [p.item for p in batch], queue.prepare_only)
                if len(outputs) != len(batch):
                    raise RuntimeError(f"{queue.key}: model returned {len(outputs)} outputs for {len(batch)} items")
            except Exception as exc:  # noqa: BLE001 - isolate the failing item instead of failing the batch
                queue.stats.failed_calls += 1
                await self._run_singly(device, queue, batch, queue_ms, exc)
                return
            compute_ms = (time.perf_counter() - started) * 1000.0
            queue.stats.record(len(batch), sum(queue_ms), compute_ms)
            for pending, output, waited in zip(batch, outputs, queue_ms):
                if not pending.future.done():
                    pending.future.set_result(Timed(output, waited, compute_ms))
        finally:
            device.running -= 1
            self.wake()

    async def _run_singly(self, device: Device, queue: _ModelQueue, batch: list[_Pending], queue_ms: list[float],
                          exc: Exception) -> None:
        """After a failed batch, run each item alone so one bad item fails only its own request."""
        if len(batch) == 1:
            log.warning("%s on %s: model call failed: %s", queue.key, device.name, exc)
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        log.warning("%s on %s: batch of %d failed (%s); retrying items one by one", queue.key, device.name,
                    len(batch), exc)
        model = queue.replicas[device.index]
        for pending, waited in zip(batch, queue_ms):
            started = time.perf_counter()
            try:
                (output,) = await device.run(model, [pending.item], queue.prepare_only)
            except Exception as item_exc:  # noqa: BLE001
                queue.stats.failed_calls += 1
                if not pending.future.done():
                    pending.future.set_exception(item_exc)
                continue
            compute_ms = (time.perf_counter() - started) * 1000.0
            queue.stats.record(1, waited, compute_ms)
            if not pending.future.done():
                pending.future.set_result(Timed(output, waited, compute_ms))

    async def close(self) -> None:
        """Stop dispatching; items still queued get a cancelled future."""
        if self._timer is not None:
            self._timer.cancel()
        for task in [self._runner, *self._running]:
            if task is not None:
                task.cancel()
        for task in [self._runner, *self._running]:
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._runner = None
        for queue in self._queues.values():
            for lane in queue.lanes.values():
                while lane:
                    pending = lane.popleft()
                    if not pending.future.done():
                        pending.future.cancel()
