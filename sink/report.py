"""What the sink says about itself: its lag, and the gauges read at scrape time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiokafka import TopicPartition

if TYPE_CHECKING:
    from imgstream.sink.pgvector import PgVectorSink


def lag_by_partition(sink: PgVectorSink) -> dict[TopicPartition, int]:
    """Records on the assigned partitions not yet written: the end (the last fetch's high watermark or the
    probe's end offset, whichever is further) minus the committed offset."""
    if sink.consumer is None:
        return {}
    lag = {}
    for tp in sink.consumer.assignment():
        position = sink.positions.get(tp)
        ends = [end for end in (sink.consumer.highwater(tp), sink.ends.get(tp)) if end is not None]
        if position is not None and ends:
            lag[tp] = max(0, max(ends) - position)
    return lag


def register_gauges(sink: PgVectorSink) -> None:
    m = sink.metrics
    m.add_gauge("imgstream_sink_consumer_lag", "Records of each assigned results partition not yet written "
                "(end offset minus committed offset).",
                lambda: [({"topic": tp.topic, "partition": str(tp.partition)}, n)
                         for tp, n in lag_by_partition(sink).items()])
    m.add_gauge("imgstream_sink_db_up", "1 while the database takes writes; 0 while it is unreachable.",
                lambda: [({}, 1 if sink.database_reachable else 0)])
    m.add_gauge("imgstream_sink_broker_reachable", "1 when the last broker probe succeeded.",
                lambda: [({}, 1 if sink.broker_reachable else 0)])
    m.add_gauge("imgstream_sink_records_waiting", "Records read but not yet written (the current batch, and "
                "one waiting for the database).",
                lambda: [({}, sink.batch.records + (sink.pending.records if sink.pending else 0))])
    m.add_gauge("imgstream_sink_partitions_paused", "Assigned partitions paused while the database is down.",
                lambda: [({}, len(sink.consumer.paused()) if sink.consumer else 0)])
