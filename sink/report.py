"""What the sink says about itself: its lag, the gauges read at scrape time, and each batch written."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiokafka import TopicPartition

from imgstream.kafka_clients import brief
from imgstream.sink.rows import WriteReport

if TYPE_CHECKING:
    from imgstream.sink.batch import Batch
    from imgstream.sink.pgvector import PgVectorSink

log = logging.getLogger("imgstream.sink")


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


def account(sink: PgVectorSink, batch: Batch, report: WriteReport, db_ms: float) -> None:
    """A batch written: the totals, the metrics and the batch's log line."""
    stats, m = sink.stats, sink.metrics
    records, malformed = batch.records, sum(batch.malformed.values())
    rejected = sum(batch.rejected.values()) + len(report.rejected)
    stats.batches += 1
    stats.records += records
    stats.rows += report.rows
    stats.malformed += malformed
    stats.rejected += rejected
    stats.rows_by_table.update(report.written)
    m.batches.inc()
    m.write_ms.observe(db_ms)
    m.records.labels(outcome="written").inc(records - malformed - rejected)
    m.records.labels(outcome="malformed").inc(malformed)
    m.records.labels(outcome="rejected").inc(rejected)
    for table, n in report.written.items():
        m.rows.labels(table=table).inc(n)
    for event_id, why in report.rejected:
        log.warning("database rejected result %s: %s", event_id, brief(why, 300))
    tables = ", ".join(f"{t} {n}" for t, n in sorted(report.written.items())) or "none"
    log.info("batch %d: %d records -> %d rows (%s), %d skipped, db %.0f ms, lag %s; total %d rows",
             stats.batches, records, report.rows, tables, malformed + rejected, db_ms,
             sum(lag_by_partition(sink).values()), stats.rows)
