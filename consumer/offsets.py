"""Per-partition commit watermarks: commit only below the oldest unfinished request."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka import TopicPartition


@dataclass
class _PartitionOffsets:
    in_flight: set[int] = field(default_factory=set)
    highest_done: int = -1
    committed: int | None = None


class OffsetTracker:
    """Tracks which offsets are in flight and which are finished, per partition.

    The committable offset of a partition is the lowest offset still in flight, or one
    past the highest finished offset when nothing is in flight: every request below it
    has all its results acknowledged by the broker (or went to the DLQ).
    """

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, _PartitionOffsets] = {}

    def start(self, tp: TopicPartition, offset: int) -> None:
        self._partitions.setdefault(tp, _PartitionOffsets()).in_flight.add(offset)

    def finish(self, tp: TopicPartition, offset: int) -> None:
        state = self._partitions.get(tp)
        if state is None:  # partition was revoked meanwhile; its new owner redoes the work
            return
        state.in_flight.discard(offset)
        state.highest_done = max(state.highest_done, offset)

    def in_flight(self, tp: TopicPartition | None = None) -> int:
        if tp is not None:
            state = self._partitions.get(tp)
            return len(state.in_flight) if state else 0
        return sum(len(s.in_flight) for s in self._partitions.values())

    def watermark(self, tp: TopicPartition) -> int | None:
        """The offset to commit for `tp` (the next one to read), or None if nothing finished."""
        state = self._partitions.get(tp)
        if state is None:
            return None
        if state.in_flight:
            return min(state.in_flight)
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
            self._partitions.pop(tp, None)

    def partitions(self) -> set[TopicPartition]:
        return set(self._partitions)
