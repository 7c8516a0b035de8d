"""The worker end to end against the real broker: requests in, results and DLQ records out."""

from __future__ import annotations

import uuid

import orjson
import pytest

from imgstream.consumer.worker import Worker
from imgstream.producer.embedded_broker import find_free_port
from imgstream.schemas.codec import decode_result
from imgstream.schemas.config import FetchConfig, KafkaConfig, WorkerConfig
from imgstream.schemas.events import AnalysisRequest, DeadLetter
from tests.engine_helpers import photo
from tests.kafka_helpers import consume_all, produce, running

ASTRONAUT_FACE = (170, 40, 290, 200)


@pytest.fixture
def astronaut_file(tmp_path):
    path = tmp_path / "astronaut.jpg"
    photo("astronaut").save(path, quality=92)
    return path


@pytest.fixture
async def worker(broker, topics, engine, tmp_path):
    config = WorkerConfig(
        kafka=KafkaConfig(bootstrap=broker, group=f"g-{uuid.uuid4().hex[:8]}", topics=topics,
                          session_timeout_ms=3000),
        # Deferred retries after half a second, not minutes: an unreachable host is answered within the test.
        fetch=FetchConfig(blob_roots=[str(tmp_path)], allow_private_addresses=True, total_timeout_s=3.0, retries=1,
                          backoff_s=0.1, deferred_attempts=2, deferred_delays_s=[0.5]),
        blobs={"dir": str(tmp_path / "blobs")},
        drain_timeout_s=10,
    )
    async with running(Worker(config, engine)) as worker:
        yield worker


def _request(request_id: str, image: dict, *tasks: tuple[str, str, dict]) -> AnalysisRequest:
    return AnalysisRequest(request_id=request_id, image=image,
                           tasks=[{"operation_id": o, "type": t, "params": p} for o, t, p in tasks])


async def _results(broker, topic, count, timeout_s=120.0):
    records = await consume_all(broker, topic, count, timeout_s=timeout_s)
    return records, [decode_result(r.value) for r in records]


async def test_astronaut_request_yields_one_result_per_operation(broker, topics, worker, astronaut_file):
    request = _request(
        "crawler-7:astronaut", {"blob": astronaut_file.as_uri()},
        ("face_box", "detect_bounding_box", {"target": "prominent_face"}),
        ("clip_whole", "embed_clip_vit_b_32", {}),
    )
    await produce(broker, topics.requests, [(b"crawler-7:astronaut", request.model_dump_json().encode(), [])])
    records, results = await _results(broker, topics.results, 2)
    # nothing more arrives: exactly one result per operation_id
    extra = await consume_all(broker, topics.results, 3, timeout_s=3)
    assert len(extra) == 2
    assert {r.key for r in records} == {b"crawler-7:astronaut"}
    by_op = {r.operation_id: r for r in results}
    assert set(by_op) == {"face_box", "clip_whole"}
    assert by_op["face_box"].event_id == "crawler-7:astronaut/face_box"
    assert by_op["clip_whole"].event_id == "crawler-7:astronaut/clip_whole"
    box = by_op["face_box"].data
    assert ASTRONAUT_FACE[0] <= box[0] < box[2] <= ASTRONAUT_FACE[2]
    assert ASTRONAUT_FACE[1] <= box[1] < box[3] <= ASTRONAUT_FACE[3]
    clip = by_op["clip_whole"]
    assert clip.status == "success" and len(clip.data) == 512 and clip.model.weights == "random"
    assert clip.image.blob == astronaut_file.as_uri() and clip.image.sha256
    assert clip.timings_ms["fetch"] >= 0 and "decode" in clip.timings_ms


async def test_malformed_events_go_to_the_dlq_and_valid_neighbours_are_processed(broker, topics, worker,
                                                                                   astronaut_file):
    good = [_request(f"good-{i}", {"blob": astronaut_file.as_uri()}, ("e", "embed_clip_vit_b_32", {}))
            for i in range(3)]
    bad = [
        (b"not-json", b"{this is not json", "not_json"),
        (b"no-tasks", orjson.dumps({"request_id": "x", "image": {"url": "https://a/b.jpg"}, "tasks": []}),
         "schema_violation"),
        (b"dup-ops", orjson.dumps({"request_id": "y", "image": {"url": "https://a/b.jpg"},
                                   "tasks": [{"operation_id": "a", "type": "t"}, {"operation_id": "a", "type": "t"}]}),
         "schema_violation"),
        (b"bad-image", orjson.dumps({"request_id": "z", "image": {"url": "https://a", "blob": "file:///x"},
                                     "tasks": [{"operation_id": "a", "type": "t"}]}), "schema_violation"),
        (None, b"\xff\xfe\x00binary", "not_json"),
    ]
    messages = []
    for i, (key, value, _) in enumerate(bad):
        messages.append((good[i].request_id.encode(), good[i].model_dump_json().encode(), []) if i < 3 else None)
        messages.append((key, value, []))
    await produce(broker, topics.requests, [m for m in messages if m is not None])
    dlq = await consume_all(broker, topics.dlq, len(bad), timeout_s=60)
    assert len(dlq) == len(bad)
    by_value = {r.value: r for r in dlq}
    for key, value, code in bad:
        record = by_value[value]
        assert record.key == key
        letter = DeadLetter.from_headers(record.headers)
        assert letter.error_code == code and letter.reason and letter.source_topic == topics.requests
    _, results = await _results(broker, topics.results, 3)
    assert sorted(r.request_id for r in results) == ["good-0", "good-1", "good-2"]
    assert all(r.status == "success" for r in results)


async def test_unknown_operation_is_skipped_while_siblings_succeed(broker, topics, worker, astronaut_file):
    request = _request("mixed", {"blob": astronaut_file.as_uri()},
                       ("unknown", "embed_dino_v9", {}), ("clip", "embed_clip_vit_b_32", {}))
    await produce(broker, topics.requests, [(b"mixed", request.model_dump_json().encode(), [])])
    _, results = await _results(broker, topics.results, 2)
    by_op = {r.operation_id: r for r in results}
    assert (by_op["unknown"].status, by_op["unknown"].error_code) == ("skipped", "unsupported_operation")
    assert by_op["clip"].status == "success"


async def test_unreachable_url_gives_an_error_result_for_every_task(broker, topics, worker):
    url = f"http://127.0.0.1:{find_free_port()}/photo.jpg"  # nothing listens there
    request = _request("unreachable", {"url": url},
                       ("a", "embed_clip_vit_b_32", {}), ("b", "detect_bounding_box", {}),
                       ("c", "describe_image", {}))
    await produce(broker, topics.requests, [(b"unreachable", request.model_dump_json().encode(), [])])
    _, results = await _results(broker, topics.results, 3)
    assert sorted(r.operation_id for r in results) == ["a", "b", "c"]
    for result in results:
        assert result.status == "error" and result.error_code == "image_fetch_failed"
        assert result.error_message and result.image.url == url
        assert "after 2 attempts" in result.error_message  # one deferred retry before the final answer


async def test_missing_blob_gives_error_results(broker, topics, worker, tmp_path):
    request = _request("missing", {"blob": (tmp_path / "nope.jpg").as_uri()}, ("a", "embed_clip_vit_b_32", {}))
    await produce(broker, topics.requests, [(b"missing", request.model_dump_json().encode(), [])])
    _, (result,) = await _results(broker, topics.results, 1)
    assert result.status == "error" and result.error_code == "image_fetch_failed"
