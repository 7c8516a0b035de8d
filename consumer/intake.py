"""Intake: the poll loop. It takes records while there is room (requests and image bytes in flight under
their bounds), live before replay, deferred retries only once due; at a bound that lasts it pauses the
partitions and keeps polling, so the worker stays in its group."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from imgstream.analysis.batcher import LIVE, REPLAY
from imgstream.consumer.checkpoint import Checkpoint
from imgstream.consumer.deferred import RETRY, DeferredRetries
from imgstream.consumer.handling import RequestHandler, lane_of
from imgstream.consumer.image_budget import ImageBudget
from imgstream.consumer.lifecycle import Lifecycle
from imgstream.kafka_clients import brief
from imgstream.schemas.config import WorkerConfig

log = logging.getLogger("imgstream.consumer.worker")

POLL_TIMEOUT_MS = 200
# getmany waits without a timeout while a rebalance is in progress; bounding each call keeps
# the loop responsive to SIGTERM and to backpressure even then.
POLL_GUARD_S = 1.0
# At a bound the consumer waits for a request to finish; a bound that lasts longer pauses the partitions.
PAUSE_AFTER_S = 0.5
# The live lane counts as idle (replay may use every slot) once no live request started for this long.
LIVE_IDLE_AFTER_S = 2.0
# Live requests first, then due retries, then replay.
_LANE_ORDER = {LIVE: 0, RETRY: 1, REPLAY: 2}


class Intake:
    """Takes records from the consumer and starts a request for each; `consumer` is set once connected."""

    def __init__(self, config: WorkerConfig, checkpoint: Checkpoint, handler: RequestHandler, images: ImageBudget,
                 retries: DeferredRetries, lifecycle: Lifecycle, room_freed: asyncio.Event) -> None:
        self.config = config
        self.checkpoint = checkpoint
        self.handler = handler
        self.images = images
        self.retries = retries
        self.lifecycle = lifecycle
        self.room_freed = room_freed  # set whenever a request or its image bytes are let go
        self.consumer: AIOKafkaConsumer | None = None
        self._busy = False
        self._last_live_start = float("-inf")

    async def run(self) -> None:
        """Poll until the worker stops."""
        assert self.consumer is not None
        while not self.lifecycle.stopping.is_set():
            room = self._room()
            if room <= 0:
                await self._wait_for_room()
                continue
            replay_room = self._replay_room(room)
            self._pause(self._held_replay(replay_room) | self.retries.held())
            try:
                batches = await asyncio.wait_for(
                    self.consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=room), POLL_GUARD_S)
            except asyncio.TimeoutError:
                batches = {}
            except KafkaError as exc:
                if self.lifecycle.refused(exc, "read"):
                    break
                log.warning("poll failed (%s); retrying", brief(exc))
                await asyncio.sleep(1.0)
                continue
            self._take(batches, room, replay_room)
            await self.checkpoint.commit()

    def _room(self) -> int:
        """How many more requests may start now (0 at either bound)."""
        if self.images.full():
            return 0
        return max(0, self.config.max_in_flight - self.checkpoint.tracker.in_flight())

    # -- lanes: live before replay; deferred retries when due -----------------------------------

    def lane(self, tp: TopicPartition) -> str:
        return lane_of(tp, self.config)

    def in_flight_by_lane(self) -> dict[str, int]:
        tracker = self.checkpoint.tracker
        counts = {LIVE: 0, REPLAY: 0, RETRY: 0}
        for tp in tracker.partitions():
            counts[self.lane(tp)] += tracker.in_flight(tp)
        return counts

    def _live_has_work(self) -> bool:
        """Live requests in flight, started lately, or waiting on an assigned live partition (as far as
        the last fetch saw). "Lately" keeps a trickle of live requests from looking idle between two
        of them, which would let replay fill every slot just before the next one arrives."""
        if self.in_flight_by_lane()[LIVE] or time.monotonic() - self._last_live_start < LIVE_IDLE_AFTER_S:
            return True
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            if self.lane(tp) == LIVE:
                high, position = self.consumer.highwater(tp), self.checkpoint.positions.get(tp)
                if high is not None and position is not None and high > position:
                    return True
        return False

    @property
    def replay_slots(self) -> int:
        """The in-flight slots replay may hold while live work waits (replay_share of max_in_flight)."""
        return int(self.config.replay_share * self.config.max_in_flight)

    def _replay_room(self, room: int) -> int:
        """Replay requests that may start now: all the room while live is idle, else what is left of its share."""
        if not self._live_has_work():
            return room
        return max(0, min(room, self.replay_slots - self.in_flight_by_lane()[REPLAY]))

    def _held_replay(self, replay_room: int) -> set[TopicPartition]:
        """Replay partitions to keep paused: at their share; resumed only once half of it is free again,
        so finishing one replay request does not pause and resume (and refetch) them every time."""
        assert self.consumer is not None
        replay = {tp for tp in self.consumer.assignment() if self.lane(tp) == REPLAY}
        paused = self.consumer.paused() & replay
        resume_at = max(1, self.replay_slots // 2)
        if replay_room <= 0 or (paused and replay_room < resume_at):
            return replay
        return set()

    # -- backpressure ---------------------------------------------------------------------

    async def _wait_for_room(self) -> None:
        """At a bound: wait for a request to finish, not for a poll timer.

        A bound that lasts (PAUSE_AFTER_S) pauses every assigned partition and keeps polling, so
        the member stays in its group (heartbeats, max.poll.interval); a short one pauses nothing,
        which keeps the records aiokafka has prefetched (pausing discards them).
        """
        assert self.consumer is not None
        self.room_freed.clear()
        if self._room() > 0:
            return
        try:
            await asyncio.wait_for(self.room_freed.wait(), PAUSE_AFTER_S)
            return
        except asyncio.TimeoutError:
            pass
        # Checked every round: partitions assigned by a rebalance arrive unpaused.
        self._pause(self.consumer.assignment())
        try:
            await asyncio.wait_for(self.consumer.getmany(timeout_ms=0), POLL_GUARD_S)
        except asyncio.TimeoutError:
            pass
        except KafkaError as exc:
            self.lifecycle.refused(exc, "read")
        await self.checkpoint.commit()

    def _pause(self, partitions: set[TopicPartition]) -> None:
        """Pause exactly `partitions` of the assignment; resume the others."""
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        want = set(partitions) & assigned
        paused = self.consumer.paused() & assigned
        try:
            if want - paused:
                self.consumer.pause(*(want - paused))
            if paused - want:
                self.consumer.resume(*(paused - want))
        except IllegalStateError:  # the assignment changed under us; next round sees the new one
            return
        busy = bool(want)
        if busy != self._busy:
            self._busy = busy
            log.debug("%s: %d requests and %d image bytes in flight (bounds %d and %d)",
                      "paused partitions" if busy else "resumed partitions", self.checkpoint.tracker.in_flight(),
                      self.images.held, self.config.max_in_flight, self.config.max_in_flight_image_bytes)

    # -- starting requests ----------------------------------------------------------------

    def _take(self, batches: dict[TopicPartition, list[Any]], room: int, replay_room: int) -> None:
        """Start the fetched records that fit (replay ones within `replay_room`, retries once due); rewind
        each partition to its first one left over."""
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        # Live partitions first: a poll that returns both lanes must not let replay take the room.
        for tp, records in sorted(batches.items(), key=lambda item: _LANE_ORDER[self.lane(item[0])]):
            if tp in self.checkpoint.revoking or tp not in assigned:
                continue  # its new owner starts from the committed watermark
            lane = self.lane(tp)
            replay = lane == REPLAY
            for record in records:
                if room <= 0 or (replay and replay_room <= 0):
                    # A rebalance can hand over unpaused partitions mid-poll; give back the excess.
                    self.consumer.seek(tp, record.offset)
                    break
                if lane == RETRY and self.retries.hold_until_due(tp, record):
                    # Not due: wait at this record, paused (not polled) until it is.
                    self.consumer.seek(tp, record.offset)
                    self.consumer.pause(tp)
                    break
                self._start(tp, record, lane)
                room -= 1
                replay_room -= replay

    def _start(self, tp: TopicPartition, record: Any, lane: str) -> None:
        if lane == LIVE:
            self._last_live_start = time.monotonic()
        task = asyncio.create_task(self._request(tp, record), name=f"req-{tp.topic}-{tp.partition}-{record.offset}")
        self.checkpoint.started(tp, record.offset, task)

    async def _request(self, tp: TopicPartition, record: Any) -> None:
        tracing = self.handler.tracing
        if tracing.enabled:  # the request's span: from here to its last result acknowledged
            with tracing.request(tp, record, self.config.kafka.group):
                finished = await self.handler.process(tp, record)
        else:
            finished = await self.handler.process(tp, record)
        if finished:
            self.checkpoint.finished(tp, record.offset)
        self.room_freed.set()
