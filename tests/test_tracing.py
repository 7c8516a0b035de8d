"""Tracing through the stream: W3C trace context in Kafka headers, the worker's spans (the SDK's in-memory
exporter), the sink's and submit's, JSON log lines, and nothing at all while tracing is off."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from imgstream.cli import parse_args
from imgstream.consumer.worker import Worker
from imgstream.producer.embedded_broker import EmbeddedBroker, find_free_port
from imgstream.producer.submit import ImageInput, build_requests, submit
from imgstream.schemas.config import BatchConfig, FetchConfig, KafkaConfig, ModelsConfig, WorkerConfig, load_config
from imgstream.schemas.events import AnalysisRequest, ImageRef, Task
from imgstream.schemas.flags import overrides
from imgstream.service.logs import setup_logging, use_trace_ids
from imgstream.service.otel import OtelTracing, otlp_provider, redact_url
from imgstream.sink.pgvector import PgVectorSink
from tests.engine_helpers import photo
from tests.kafka_helpers import consume_all, produce, running
from tests.test_sink import db, embedding_result, sink_configs  # noqa: F401 - `db` is a fixture

ROOT = Path(__file__).resolve().parent.parent
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01".encode()


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def tracing(exporter) -> OtelTracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield OtelTracing(provider)
    use_trace_ids(None)  # later tests' log records carry no trace ids


@pytest.fixture
def spans(exporter) -> InMemorySpanExporter:
    exporter.clear()
    yield exporter
    exporter.clear()


@pytest.fixture(scope="module")
async def traced_engine(tmp_path_factory):
    """An engine whose CLIP batches wait (up to a minute) while an image decodes, so that the test can have
    many requests share one batch; reuse off, so every request queues its own items."""
    from imgstream.analysis.engine import Engine

    config = ModelsConfig(
        weights="random", device="cpu", reuse=False, preload=["clip", "face"],
        classifiers_dir=str(tmp_path_factory.mktemp("classifiers")),
        batching={"clip": BatchConfig(max_batch_size=32, max_wait_ms=60000), "face": BatchConfig(max_batch_size=8)},
    )
    engine = Engine(config)
    await engine.start()
    yield engine
    await engine.close()


def worker_config(broker, topics, tmp_path, **fetch) -> WorkerConfig:
    return WorkerConfig(
        kafka=KafkaConfig(bootstrap=broker, group=f"g-{uuid.uuid4().hex[:8]}", topics=topics, session_timeout_ms=3000),
        fetch=FetchConfig(blob_roots=[str(tmp_path)], allow_private_addresses=True, total_timeout_s=3.0, retries=0,
                          backoff_s=0.1, **fetch),
        blobs={"dir": str(tmp_path / "blobs")}, drain_timeout_s=10, report_interval_s=0,
    )


def image_file(tmp_path: Path, name: str, size: int = 224) -> Path:
    path = tmp_path / f"{name}.jpg"
    photo("astronaut").resize((size, size)).save(path, quality=90)
    return path


def request_bytes(request_id: str, path: Path, *tasks: tuple[str, str, dict]) -> bytes:
    return AnalysisRequest(request_id=request_id, image={"blob": path.as_uri()},
                           tasks=[{"operation_id": o, "type": t, "params": p} for o, t, p in tasks]
                           ).model_dump_json().encode()


def header(record, name: str) -> str | None:
    return next((v.decode() for k, v in record.headers or () if k == name), None)


def traceparent(record) -> tuple[str, str] | None:
    """(trace_id, parent span_id) of a record's traceparent header."""
    value = header(record, "traceparent")
    return tuple(value.split("-")[1:3]) if value else None


def ids(span: ReadableSpan) -> tuple[str, str]:
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


def parent_id(span: ReadableSpan) -> str | None:
    return format(span.parent.span_id, "016x") if span.parent is not None else None


