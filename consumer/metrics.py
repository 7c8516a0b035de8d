"""A small Prometheus text-format registry for the worker's /metrics."""

from __future__ import annotations

import logging
import math
import threading
from typing import Callable, Iterable

LabelKey = tuple[tuple[str, str], ...]

log = logging.getLogger(__name__)


def _key(labels: dict[str, str] | None) -> LabelKey:
    return tuple(sorted((labels or {}).items()))


def _fmt_labels(key: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = key + extra
    if not items:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), " ")}"'
               for k, v in items)
    return "{" + ",".join(escaped) + "}"


def _fmt_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self._values: dict[LabelKey, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(_key(labels), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            return [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in sorted(self._values.items())]


class Gauge(_Metric):
    """A gauge whose samples are read from a callback at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str,
                 read: Callable[[], Iterable[tuple[dict[str, str], float]]]) -> None:
        super().__init__(name, help_text)
        self._read = read

    def lines(self) -> list[str]:
        return [f"{self.name}{_fmt_labels(_key(labels))} {_fmt_value(v)}" for labels, v in self._read()]


class LiveCounter(Gauge):
    """A counter whose totals are kept elsewhere and read from a callback at scrape time."""

    kind = "counter"


class LiveHistogram(_Metric):
    """A histogram read at scrape time from tallies kept elsewhere: (labels, {value: count}, sum)."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Iterable[float],
                 read: Callable[[], Iterable[tuple[dict[str, str], dict[float, int], float]]]) -> None:
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._read = read

    def lines(self) -> list[str]:
        out = []
        for labels, tallies, total in self._read():
            key = _key(labels)
            for bound in self.buckets:
                count = sum(n for value, n in tallies.items() if value <= bound)
                out.append(f"{self.name}_bucket{_fmt_labels(key, (('le', _fmt_value(bound)),))} {count}")
            out.append(f"{self.name}_sum{_fmt_labels(key)} {_fmt_value(total)}")
            out.append(f"{self.name}_count{_fmt_labels(key)} {sum(tallies.values())}")
        return out


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Iterable[float]) -> None:
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts: dict[LabelKey, list[int]] = {}
        self._sums: dict[LabelKey, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = _key(labels)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * len(self.buckets))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def lines(self) -> list[str]:
        out = []
        with self._lock:
            for key, counts in sorted(self._counts.items()):
                for bound, count in zip(self.buckets, counts):
                    out.append(f"{self.name}_bucket{_fmt_labels(key, (('le', _fmt_value(bound)),))} {count}")
                out.append(f"{self.name}_sum{_fmt_labels(key)} {_fmt_value(self._sums[key])}")
                out.append(f"{self.name}_count{_fmt_labels(key)} {counts[-1]}")
        return out


class Registry:
    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics:
            try:
                samples = metric.lines()
            except Exception:  # noqa: BLE001 - one broken callback must not take the whole scrape down
                log.exception("metric %s could not be read", metric.name)
                continue
            lines.extend(metric.header())
            lines.extend(samples)
        return "\n".join(lines) + "\n"


LATENCY_BUCKETS_MS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class WorkerMetrics:
    """The worker's metrics; gauges read live state through callbacks set by the worker."""

    def __init__(self) -> None:
        self.registry = Registry()
        r = self.registry
        self.requests = r.add(Counter("imgstream_requests_consumed_total", "Request events consumed, by topic."))
        self.results = r.add(Counter("imgstream_results_total", "Results published, by status and error code."))
        self.dlq = r.add(Counter("imgstream_dlq_records_total", "Events sent to the DLQ, by reason code."))
        self.fetch_ms = r.add(Histogram("imgstream_fetch_latency_ms",
                                        "Image fetch latency, by outcome (ok or the error code).", LATENCY_BUCKETS_MS))
        self.request_ms = r.add(Histogram("imgstream_request_latency_ms", "Consume-to-ack latency per request.",
                                          LATENCY_BUCKETS_MS))
        self.commits = r.add(Counter("imgstream_commits_total", "Offset commits, by outcome."))
        self.crops_offloaded = r.add(Counter("imgstream_crops_offloaded_total",
                                             "Crops written to the blob store because the result was too large."))
        self.rebalances = r.add(Counter("imgstream_rebalance_events_total",
                                        "Partition assignments and revocations seen by this worker."))
        self.abandoned = r.add(Counter("imgstream_requests_abandoned_total",
                                       "Requests cut short at a revoke or shutdown deadline (redone later)."))

    def add_gauge(self, name: str, help_text: str,
                  read: Callable[[], Iterable[tuple[dict[str, str], float]]]) -> None:
        self.registry.add(Gauge(name, help_text, read))

    def add_live_counter(self, name: str, help_text: str,
                         read: Callable[[], Iterable[tuple[dict[str, str], float]]]) -> None:
        self.registry.add(LiveCounter(name, help_text, read))

    def add_live_histogram(self, name: str, help_text: str,
                           read: Callable[[], Iterable[tuple[dict[str, str], dict[float, int], float]]],
                           buckets: Iterable[float] = BATCH_BUCKETS) -> None:
        self.registry.add(LiveHistogram(name, help_text, buckets, read))

    def render(self) -> str:
        return self.registry.render()
