"""Failures inside one request, through a running worker and the real broker: every
(request_id, operation_id) still gets a result, and the committed offset moves past it."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

import imgstream.consumer.handling as handling_module
from imgstream.consumer.metrics import WorkerMetrics
from imgstream.consumer.publish import EncodedResult, PublishAbandoned, Publisher
from imgstream.consumer.worker import Worker
from imgstream.producer.embedded_broker import EmbeddedBroker
from imgstream.schemas.codec import decode_result
from imgstream.schemas.config import FetchConfig, KafkaConfig, WorkerConfig
from imgstream.schemas.events import DeadLetter
from tests.engine_helpers import photo
from tests.kafka_helpers import consume_all, running
from tests.worker_procs import produce_paced, request_bytes

FACE = {"target": "prominent_face", "face_context": "whole_image"}
TASKS = [
    {"operation_id": "face_crop", "type": "embed_clip_vit_b_32", "params": FACE},
    {"operation_id": "face_no_crop", "type": "embed_clip_vit_b_32", "params": {**FACE, "return_crop": False}},
    {"operation_id": "box", "type": "detect_bounding_box", "params": FACE},
]


@asynccontextmanager
async def running_worker(broker, topics, engine, **overrides):
    group = f"g-{uuid.uuid4().hex[:8]}"
    values = {
        "kafka": KafkaConfig(bootstrap=broker, group=group, topics=topics, session_timeout_ms=3000),
        "drain_timeout_s": 10,
        **overrides,
    }
    async with running(Worker(WorkerConfig(**values), engine)) as worker:
        yield worker


async def committed_offsets(broker: str, group: str, topic: str) -> int:
    """The sum of the group's committed offsets over the topic's 4 partitions."""
    probe = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group)
    await probe.start()
    try:
        return sum([await probe.committed(TopicPartition(topic, p)) or 0 for p in range(4)])
    finally:
        await probe.stop()


async def until_committed(broker: str, group: str, topic: str, expected: int, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while (total := await committed_offsets(broker, group, topic)) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
    return total


async def results_by_op(broker: str, topic: str, count: int) -> dict[tuple[str, str], object]:
    records = await consume_all(broker, topic, count, timeout_s=90)
    results = [decode_result(r.value) for r in records]
    by_key = {(r.request_id, r.operation_id): r for r in results}
    assert len(results) == len(by_key) == count, sorted(by_key)
    return by_key


@pytest.fixture
def astronaut(tmp_path) -> Path:
    path = tmp_path / "astronaut.png"
    photo("astronaut").save(path)  # a PNG crop of the face is larger than the small message limit below
    return path


async def test_a_crop_store_that_cannot_be_written_fails_only_that_task(broker, topics, engine, tmp_path, astronaut):
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("the blob store cannot live under a regular file, not even for root")
    async with running_worker(broker, topics, engine, fetch=FetchConfig(blob_roots=[str(tmp_path)]),
                              blobs={"dir": str(not_a_dir / "blobs")},
                              kafka=KafkaConfig(bootstrap=broker, group=f"g-{uuid.uuid4().hex[:8]}", topics=topics,
                                                session_timeout_ms=3000, max_message_bytes=20_000)) as worker:
        await produce_paced(broker, topics.requests, [(b"crop", request_bytes("crop", {"blob": astronaut.as_uri()},
                                                                              TASKS))])
        results = await results_by_op(broker, topics.results, 3)
        failed = results["crop", "face_crop"]
        assert (failed.status, failed.error_code) == ("error", "crop_store_failed")
        assert "blob store" in failed.error_message and failed.data is None
        assert failed.cropped_image_base64 is None and failed.cropped_image_ref is None
        assert results["crop", "face_no_crop"].status == "success"
        assert results["crop", "box"].status == "success" and results["crop", "box"].data is not None
        assert await until_committed(broker, worker.config.kafka.group, topics.requests, 1) == 1
        assert worker.tracker.in_flight() == 0


async def test_a_result_builder_that_raises_fails_its_task_and_a_whole_request_failure_fails_every_task(
        broker, topics, engine, tmp_path, astronaut, monkeypatch):
    real_fit = handling_module.fit_result

    def fit_or_raise(result, limit, crops):
        if result.operation_id == "box":
            raise ValueError("a result builder bug")
        return real_fit(result, limit, crops)

    monkeypatch.setattr(handling_module, "fit_result", fit_or_raise)
    async with running_worker(broker, topics, engine, fetch=FetchConfig(blob_roots=[str(tmp_path)]),
                              blobs={"dir": str(tmp_path / "blobs")}) as worker:
        real_analyse = worker.handler.analyse

        async def analyse_or_raise(request, *args):
            if request.request_id == "whole":
                raise RuntimeError("the whole request broke")
            return await real_analyse(request, *args)

        worker.handler.analyse = analyse_or_raise
        image = {"blob": astronaut.as_uri()}
        await produce_paced(broker, topics.requests, [(b"task", request_bytes("task", image, TASKS)),
                                                      (b"whole", request_bytes("whole", image, TASKS))])
        results = await results_by_op(broker, topics.results, 6)
        box = results["task", "box"]
        assert (box.status, box.error_code) == ("error", "internal_error")
        assert "a result builder bug" in box.error_message
        assert results["task", "face_crop"].status == results["task", "face_no_crop"].status == "success"
        for op in ("face_crop", "face_no_crop", "box"):
            whole = results["whole", op]
            assert (whole.status, whole.error_code) == ("error", "internal_error")
            assert "the whole request broke" in whole.error_message
        assert await until_committed(broker, worker.config.kafka.group, topics.requests, 2) == 2


async def test_results_the_broker_refuses_become_error_results_and_the_request_goes_to_the_dlq(
        broker, topics, engine, tmp_path, astronaut, monkeypatch):
    real_fit = handling_module.fit_result

    def oversized(result, limit, crops):
        fitted = real_fit(result, limit, crops)
        if result.operation_id != "face_no_crop":
            return fitted
        # Past the producer's max_request_size: the real client refuses it for good.
        return EncodedResult(fitted.result, fitted.payload[:-1] + b" " * 2_000_000 + b"}")

    monkeypatch.setattr(handling_module, "fit_result", oversized)
    async with running_worker(broker, topics, engine, fetch=FetchConfig(blob_roots=[str(tmp_path)]),
                              blobs={"dir": str(tmp_path / "blobs")}) as worker:
        value = request_bytes("refused", {"blob": astronaut.as_uri()}, TASKS)
        await produce_paced(broker, topics.requests, [(b"refused", value)])
        results = await results_by_op(broker, topics.results, 3)
        refused = results["refused", "face_no_crop"]
        assert (refused.status, refused.error_code) == ("error", "publish_failed")
        assert results["refused", "face_crop"].status == results["refused", "box"].status == "success"
        (letter,) = await consume_all(broker, topics.dlq, 1, timeout_s=30)
        assert letter.key == b"refused" and letter.value == value
        headers = dict(letter.headers)
        assert headers["imgstream.error_code"] == b"publish_failed"
        assert b"face_no_crop" in headers["imgstream.reason"]
        assert await until_committed(broker, worker.config.kafka.group, topics.requests, 1) == 1
        assert worker.publisher.outcomes["results", "refused"] == 1
        assert worker.metrics.value("imgstream_publish_failures_total", kind="results", outcome="refused") == 1
        assert worker.metrics.value("imgstream_dlq_records_total", reason="publish_failed") == 1


async def test_a_result_the_client_fails_to_send_is_answered_and_dead_lettered(
        broker, topics, engine, tmp_path, astronaut):
    async with running_worker(broker, topics, engine, fetch=FetchConfig(blob_roots=[str(tmp_path)]),
                              blobs={"dir": str(tmp_path / "blobs")}) as worker:
        while worker.publisher is None:  # the worker makes its producer as it starts
            await asyncio.sleep(0.05)
        producer = worker.publisher.producer
        real_send = producer.send_and_wait
        # Records go alone here: a failed batch sends each of its records alone, through this path
        # (tests/test_result_batches.py), so this is where a client's failure is classified.
        worker.publisher.batches = None

        async def send_or_fail(topic, value=None, key=None, **kwargs):
            if topic == topics.results and b'"operation_id":"box"' in value and b'"status":"success"' in value:
                raise TypeError("a bug in the client's encoding")  # not a broker error: no retry can help
            return await real_send(topic, value=value, key=key, **kwargs)

        producer.send_and_wait = send_or_fail
        value = request_bytes("client", {"blob": astronaut.as_uri()}, TASKS)
        await produce_paced(broker, topics.requests, [(b"client", value)])
        results = await results_by_op(broker, topics.results, 3)
        box = results["client", "box"]
        assert (box.status, box.error_code) == ("error", "publish_failed")
        assert "a bug in the client's encoding" in box.error_message
        assert results["client", "face_crop"].status == "success"
        (letter,) = await consume_all(broker, topics.dlq, 1, timeout_s=30)
        assert letter.key == b"client" and letter.value == value
        assert await until_committed(broker, worker.config.kafka.group, topics.requests, 1) == 1
        assert worker.metrics.value("imgstream_requests_unhandled_total") == 0


async def test_a_request_whose_results_cannot_be_encoded_is_dead_lettered_and_none_is_unhandled(
        broker, topics, engine, tmp_path, astronaut, monkeypatch):
    # A gap in validation, simulated: the decoder lets metadata through that is nested past what orjson
    # writes (254 levels), so neither the results nor the fallback error results can be encoded.
    real_decode = handling_module.decode_request

    def decode_with_a_gap(value):
        raw = orjson.loads(value)
        request = real_decode(orjson.dumps({**raw, "metadata": None}))
        return request.model_copy(update={"metadata": raw.get("metadata")})

    monkeypatch.setattr(handling_module, "decode_request", decode_with_a_gap)
    image = {"blob": astronaut.as_uri()}
    deep = b'{"k":' * 299 + b"{}" + b"}" * 299
    unencodable = request_bytes("deep", image, TASKS[2:])[:-1] + b',"metadata":' + deep + b"}"
    async with running_worker(broker, topics, engine, fetch=FetchConfig(blob_roots=[str(tmp_path)]),
                              blobs={"dir": str(tmp_path / "blobs")}) as worker:
        await produce_paced(broker, topics.requests, [(b"deep", unencodable),
                                                      (b"fine", request_bytes("fine", image, TASKS[2:]))])
        (letter,) = await consume_all(broker, topics.dlq, 1, timeout_s=60)
        assert letter.key == b"deep" and letter.value == unencodable  # the raw event, byte for byte
        headers = dict(letter.headers)
        assert headers["imgstream.error_code"] == b"unencodable_result"
        assert b"encoded" in headers["imgstream.reason"]
        results = await results_by_op(broker, topics.results, 1)
        assert set(results) == {("fine", "box")}
        assert await until_committed(broker, worker.config.kafka.group, topics.requests, 2) == 2
        assert worker.metrics.value("imgstream_dlq_records_total", reason="unencodable_result") == 1
        assert worker.metrics.value("imgstream_requests_unhandled_total") == 0
        assert worker.tracker.in_flight() == 0


async def test_file_blobs_outside_the_root_are_refused_by_default(broker, topics, engine, tmp_path, astronaut):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "escape.png").symlink_to(astronaut)  # a link inside the root to a file outside it
    inside = blobs / "inside.png"
    inside.write_bytes(astronaut.read_bytes())
    tasks = TASKS[2:]
    async with running_worker(broker, topics, engine, blobs={"dir": str(blobs)}):  # fetch.blob_roots unset
        await produce_paced(broker, topics.requests, [
            (b"passwd", request_bytes("passwd", {"blob": "file:///etc/passwd"}, tasks)),
            (b"escape", request_bytes("escape", {"blob": (blobs / "escape.png").as_uri()}, tasks)),
            (b"inside", request_bytes("inside", {"blob": inside.as_uri()}, tasks)),
        ])
        results = await results_by_op(broker, topics.results, 3)
    for request_id in ("passwd", "escape"):
        result = results[request_id, "box"]
        assert (result.status, result.error_code) == ("error", "image_fetch_failed"), request_id
        assert "fetch.blob_roots" in result.error_message and str(blobs.resolve()) in result.error_message
    assert results["inside", "box"].status == "success"


async def test_publishes_give_up_at_shutdown_and_are_counted():
    with EmbeddedBroker() as lost:
        producer = AIOKafkaProducer(bootstrap_servers=lost.bootstrap, request_timeout_ms=1000, acks="all")
        await producer.start()
    # The broker is gone: every send fails and is retried until the stop event is set.
    try:
        publisher = Publisher(producer, "results", "dlq", 1_000_000)
        stop = asyncio.Event()
        letter = DeadLetter(reason="test", error_code="not_json", source_topic="t", source_partition=0,
                            source_offset=0)
        sending = asyncio.create_task(publisher.dead_letter(b"k", b"v", letter, stop=stop))
        await asyncio.sleep(2.5)
        assert not sending.done()  # still retrying: a broker blip must not lose the record
        stop.set()
        with pytest.raises(PublishAbandoned):
            await asyncio.wait_for(sending, 30)
        assert publisher.outcomes["dlq", "retried"] >= 1 and publisher.outcomes["dlq", "abandoned"] == 1
        with pytest.raises(PublishAbandoned):
            await asyncio.wait_for(publisher.results("r", [b"{}"], stop=stop), 30)
        assert publisher.outcomes["results", "abandoned"] == 1
        # What /metrics shows of them, through the worker's collector and prometheus-client's parser.
        metrics = WorkerMetrics()
        metrics.add_live_counter("imgstream_publish_failures_total", "test", publisher.failure_samples)
        body, _ = metrics.exposition()
        samples = {(s.labels["kind"], s.labels["outcome"]): s.value
                   for family in text_string_to_metric_families(body.decode()) for s in family.samples
                   if s.name == "imgstream_publish_failures_total"}
        assert samples["dlq", "abandoned"] == 1 and samples["results", "abandoned"] == 1
        assert samples["dlq", "retried"] >= 1
    finally:
        with contextlib.suppress(Exception):  # closing may time out against the missing broker
            await asyncio.wait_for(producer.stop(), 10)
