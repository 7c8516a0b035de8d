"""The metrics registry, read back with prometheus-client's own parser, and the HTTP port that serves it."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from imgstream.service.health import build_app, start_server
from imgstream.consumer.metrics import WorkerMetrics
from imgstream.producer.embedded_broker import find_free_port
from imgstream.schemas.config import WorkerConfig


def _samples(metrics: WorkerMetrics, accept: str = "") -> dict:
    body, _ = metrics.exposition(accept)
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_live_values_are_read_at_scrape_time_and_histograms_are_cumulative():
    metrics = WorkerMetrics()
    state = {"in_flight": 3}
    metrics.add_gauge("imgstream_requests_in_flight", "in flight", lambda: [({}, state["in_flight"])])
    metrics.add_live_histogram("imgstream_model_batch_size", "sizes",
                               lambda: [({"model": "clip"}, {1: 2, 8: 1, 300: 1}, 310.0)])
    metrics.results.labels(status="success", error_code="").inc(2)
    samples = _samples(metrics)
    assert samples[("imgstream_requests_in_flight", frozenset())] == 3
    assert samples[("imgstream_results_total", frozenset({("status", "success"), ("error_code", "")}))] == 2
    bucket = {dict(labels)["le"]: v for (name, labels), v in samples.items()
              if name == "imgstream_model_batch_size_bucket"}
    assert bucket["1.0"] == 2 and bucket["4.0"] == 2 and bucket["8.0"] == 3 and bucket["256.0"] == 3
    assert bucket["+Inf"] == 4
    assert samples[("imgstream_model_batch_size_count", frozenset({("model", "clip")}))] == 4
    assert samples[("imgstream_model_batch_size_sum", frozenset({("model", "clip")}))] == 310.0
    state["in_flight"] = 0
    assert _samples(metrics)[("imgstream_requests_in_flight", frozenset())] == 0


def test_a_broken_callback_drops_only_its_own_metric():
    metrics = WorkerMetrics()
    metrics.add_gauge("imgstream_consumer_lag", "lag", lambda: 1 / 0)
    metrics.add_gauge("imgstream_broker_reachable", "up", lambda: [({}, 1)])
    samples = _samples(metrics)
    assert samples[("imgstream_broker_reachable", frozenset())] == 1
    assert not any(name == "imgstream_consumer_lag" for name, _ in samples)


def test_openmetrics_is_served_when_asked_for():
    metrics = WorkerMetrics()
    body, content_type = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    _, plain = metrics.exposition("")
    assert plain.startswith("text/plain")


async def test_the_http_port_binds_the_configured_address_loopback_by_default():
    port = find_free_port()
    runner = await start_server(build_app(WorkerMetrics(), lambda: {"ok": True}), port, WorkerConfig().http_host)
    try:
        assert runner.addresses == [("127.0.0.1", port)]
    finally:
        await runner.cleanup()
    runner = await start_server(build_app(WorkerMetrics(), lambda: {"ok": True}, operations=False), port, "0.0.0.0")
    try:
        assert runner.addresses == [("0.0.0.0", port)]
        assert "/operations" not in {r.resource.canonical for r in runner.app.router.routes()}
    finally:
        await runner.cleanup()
