"""Per-partition commit watermarks: commit only below the oldest unfinished request."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from aiokafka import TopicPartition


@dataclass
class _PartitionOffsets:
    in_flight: set[int] = field(default_factory=set)
    # The in-flight offsets as a min-heap, plus finished ones not yet popped (they are dropped when they
    # reach the top): the oldest unfinished offset without a scan of the set.
    heap: list[int] = field(default_factory=list)
    highest_done: int = -1
    committed: int | None = None

    def oldest(self) -> int | None:
        heap, in_flight = self.heap, self.in_flight
        while heap and heap[0] not in in_flight:
            heapq.heappop(heap)
        if len(heap) > 4 * len(in_flight) + 64:
            # An old request still running keeps everything finished after it in the heap: rebuild.
            self.heap = heap = sorted(in_flight)
        return heap[0] if heap else None


class OffsetTracker:
    """Tracks which offsets are in flight and which are finished, per partition.

    The committable offset of a partition is the lowest offset still in flight, or one
    past the highest finished offset when nothing is in flight: every request below it
    has all its results acknowledged by the broker (or went to the DLQ). Starting and
    finishing a record cost O(log n) for n in flight (a heap), the count in flight O(1).
    """

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, _PartitionOffsets] = {}
        self._in_flight = 0

    def start(self, tp: TopicPartition, offset: int) -> None:
        state = self._partitions.get(tp)
        if state is None:
            state = self._partitions[tp] = _PartitionOffsets()
        if offset not in state.in_flight:
            state.in_flight.add(offset)
            heapq.heappush(state.heap, offset)
            self._in_flight += 1

    def finish(self, tp: TopicPartition, offset: int) -> None:
        state = self._partitions.get(tp)
        if state is None:  # partition was revoked meanwhile; its new owner redoes the work
            return
        if offset in state.in_flight:
            state.in_flight.remove(offset)
            self._in_flight -= 1
        if offset > state.highest_done:
            state.highest_done = offset

    def in_flight(self, tp: TopicPartition | None = None) -> int:
        if tp is not None:
            state = self._partitions.get(tp)
            return len(state.in_flight) if state else 0
        return self._in_flight

    def watermark(self, tp: TopicPartition) -> int | None:
        """The offset to commit for `tp` (the next one to read), or None if nothing finished."""
        state = self._partitions.get(tp)
        if state is None:
            return None
        oldest = state.oldest()
        if oldest is not None:
            return oldest
        return state.highest_done + 1 if state.highest_done >= 0 else None

    def to_commit(self, partitions: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Watermarks that moved since the last `committed()` call."""
        out: dict[TopicPartition, int] = {}
        for tp, state in self._partitions.items():
            if partitions is not None and tp not in partitions:
                continue
            mark = self.watermark(tp)
            if mark is not None and mark != state.committed:
                out[tp] = mark
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            state = self._partitions.get(tp)
            if state is not None:
                state.committed = offset

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drop revoked partitions: the new owner starts from the last committed offset."""
        for tp in partitions:
            state = self._partitions.pop(tp, None)
            if state is not None:
                self._in_flight -= len(state.in_flight)

    def partitions(self) -> set[TopicPartition]:
        return set(self._partitions)
