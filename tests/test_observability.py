"""The worker's HTTP port and logs, scraped from a real worker process."""

from __future__ import annotations

import asyncio
import re
import time

import orjson
from prometheus_client.parser import text_string_to_metric_families

from imgstream.producer.embedded_broker import find_free_port
from tests.kafka_helpers import consume_all
from tests.worker_procs import (  # noqa: F401 - `workers` is a fixture
    WorkerProc,
    produce_paced,
    request_bytes,
    small_photo,
    workers,
)


def parse_prometheus(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a text exposition, read by prometheus-client's own parser (it raises on bad lines)."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for metric in text_string_to_metric_families(text):
        assert metric.type in ("counter", "gauge", "histogram"), (metric.name, metric.type)
        for s in metric.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples


def sample(samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def family(samples, name: str) -> dict[frozenset, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


async def _until_ready(worker: WorkerProc, timeout_s: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status, body, _ = worker.get("/readyz")
        if status == 200:
            return orjson.loads(body)
        assert worker.alive(), f"worker exited; log:\n{worker.tail()}"
        assert time.monotonic() < deadline, f"/readyz still {status} {body!r}; log:\n{worker.tail()}"
        await asyncio.sleep(0.3)


async def test_health_operations_and_metrics_of_a_running_worker(broker, topics, workers, tmp_path):
    worker = workers.start(http_port=find_free_port(), env={"IMGSTREAM_MODELS__REUSE": "true"})
    ready = await _until_ready(worker)
    assert ready == {"ready": True, "checks": {"models_loaded": True, "broker_reachable": True}}
    status, body, _ = worker.get("/healthz")
    assert (status, orjson.loads(body)) == (200, {"status": "ok"})
    status, body, headers = worker.get("/operations")
    operations = orjson.loads(body)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert set(operations) == {"detect_bounding_box", "embed_clip_vit_b_32", "embed_dino_v2", "classify",
                               "describe_image"}
    assert operations["detect_bounding_box"]["default_target"] == "prominent_person"

    image = {"blob": small_photo(tmp_path / "face.jpg").as_uri()}
    messages = [(f"obs-{i}".encode(), request_bytes(f"obs-{i}", image)) for i in range(3)]
    messages.append((b"obs-missing", request_bytes("obs-missing", {"blob": (tmp_path / "gone.jpg").as_uri()})))
    messages.append((b"obs-garbage", b"{definitely not json"))
    await produce_paced(broker, topics.requests, messages)
    assert len(await consume_all(broker, topics.results, 8, timeout_s=60)) == 8
    assert len(await consume_all(broker, topics.dlq, 1, timeout_s=30)) == 1

    deadline = time.monotonic() + 15
    while True:  # counters move once the broker acknowledged, commits up to 0.5 s later
        status, body, headers = worker.get("/metrics")
        assert status == 200
        samples = parse_prometheus(body.decode())
        settled = sample(samples, "imgstream_results_total", status="success", error_code="") == 6 and \
            sample(samples, "imgstream_commits_total", outcome="ok")
        if settled or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert headers["Content-Type"].startswith("text/plain; version=")
    assert sample(samples, "imgstream_requests_consumed_total", topic=topics.requests) == 5
    assert sample(samples, "imgstream_results_total", status="success", error_code="") == 6
    assert sample(samples, "imgstream_results_total", status="error", error_code="image_fetch_failed") == 2
    assert sample(samples, "imgstream_dlq_records_total", reason="not_json") == 1
    # Every result went out in a batch (per partition and linger): 8 results, in at most 8 batches.
    assert sample(samples, "imgstream_result_batch_records_total") == 8
    assert 1 <= sample(samples, "imgstream_result_batches_total") <= 8
    assert sample(samples, "imgstream_requests_in_flight") == 0
    assert sample(samples, "imgstream_image_bytes_in_flight") == 0
    assert sample(samples, "imgstream_broker_reachable") == 1
    assert sample(samples, "imgstream_fetch_latency_ms_count", outcome="ok") == 3
    assert sample(samples, "imgstream_fetch_latency_ms_count", outcome="image_fetch_failed") == 1
    assert sample(samples, "imgstream_fetch_latency_ms_bucket", outcome="ok", le="+Inf") == 3
    batches = sample(samples, "imgstream_model_batch_size_count", model="face")
    assert batches and batches == sample(samples, "imgstream_model_batch_size_bucket", model="face", le="+Inf")
    assert batches == sample(samples, "imgstream_model_batches_total", model="face")
    # The three requests carry the same image bytes: one detection serves all of them, and the
    # other two requests' tasks (2 each) say they were reused.
    assert sample(samples, "imgstream_model_items_total", model="face") == 1
    reused = family(samples, "imgstream_reuse_total")
    assert set(dict(labels)["kind"] for labels in reused) == {"in_flight", "cached"} and sum(reused.values()) == 4
    assert sample(samples, "imgstream_reuse_cache_entries") >= 1
    assert sample(samples, "imgstream_model_queue_wait_ms_total", model="face") >= 0
    assert sample(samples, "imgstream_commits_total", outcome="ok") >= 1
    lag = family(samples, "imgstream_consumer_lag")
    assert lag and all(dict(labels)["topic"] == topics.requests for labels in lag)
    assert set(lag.values()) == {0.0}

    # A scraper that asks for OpenMetrics gets it (prometheus-client negotiates the format).
    status, body, headers = worker.get("/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")

    log = worker.log()
    assert "[request_id=obs-0] request obs-0: 2 results" in log
    assert re.search(r"\[request_id=obs-missing\] .*image_fetch_failed", log)
    assert await worker.terminate() == 0


async def test_readyz_says_not_ready_while_the_broker_is_unreachable(workers):
    workers.bootstrap = f"127.0.0.1:{find_free_port()}"  # nothing listens there
    worker = workers.start(http_port=find_free_port())
    # the worker's own retries (after the models loaded), not the login preflight's line before it
    await worker.wait_for_log(r"broker 127\.0\.0\.1:\d+ unreachable \(attempt", timeout_s=90)
    status, body, _ = worker.get("/healthz")
    assert status == 200
    status, body, _ = worker.get("/readyz")
    assert status == 503
    assert orjson.loads(body) == {"ready": False, "checks": {"models_loaded": True, "broker_reachable": False}}
    status, body, _ = worker.get("/metrics")
    assert status == 200 and sample(parse_prometheus(body.decode()), "imgstream_broker_reachable") == 0
    assert await worker.terminate(timeout_s=20) == 0
