"""Live before replay: a replay backlog never starves live requests, and drains at full speed
when the live lane is idle."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from imgstream.consumer.worker import LIVE_IDLE_AFTER_S
from imgstream.schemas.config import KafkaConfig
from tests.test_request_failures import running_worker
from tests.test_reuse import variants
from tests.worker_procs import produce_paced, request_bytes

FACE = [{"operation_id": "face", "type": "detect_bounding_box",
         "params": {"target": "prominent_face", "face_context": "whole_image"}}]


class Results:
    """Reads the results topic in the background: each result's broker timestamp, by request_id."""

    def __init__(self, broker: str, topic: str) -> None:
        self.broker, self.topic = broker, topic
        self.at: dict[str, float] = {}

    async def __aenter__(self) -> Results:
        self._consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.broker, group_id=None,
                                          auto_offset_reset="earliest")
        await self._consumer.start()
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            for records in (await self._consumer.getmany(timeout_ms=100)).values():
                for record in records:
                    request_id = record.key.decode()
                    self.at.setdefault(request_id, record.timestamp / 1000.0)

    async def until(self, request_ids: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(r in self.at for r in request_ids):
            assert time.monotonic() < deadline, f"{sum(r in self.at for r in request_ids)}/{len(request_ids)} results"
            await asyncio.sleep(0.05)

    async def __aexit__(self, *_: object) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()


async def trickle(broker: str, topic: str, paths, prefix: str, per_second: float) -> dict[str, float]:
    """Live requests one at a time at a fixed rate; returns each one's publish time."""
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all")
    await producer.start()
    sent: dict[str, float] = {}
    try:
        for i, path in enumerate(paths):
            request_id = f"{prefix}-{i}"
            sent[request_id] = time.time()
            await producer.send_and_wait(topic, request_bytes(request_id, {"blob": path.as_uri()}, FACE),
                                         key=request_id.encode())
            await asyncio.sleep(1.0 / per_second)
    finally:
        await producer.stop()
    return sent


async def test_a_replay_backlog_never_starves_live_requests(broker, topics, engine, tmp_path):
    images = variants(361, size=96)  # all different bytes: nothing is reused
    paths = []
    for i, data in enumerate(images):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(data)
        paths.append(path)
    alone_paths, mixed_paths, replay_paths = paths[:20], paths[20:40], paths[40:360]
    kafka = KafkaConfig(bootstrap=broker, group=f"g-{uuid.uuid4().hex[:8]}", topics=topics, session_timeout_ms=3000)
    async with running_worker(broker, topics, engine, kafka=kafka, fetch={"blob_roots": [str(tmp_path)]},
                              max_in_flight=16, replay_share=0.2) as worker, \
            Results(broker, topics.results) as results:
        # 0. One request end to end first: the group joined, the model warm.
        warm = await trickle(broker, topics.requests, paths[-1:], "warm", per_second=4)
        await results.until(list(warm), timeout_s=60)
        # 1. The trickle alone.
        alone = await trickle(broker, topics.requests, alone_paths, "alone", per_second=4)
        await results.until(list(alone), timeout_s=60)
        # 2. The same trickle while a replay backlog of 320 requests drains.
        replay_ids = [f"replay-{i}" for i in range(len(replay_paths))]
        await produce_paced(broker, topics.replay, [
            (rid.encode(), request_bytes(rid, {"blob": p.as_uri()}, FACE)) for rid, p in zip(replay_ids, replay_paths)])
        samples: list[tuple[float, int]] = []

        async def watch() -> None:
            while True:
                samples.append((time.monotonic(), worker.in_flight_by_lane()["replay"]))
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.5)  # the worker is into the backlog
        mixed_started = time.monotonic()
        mixed = await trickle(broker, topics.requests, mixed_paths, "mixed", per_second=4)
        await results.until(list(mixed), timeout_s=60)
        mixed_done = time.monotonic()
        # 3. Live is idle now: replay may take every slot.
        await results.until(replay_ids, timeout_s=180)
        watcher.cancel()

    assert max(results.at[r] for r in mixed) < max(results.at[r] for r in replay_ids)  # live done first
    latency = {name: statistics.median(results.at[r] - t for r, t in sent.items())
               for name, sent in (("alone", alone), ("mixed", mixed))}
    # Generous for 2 busy cores: a live request may wait for the replay item on the device.
    assert latency["mixed"] <= 2.0 * latency["alone"] + 0.05, latency
    while_live = max(n for t, n in samples if mixed_started <= t <= mixed_done)
    once_idle = max((n for t, n in samples if t > mixed_done + LIVE_IDLE_AFTER_S + 0.5), default=0)
    assert while_live <= worker.replay_slots == 3  # replay kept to its share while live requests came
    # With live idle, replay is not held to its share: it fills (nearly) every in-flight slot.
    assert once_idle >= 0.75 * worker.config.max_in_flight > worker.replay_slots, (once_idle, worker.replay_slots)