async def finished_spans(exporter, name: str, count: int = 1, timeout_s: float = 10.0) -> list[ReadableSpan]:
    """The spans named `name` once `count` of them have ended (a request's span ends just after its results)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [s for s in exporter.get_finished_spans() if s.name == name]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


# -- the worker's spans -----------------------------------------------------------------------------


async def test_one_request_with_three_tasks_gives_the_span_tree(broker, topics, traced_engine, tracing, spans,
                                                                tmp_path):
    path = image_file(tmp_path, "one")
    face = {"target": "prominent_face", "face_context": "whole_image"}
    value = request_bytes("tree", path, ("clip_whole", "embed_clip_vit_b_32", {}),
                          ("face_box", "detect_bounding_box", face), ("face_clip", "embed_clip_vit_b_32", face))
    async with running(Worker(worker_config(broker, topics, tmp_path), traced_engine, tracing=tracing)):
        await produce(broker, topics.requests, [(b"tree", value, [])])
        results = await consume_all(broker, topics.results, 3, timeout_s=120)
        assert len(results) == 3
        (request,) = await finished_spans(spans, f"process {topics.requests}")
    # No traceparent on the request: the worker's span starts the trace.
    assert request.kind == SpanKind.CONSUMER and request.parent is None
    attributes = dict(request.attributes)
    assert attributes["messaging.system"] == "kafka" and attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.destination.name"] == topics.requests
    assert attributes["messaging.kafka.message.key"] == "tree" and attributes["imgstream.request_id"] == "tree"
    assert attributes["messaging.kafka.offset"] == 0 and attributes["messaging.destination.partition.id"] in "0123"
    trace_id, span_id = ids(request)
    finished = spans.get_finished_spans()
    children = [s for s in finished if ids(s)[0] == trace_id and parent_id(s) == span_id]
    names = sorted(s.name for s in children)
    assert names == sorted(["fetch", "decode", "queue face", "queue clip", "queue clip", f"send {topics.results}"]), \
        names
    by_name = {s.name: s for s in children}
    assert by_name["fetch"].attributes["url.full"] == path.as_uri()
    send = by_name[f"send {topics.results}"]
    assert send.kind == SpanKind.PRODUCER and send.attributes["messaging.batch.message_count"] == 3
    assert send.attributes["messaging.kafka.message.key"] == "tree"
    # Every model batch that carried its items links to the request's span, and each queue wait to its batch.
    batches = {s.context.span_id: s for s in finished if s.name.startswith("batch ")}
    assert {s.name for s in batches.values()} == {"batch face", "batch clip"}
    for batch in batches.values():
        assert batch.parent is None and batch.attributes["imgstream.device"] == "cpu"
        assert batch.attributes["imgstream.batch.size"] >= 1
        assert [link.context.span_id for link in batch.links] == [request.context.span_id]
    for wait in (s for s in children if s.name.startswith("queue ")):
        (link,) = wait.links
        batch = batches[link.context.span_id]
        assert batch.name == "batch " + wait.name.split()[1]
        assert wait.start_time <= wait.end_time <= batch.end_time
    # The results carry the request span's context.
    for record in results:
        assert traceparent(record) == (trace_id, span_id)


async def test_eight_requests_that_share_a_batch_give_one_batch_span_with_eight_links(broker, topics, traced_engine,
                                                                                      tracing, spans, tmp_path):
    paths = [image_file(tmp_path, f"img{i}", 200 + i) for i in range(8)]  # different bytes: no shared work
    async with running(Worker(worker_config(broker, topics, tmp_path), traced_engine, tracing=tracing)):
        # While an image "decodes", CLIP holds its batch back (up to max_wait_ms) for the items it may add.
        with traced_engine.scheduler.decoding():
            await produce(broker, topics.requests, [(f"r{i}".encode(), request_bytes(
                f"r{i}", path, ("clip", "embed_clip_vit_b_32", {})), []) for i, path in enumerate(paths)])
            deadline = time.monotonic() + 60
            while traced_engine.queued().get("clip", 0) < 8:
                assert time.monotonic() < deadline, traced_engine.queued()
                await asyncio.sleep(0.05)
        assert len(await consume_all(broker, topics.results, 8, timeout_s=60)) == 8
        requests = await finished_spans(spans, f"process {topics.requests}", 8)
    assert len(requests) == 8
    (batch,) = [s for s in spans.get_finished_spans() if s.name == "batch clip"]
    assert batch.attributes["imgstream.batch.size"] == 8 and batch.attributes["imgstream.batch.requests"] == 8
    assert sorted(link.context.span_id for link in batch.links) == sorted(s.context.span_id for s in requests)
    assert all(link.attributes["imgstream.batch.items"] == 1 for link in batch.links)


async def test_a_requests_traceparent_is_continued_onto_its_results(broker, topics, traced_engine, tracing, spans,
                                                                   tmp_path):
    path = image_file(tmp_path, "continued")
    async with running(Worker(worker_config(broker, topics, tmp_path), traced_engine, tracing=tracing)):
        await produce(broker, topics.requests, [(b"cont", request_bytes("cont", path, ("c", "embed_clip_vit_b_32", {})),
                                                 [("traceparent", TRACEPARENT), ("tracestate", b"crawler=7")])])
        (result,) = await consume_all(broker, topics.results, 1, timeout_s=60)
        (request,) = await finished_spans(spans, f"process {topics.requests}")
    assert ids(request)[0] == TRACE_ID and parent_id(request) == PARENT_ID  # the crawler's span is its parent
    assert traceparent(result) == (TRACE_ID, ids(request)[1])
    assert header(result, "tracestate") == "crawler=7"


async def test_dead_letters_and_deferred_retries_keep_the_requests_trace(broker, topics, traced_engine, tracing, spans,
                                                                         tmp_path):
    url = f"http://127.0.0.1:{find_free_port()}/gone.jpg"  # nothing listens: a transient failure, deferred once
    unreachable = AnalysisRequest(request_id="away", image={"url": url},
                                  tasks=[{"operation_id": "c", "type": "embed_clip_vit_b_32"}]).model_dump_json()
    config = worker_config(broker, topics, tmp_path, deferred_attempts=2, deferred_delays_s=[0.5])
    async with running(Worker(config, traced_engine, tracing=tracing)):
        await produce(broker, topics.requests, [(b"bad", b"{not json", [("traceparent", TRACEPARENT)]),
                                                (b"away", unreachable.encode(), [("traceparent", TRACEPARENT)])])
        (letter,) = await consume_all(broker, topics.dlq, 1, timeout_s=30)
        (retry,) = await consume_all(broker, topics.retry, 1, timeout_s=30)
        (result,) = await consume_all(broker, topics.results, 1, timeout_s=60)
        processed = await finished_spans(spans, f"process {topics.requests}", 2)
        (second,) = await finished_spans(spans, f"process {topics.retry}")
    assert header(letter, "imgstream.error_code") == "not_json"
    dead = next(s for s in processed if s.attributes["messaging.kafka.message.key"] == "bad")
    first = next(s for s in processed if s.attributes["messaging.kafka.message.key"] == "away")
    assert traceparent(letter) == (TRACE_ID, ids(dead)[1])
    # The retry record carries the first attempt's span; the second attempt continues from it, in one trace.
    assert traceparent(retry) == (TRACE_ID, ids(first)[1])
    assert [k for k, _ in retry.headers].count("traceparent") == 1
    assert ids(second)[0] == TRACE_ID and parent_id(second) == ids(first)[1]
    assert traceparent(result) == (TRACE_ID, ids(second)[1])
    fetches = [s for s in spans.get_finished_spans() if s.name == "fetch" and parent_id(s) == ids(first)[1]]
    assert fetches and fetches[0].attributes["server.address"] == "127.0.0.1"
    assert fetches[0].attributes["error.type"] == "image_fetch_failed"
    assert any(s.name == "GET" and s.attributes["http.request.method"] == "GET" for s in spans.get_finished_spans())


async def test_with_tracing_off_no_span_is_made_and_the_requests_own_traceparent_travels_on(
        broker, topics, traced_engine, exporter, spans, tmp_path):
    # Even a process-wide provider (one an embedding application might set) gets nothing from the worker.
    global_provider = TracerProvider()
    global_provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(global_provider)
    path = image_file(tmp_path, "off")
    worker = Worker(worker_config(broker, topics, tmp_path), traced_engine)
    assert not worker.tracing.enabled and traced_engine.scheduler.tracer is None
    async with running(worker):
        await produce(broker, topics.requests, [(b"off", request_bytes("off", path, ("c", "embed_clip_vit_b_32", {})),
                                                 [("traceparent", TRACEPARENT), ("other", b"x")])])
        (result,) = await consume_all(broker, topics.results, 1, timeout_s=60)
    assert header(result, "traceparent") == TRACEPARENT.decode()  # carried as it came, not continued
    assert header(result, "other") is None
    assert spans.get_finished_spans() == ()


def test_the_worker_with_tracing_off_never_imports_opentelemetry():
    probe = """
