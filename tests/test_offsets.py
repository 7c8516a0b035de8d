"""Commit watermarks: never past an unfinished request."""

from aiokafka import TopicPartition

from imgstream.consumer.offsets import OffsetTracker

TP = TopicPartition("t", 0)


def test_watermark_stays_below_the_oldest_unfinished_request():
    tracker = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.start(TP, offset)
    tracker.finish(TP, 11)
    tracker.finish(TP, 12)
    assert tracker.watermark(TP) == 10
    tracker.finish(TP, 10)
    assert tracker.watermark(TP) == 13


def test_to_commit_reports_only_moved_watermarks():
    tracker = OffsetTracker()
    tracker.start(TP, 0)
    tracker.finish(TP, 0)
    assert tracker.to_commit() == {TP: 1}
    tracker.committed({TP: 1})
    assert tracker.to_commit() == {}


def test_forgotten_partition_ignores_late_finishes():
    tracker = OffsetTracker()
    tracker.start(TP, 5)
    tracker.forget({TP})
    tracker.finish(TP, 5)
    assert tracker.watermark(TP) is None and tracker.in_flight() == 0


def test_watermark_follows_any_order_of_starts_and_finishes():
    import random

    rng = random.Random(7)
    tracker = OffsetTracker()
    other = TopicPartition("t", 1)
    started: set[int] = set()
    done: set[int] = set()
    offsets = list(range(500))
    rng.shuffle(offsets)  # a rewound partition can start an offset below ones already started
    for offset in offsets:
        tracker.start(TP, offset)
        tracker.start(other, offset)
        started.add(offset)
        if rng.random() < 0.7:
            finish = rng.choice(sorted(started - done))
            tracker.finish(TP, finish)
            done.add(finish)
        unfinished = started - done
        expected = min(unfinished) if unfinished else max(done) + 1
        assert tracker.watermark(TP) == expected, (offset, expected)
        assert tracker.in_flight(TP) == len(unfinished)
        assert tracker.in_flight() == len(unfinished) + len(started)
    tracker.forget({other})
    assert tracker.in_flight() == len(started - done)


def test_one_stuck_request_keeps_the_watermark_and_bounds_the_heap():
    tracker = OffsetTracker()
    tracker.start(TP, 0)  # never finishes
    for offset in range(1, 10_001):
        tracker.start(TP, offset)
        tracker.finish(TP, offset)
        assert tracker.watermark(TP) == 0
    state = tracker._partitions[TP]
    assert len(state.heap) <= 4 * len(state.in_flight) + 64
    tracker.finish(TP, 0)
    assert tracker.watermark(TP) == 10_001 and tracker.in_flight() == 0


def test_starting_an_offset_twice_counts_it_once():
    tracker = OffsetTracker()
    tracker.start(TP, 3)
    tracker.start(TP, 3)
    assert tracker.in_flight() == 1
    tracker.finish(TP, 3)
    assert tracker.in_flight() == 0 and tracker.watermark(TP) == 4
