"""Prometheus metrics for imgstream's services, on prometheus-client's registry and exposition.

Event counts and latencies are prometheus-client Counters and Histograms updated where
they happen; values that live elsewhere (requests in flight, lag, the batchers' tallies)
are read at scrape time by a collector, so they are never stale and never double-kept.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY_BUCKETS_MS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Labels = dict[str, str]
# (labels, value) samples of a gauge or counter read at scrape time.
ReadSamples = Callable[[], Iterable[tuple[Labels, float]]]
# (labels, {observed value: count}, sum) of a histogram whose tallies are kept elsewhere.
ReadTallies = Callable[[], Iterable[tuple[Labels, dict[float, int], float]]]


@dataclass(frozen=True)
class _Live:
    kind: Literal["gauge", "counter", "histogram"]
    name: str
    help: str
    read: Callable[[], Iterable[tuple]]
    buckets: tuple[float, ...] = ()


class LiveCollector(Collector):
    """Families whose samples are read from callbacks at scrape time."""

    def __init__(self) -> None:
        self._live: list[_Live] = []

    def add(self, live: _Live) -> None:
        self._live.append(live)

    def describe(self) -> list[Metric]:
        # An empty describe() keeps the registry from calling collect() at registration time,
        # when the worker's state (consumer, engine) may not exist yet.
        return []

    def collect(self) -> Iterator[Metric]:
        for live in self._live:
            try:
                family = self._family(live)
            except Exception:  # noqa: BLE001 - one broken callback must not take the whole scrape down
                log.exception("metric %s could not be read", live.name)
                continue
            yield family

    @staticmethod
    def _family(live: _Live) -> Metric:
        samples = list(live.read())
        names = sorted({name for labels, *_ in samples for name in labels})
        if live.kind == "histogram":
            histogram = HistogramMetricFamily(live.name, live.help, labels=names)
            for labels, tallies, total in samples:
                buckets = [(_bound(b), sum(n for v, n in tallies.items() if v <= b))
                           for b in (*live.buckets, math.inf)]
                histogram.add_metric([labels.get(n, "") for n in names], buckets, float(total))
            return histogram
        family_type = GaugeMetricFamily if live.kind == "gauge" else CounterMetricFamily
        family = family_type(live.name, live.help, labels=names)
        for labels, value in samples:
            family.add_metric([labels.get(n, "") for n in names], float(value))
        return family


class _RememberedLabels:
    """`labels()` remembered by the values asked for: a metric updated on every request costs a dict
    lookup there, not prometheus-client's name checks, sort and lock each time."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._children: dict[tuple, object] = {}

    def labels(self, *labelvalues: object, **labelkwargs: object):  # type: ignore[no-untyped-def]
        key = (labelvalues, tuple(labelkwargs.items()))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = super().labels(*labelvalues, **labelkwargs)  # type: ignore[misc]
        return child

    def remove(self, *labelvalues: object) -> None:
        self._children.clear()
        super().remove(*labelvalues)  # type: ignore[misc]

    def clear(self) -> None:
        self._children.clear()
        super().clear()  # type: ignore[misc]


class Counter(_RememberedLabels, prometheus_client.Counter):
    """prometheus-client's Counter with remembered labels."""


class Histogram(_RememberedLabels, prometheus_client.Histogram):
    """prometheus-client's Histogram with remembered labels."""


def _bound(value: float) -> str:
    return "+Inf" if math.isinf(value) else str(float(value))


class Metrics:
    """A registry of its own (several workers or sinks can share a process in tests) with live families."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._live = LiveCollector()
        self.registry.register(self._live)

    def add_gauge(self, name: str, help_text: str, read: ReadSamples) -> None:
        self._live.add(_Live("gauge", name, help_text, read))

    def add_live_counter(self, name: str, help_text: str, read: ReadSamples) -> None:
        self._live.add(_Live("counter", name, help_text, read))

    def add_live_histogram(self, name: str, help_text: str, read: ReadTallies,
                           buckets: Iterable[float] = BATCH_BUCKETS) -> None:
        self._live.add(_Live("histogram", name, help_text, read, tuple(sorted(buckets))))

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 when it was never set), for tests and logs."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape body and its content type, in the format the scraper's Accept header asks for."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
