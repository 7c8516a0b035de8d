"""The worker's Prometheus metrics: counters and histograms of what happens to requests (live values are
read at scrape time: consumer/report.py registers them)."""

from __future__ import annotations

from imgstream.service.metrics import LATENCY_BUCKETS_MS, Counter, Histogram, Metrics


class WorkerMetrics(Metrics):
    """The worker's metrics."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.requests = Counter("imgstream_requests_consumed_total", "Request events consumed, by topic.",
                                ["topic"], registry=r)
        self.results = Counter("imgstream_results_total", "Results published, by status and error code.",
                               ["status", "error_code"], registry=r)
        self.dlq = Counter("imgstream_dlq_records_total", "Events sent to the DLQ, by reason code.",
                           ["reason"], registry=r)
        self.fetch_ms = Histogram("imgstream_fetch_latency_ms",
                                  "Image fetch latency, by outcome (ok or the error code).", ["outcome"],
                                  buckets=LATENCY_BUCKETS_MS, registry=r)
        self.request_ms = Histogram("imgstream_request_latency_ms", "Consume-to-ack latency per request.",
                                    buckets=LATENCY_BUCKETS_MS, registry=r)
        self.commits = Counter("imgstream_commits_total", "Offset commits, by outcome.", ["outcome"], registry=r)
        self.crops_offloaded = Counter("imgstream_crops_offloaded_total",
                                       "Crops written to the blob store because the result was too large.",
                                       registry=r)
        self.rebalances = Counter("imgstream_rebalance_events_total",
                                  "Partition assignments and revocations seen by this worker.", ["event"],
                                  registry=r)
        self.abandoned = Counter("imgstream_requests_abandoned_total",
                                 "Requests cut short at a revoke or shutdown deadline (redone later).", registry=r)
        self.unhandled = Counter("imgstream_requests_unhandled_total",
                                 "Requests that could be neither answered nor dead-lettered (see the log); their "
                                 "offsets were released so the partition moves on.", registry=r)
