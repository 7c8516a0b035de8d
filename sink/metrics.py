"""The sink's Prometheus metrics."""

from __future__ import annotations

from imgstream.service.metrics import LATENCY_BUCKETS_MS, Counter, Histogram, Metrics


class SinkMetrics(Metrics):
    """The sink's metrics (`imgstream sink pgvector --http-port`)."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.records = Counter("imgstream_sink_records_total", "Records read from the results topic and "
                               "settled (written or skipped), by outcome: written, malformed, rejected.",
                               ["outcome"], registry=r)
        self.rows = Counter("imgstream_sink_rows_written_total", "Rows upserted, by table.", ["table"], registry=r)
        self.batches = Counter("imgstream_sink_batches_total", "Batches written (one transaction each).",
                               registry=r)
        self.write_ms = Histogram("imgstream_sink_write_latency_ms", "Database time per batch written.",
                                  buckets=LATENCY_BUCKETS_MS, registry=r)
        self.db_errors = Counter("imgstream_sink_db_errors_total", "Database operations that failed on the "
                                 "connection (the batch waits and is retried), by operation: connect, write.",
                                 ["operation"], registry=r)
        self.db_retries = Counter("imgstream_sink_db_retries_total", "Reconnects tried while the database "
                                  "was unreachable.", registry=r)
        self.commits = Counter("imgstream_sink_commits_total", "Offset commits after a batch, by outcome.",
                               ["outcome"], registry=r)
