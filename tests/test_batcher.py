"""The scheduler that batches items across requests: no wait when the device is free, batches
that grow while it is busy, a ceiling on lingering, failures isolated, several devices shared."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import torch

from imgstream.analysis.batcher import LIVE, REPLAY, Scheduler, resolve
from imgstream.analysis.devices import Device
from imgstream.analysis.reuse import InFlight
from imgstream.schemas.config import BatchConfig


class SlowDouble:
    """A model that doubles numbers, taking `seconds` per call; records each batch and its thread."""

    def __init__(self, seconds: float = 0.0, fail_on: int | None = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.info = None

    def collate(self, items: list[int]) -> list[int]:
        return items

    def forward(self, batch: list[int]) -> list[int]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(batch))
        time.sleep(self.seconds)
        if self.fail_on is not None and self.fail_on in batch:
            raise ValueError(f"item {self.fail_on} is poison")
        return [2 * x for x in batch]


@asynccontextmanager
async def scheduling(model: SlowDouble, max_batch: int = 8, max_wait_ms: float = 5.0,
                     devices: int = 1, key: str = "double") -> AsyncIterator[tuple[Scheduler, list[Device]]]:
    """A scheduler serving `model` as `key` on `devices` CPU devices; closed afterwards."""
    pool = [Device(torch.device("cpu"), index) for index in range(devices)]
    scheduler = Scheduler(pool)
    scheduler.add(key, BatchConfig(max_batch_size=max_batch, max_wait_ms=max_wait_ms),
                  {d.index: model for d in pool})
    try:
        yield scheduler, pool
    finally:
        await scheduler.close()
        for device in pool:
            device.shutdown()


async def test_a_lone_item_runs_at_once_not_after_max_wait():
    model = SlowDouble()
    async with scheduling(model, max_wait_ms=2000) as (scheduler, pool):
        started = time.perf_counter()
        timed = await scheduler.submit("double", 21)
        assert timed.value == 42
        assert time.perf_counter() - started < 1.0  # max_wait_ms (2 s) is a ceiling, not a tax


async def test_batches_grow_while_the_device_is_busy():
    model = SlowDouble(seconds=0.3)
    async with scheduling(model, max_batch=64) as (scheduler, pool):
        first = asyncio.ensure_future(scheduler.submit("double", 0))
        await asyncio.sleep(0.1)  # the device is now busy with [0]
        rest = [asyncio.ensure_future(scheduler.submit("double", i)) for i in range(1, 11)]
        results = await asyncio.gather(first, *rest)
        assert [r.value for r in results] == [2 * i for i in range(11)]
        assert model.batches == [[0], list(range(1, 11))]
        assert scheduler.stats()["double"]["calls"] == 2 and scheduler.stats()["double"]["max_batch"] == 10


async def test_max_batch_size_caps_a_batch():
    model = SlowDouble(seconds=0.2)
    async with scheduling(model, max_batch=4) as (scheduler, pool):
        blocker = asyncio.ensure_future(scheduler.submit("double", 100))
        await asyncio.sleep(0.05)
        await asyncio.gather(blocker, *(scheduler.submit("double", i) for i in range(10)))
        assert [len(b) for b in model.batches] == [1, 4, 4, 2]


async def test_a_free_device_lingers_for_decodes_in_flight_but_only_up_to_max_wait():
    model = SlowDouble()
    async with scheduling(model, max_batch=8, max_wait_ms=300) as (scheduler, pool):
        try:
            scheduler.decoding = 1  # an image is being decoded: its item may join
            first = asyncio.ensure_future(scheduler.submit("double", 1))
            await asyncio.sleep(0.1)
            assert model.batches == []  # held back for the decode
            second = asyncio.ensure_future(scheduler.submit("double", 2))
            started = time.perf_counter()
            await asyncio.gather(first, second)
            assert model.batches == [[1, 2]]
            assert time.perf_counter() - started < 1.0  # the ceiling released it although decoding never ended
        finally:
            scheduler.decoding = 0


async def test_the_device_decode_batch_lingers_only_for_jpegs_still_reading_their_headers():
    model = SlowDouble()
    async with scheduling(model, max_batch=8, max_wait_ms=2000, key="decode") as (scheduler, pool):
        scheduler.decoding = 1  # the image in the decode queue is itself still "decoding"
        started = time.perf_counter()
        await scheduler.submit("decode", 1)
        assert time.perf_counter() - started < 1.0  # nothing else can join: no wait
        scheduler.reading_headers = 1  # another JPEG's header is being read: it may join
        pending = asyncio.ensure_future(scheduler.submit("decode", 2))
        await asyncio.sleep(0.1)
        assert model.batches == [[1]]
        scheduler.reading_headers = 0
        await asyncio.gather(pending, scheduler.submit("decode", 3))
        assert model.batches == [[1], [2, 3]]
        scheduler.decoding = 0


async def test_replay_takes_at_most_its_share_of_a_batch_while_live_items_wait():
    model = SlowDouble(seconds=0.2)
    async with scheduling(model, max_batch=10) as (scheduler, pool):
        scheduler.replay_share = 0.2
        blocker = asyncio.ensure_future(scheduler.submit("double", 0))
        await asyncio.sleep(0.05)  # the device is busy: both lanes queue up
        replay = [asyncio.ensure_future(scheduler.submit("double", 100 + i, REPLAY)) for i in range(12)]
        live = [asyncio.ensure_future(scheduler.submit("double", i, LIVE)) for i in range(1, 11)]
        await asyncio.gather(blocker, *replay, *live)
        assert model.batches[1:] == [
            [*range(1, 9), 100, 101],  # 8 live, replay's 2 of 10
            [9, 10, 102, 103],  # live items still waited for this batch: replay keeps to its share
            list(range(104, 112)),  # live is idle: replay takes the whole batch
        ]


async def test_live_work_that_joins_replay_work_lifts_it_into_the_live_lane():
    model = SlowDouble(seconds=0.2)
    async with scheduling(model, max_batch=4) as (scheduler, pool):
        scheduler.replay_share = 0.0  # replay runs only when no live item waits
        work = InFlight()
        blocker = asyncio.ensure_future(scheduler.submit("double", 0))
        await asyncio.sleep(0.05)
        shared = work.start("same-image", lambda: scheduler.submit("double", 7), REPLAY)
        await asyncio.sleep(0.01)  # queued in the replay lane
        live = [asyncio.ensure_future(scheduler.submit("double", i)) for i in range(1, 7)]
        assert work.join("same-image", LIVE) is shared  # a live request now waits on it
        await asyncio.gather(blocker, shared, *live)
        assert 7 in model.batches[1]  # ran with the first live batch, not after every live item


async def test_a_failing_batch_is_retried_item_by_item():
    model = SlowDouble(seconds=0.1, fail_on=3)
    async with scheduling(model) as (scheduler, pool):
        blocker = asyncio.ensure_future(scheduler.submit("double", 10))
        await asyncio.sleep(0.03)
        outcomes = await asyncio.gather(*(scheduler.submit("double", i) for i in range(1, 6)),
                                        return_exceptions=True)
        await blocker
        assert [o.value if not isinstance(o, Exception) else "failed" for o in outcomes] == [2, 4, "failed", 8, 10]
        assert isinstance(outcomes[2], ValueError)
        assert scheduler.stats()["double"]["failed_calls"] == 2  # the batch, then item 3 alone


async def test_batches_are_spread_over_every_device():
    model = SlowDouble(seconds=0.2)
    async with scheduling(model, max_batch=2, devices=2) as (scheduler, pool):
        results = await asyncio.gather(*(scheduler.submit("double", i) for i in range(8)))
        assert [r.value for r in results] == [2 * i for i in range(8)]
        assert len(model.threads) == 2  # each device has its own thread
        assert all(device.batches >= 1 for device in pool)
        assert sum(device.batches for device in pool) == len(model.batches)


def test_batch_sizes_default_per_device_and_an_explicit_size_wins():
    unset = BatchConfig()
    assert resolve(unset, "clip", "cuda").max_batch_size == 256
    assert resolve(unset, "clip", "cpu").max_batch_size == 32
    assert resolve(unset, "person", "cpu").max_batch_size == 1
    assert resolve(BatchConfig(max_batch_size=3), "clip", "cuda").max_batch_size == 3


@pytest.mark.parametrize("value", [0, -1])
def test_batch_size_must_be_positive(value):
    with pytest.raises(ValueError):
        BatchConfig(max_batch_size=value)
