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