import sys
from imgstream.analysis.engine import Engine
from imgstream.cli import parse_args
from imgstream.consumer import run
from imgstream.consumer.worker import Worker
from imgstream.schemas.config import load_config
from imgstream.service.tracing import start_tracing
config = load_config(environ={})
parse_args(["worker", "--log-format", "json"])
Worker(config, Engine(config.models.model_copy(update={"device": "cpu"})), tracing=start_tracing(config.tracing, "w"))
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSTREAM_")} | {"HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"


# -- logs ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def json_logs(level: str = "DEBUG"):
    """The root logger set up as a worker with --log-format json; what it writes, restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in ("aiokafka", "kafka")})
    stream = io.StringIO()
    stderr, sys.stderr = sys.stderr, stream
    try:
        setup_logging(level, "json")
    finally:
        sys.stderr = stderr
    try:
        yield stream
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for name, value in saved[2].items():
            logging.getLogger(name).setLevel(value)


async def test_json_log_lines_parse_and_carry_the_request_id_and_trace(broker, topics, traced_engine, tracing, spans,
                                                                      tmp_path):
    path = image_file(tmp_path, "logged")
    with json_logs() as stream:
        logging.getLogger("imgstream.test").info("outside any request")
        async with running(Worker(worker_config(broker, topics, tmp_path), traced_engine, tracing=tracing)):
            await produce(broker, topics.requests, [(b"logged", request_bytes("logged", path,
                                                                              ("c", "embed_clip_vit_b_32", {})), [])])
            assert len(await consume_all(broker, topics.results, 1, timeout_s=60)) == 1
            (request,) = await finished_spans(spans, f"process {topics.requests}")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]  # every line is one JSON object
    assert lines and all({"time", "level", "logger", "message", "request_id"} <= set(line) for line in lines)
    outside = next(line for line in lines if line["message"] == "outside any request")
    assert outside["request_id"] is None and "trace_id" not in outside and outside["time"].endswith("Z")
    mine = [line for line in lines if line["request_id"] == "logged"]
    assert any("1 results" in line["message"] for line in mine), mine
    assert all(line["trace_id"] == ids(request)[0] for line in mine)


def test_log_format_is_a_flag_of_the_long_running_commands_and_a_setting():
    for argv in (["worker", "--log-format", "json"], ["sink", "pgvector", "--log-format", "json"],
                 ["train-classifiers", "--labels", "l.csv", "--log-format", "json"]):
        assert parse_args(argv).log_format == "json"
    assert load_config(overrides(parse_args(["worker", "--log-format", "json"]))).log_format == "json"
    assert load_config(environ={"IMGSTREAM_LOG_FORMAT": "json", "IMGSTREAM_TRACING": "on"}).tracing is True
    assert load_config(environ={}).log_format == "text" and load_config(environ={}).tracing is False


# -- submit and the sink ------------------------------------------------------------------------------


async def test_submit_starts_a_trace_per_request_and_injects_it(broker, topics, tracing, spans):
    images = [ImageInput(f"https://example.org/{i}.jpg", ImageRef(url=f"https://example.org/{i}.jpg"),
                         f"https://example.org/{i}.jpg") for i in range(2)]
    outgoing = build_requests(images, [Task(operation_id="c", type="embed_clip_vit_b_32")])
    await submit(broker, topics.requests, topics.results, outgoing, wait=False, timeout_s=1, progress=False,
                 tracing=tracing)
    records = await consume_all(broker, topics.requests, 2)
    created = {s.attributes["imgstream.request_id"]: s for s in spans.get_finished_spans()
               if s.name == f"create {topics.requests}"}
    assert set(created) == {o.request.request_id for o in outgoing}
    assert len({s.context.trace_id for s in created.values()}) == 2  # a trace of its own for each request
    for record in records:
        request_id = json.loads(record.value)["request_id"]
        span = created[request_id]
        assert span.kind == SpanKind.PRODUCER and span.parent is None
        assert traceparent(record) == ids(span)


async def test_the_sink_continues_each_results_trace_in_its_batch_span(broker, topics, db, tracing, spans):  # noqa: F811
    other = f"00-{'a' * 32}-{'b' * 16}-01".encode()
    events = [embedding_result(i) for i in range(3)]
    await produce(broker, topics.results, [(e.request_id.encode(), e.model_dump_json().encode(), headers)
                                           for e, headers in zip(events, ([("traceparent", TRACEPARENT)],
                                                                          [("traceparent", other)], []))])
    kafka, sink = sink_configs(broker, topics, db)
    runner = PgVectorSink(kafka, sink, db, tracing=tracing)
    task = asyncio.create_task(runner.run())
    deadline = time.monotonic() + 30
    while runner.stats.rows < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    runner.request_stop("test")
    await asyncio.wait_for(task, 30)
    batches = [s for s in spans.get_finished_spans() if s.name == f"process {topics.results}"]
    assert batches and all(s.kind == SpanKind.CONSUMER for s in batches)
    assert sum(s.attributes["messaging.batch.message_count"] for s in batches) == 3
    linked = {(format(link.context.trace_id, "032x"), format(link.context.span_id, "016x"))
              for s in batches for link in s.links}
    assert linked == {(TRACE_ID, PARENT_ID), ("a" * 32, "b" * 16)}


# -- export, and what must not be exported -----------------------------------------------------------


def test_spans_go_out_over_otlp_http_as_the_otel_variables_say(monkeypatch):
    spec = importlib.util.spec_from_file_location("otlp_receiver", ROOT / "scripts" / "otlp_receiver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    receiver = module.OtlpReceiver().start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        provider = otlp_provider("imgstream-worker")
        with provider.get_tracer("t").start_as_current_span("exported"):
            pass
        provider.shutdown()
        assert receiver.spans == {"imgstream-worker": 1} and receiver.names == {"exported": 1}
        monkeypatch.setenv("OTEL_SERVICE_NAME", "crawler-side")
        provider = otlp_provider("imgstream-worker")
        with provider.get_tracer("t").start_as_current_span("named"):
            pass
        provider.shutdown()
        assert receiver.spans["crawler-side"] == 1
    finally:
        receiver.stop()


def test_credentials_in_image_urls_are_not_exported():
    assert redact_url("https://user:pw@img.example/a.jpg?X-Amz-Signature=abc&w=1") == \
        "https://REDACTED:REDACTED@img.example/a.jpg?X-Amz-Signature=REDACTED&w=1"
    assert redact_url("file:///blobs/a.jpg") == "file:///blobs/a.jpg"


def test_the_embedded_broker_gets_no_otel_settings(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    with EmbeddedBroker() as broker:
        environ = Path(f"/proc/{broker._proc.pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith(b"OTEL_")]


def test_tracing_on_without_the_sdk_is_a_usage_error_that_says_what_to_install(monkeypatch):
    from imgstream.service.tracing import NO_TRACING, TracingUnavailable, start_tracing

    assert start_tracing(False, "imgstream-worker") is NO_TRACING
    monkeypatch.setitem(sys.modules, "imgstream.service.otel", None)  # as if opentelemetry were not installed
    with pytest.raises(TracingUnavailable, match=r"imgstream\[otel\]"):
        start_tracing(True, "imgstream-worker")
