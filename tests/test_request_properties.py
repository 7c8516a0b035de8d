"""Property-based (hypothesis): whatever bytes arrive as a request, each ends as a DLQ reason or as one
result per operation that the encoder writes. First through the decoder and the result encoder alone,
then, fewer of them, through a running worker and the real broker."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from imgstream.analysis.results import error_results, image_info, task_result
from imgstream.blobs import open_blob_store
from imgstream.consumer.publish import fit_result
from imgstream.consumer.worker import Worker
from imgstream.schemas.codec import InvalidEvent, decode_request, decode_result, encode
from imgstream.schemas.config import FetchConfig, KafkaConfig, WorkerConfig
from imgstream.schemas.events import MAX_JSON_DEPTH, MAX_METADATA_BYTES, AnalysisRequest, DeadLetter, ModelInfo
from imgstream.schemas.operations import OPERATIONS
from tests.worker_procs import jpeg_bytes

DLQ_CODES = {"empty", "not_json", "schema_violation"}
# Bounded so the suite stays fast: a few hundred examples of the pure path in a few seconds.
PURE = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies ---------------------------------------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
JSON_OBJECTS = st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=5)
# Around orjson's limits (254 levels written, 1,024 read) and ours.
DEPTHS = (st.sampled_from([1, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 253, 254, 255, 1023, 1024, 1025])
          | st.integers(1, 1100))


def as_bytes(value: object) -> bytes:
    """JSON text as a careless producer writes it: NaN, huge integers and lone surrogates included."""
    return json.dumps(value).encode("utf-8", "surrogatepass")


def nested(levels: int) -> bytes:
    """An object nested `levels` deep, written by hand (orjson refuses to write past 254)."""
    return b'{"k":' * (levels - 1) + b"{}" + b"}" * (levels - 1)


def valid_requests(images: st.SearchStrategy, types: st.SearchStrategy) -> st.SearchStrategy:
    task = st.fixed_dictionaries({"operation_id": st.text(min_size=1, max_size=20), "type": types},
                                 optional={"params": st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=3)})
    return st.fixed_dictionaries(
        {"schema_version": st.just(1), "request_id": st.text(min_size=1, max_size=40), "image": images,
         "tasks": st.lists(task, min_size=1, max_size=4, unique_by=lambda t: t["operation_id"])},
        optional={"metadata": JSON_OBJECTS, "submitted_at": st.just("2026-11-25T18:00:00Z"),
                  "replay_of": st.text(max_size=20)})


TYPES = st.sampled_from(sorted(OPERATIONS)) | st.text(max_size=12)
IMAGES = st.one_of(st.builds(lambda p: {"url": f"https://example.org/{p}"}, st.text(max_size=20)),
                   st.builds(lambda p: {"blob": f"file:///shared/{p}"}, st.text(max_size=20)))
MUTATIONS = ("none", "replace", "delete", "task_field", "many_tasks", "long_text", "big_metadata", "deep_metadata",
             "deep_params", "truncate", "flip")


@st.composite
def mutated_requests(draw: st.DrawFn, images: st.SearchStrategy = IMAGES, types: st.SearchStrategy = TYPES) -> bytes:
    """A valid request, changed in one way a buggy or hostile producer might."""
    request = draw(valid_requests(images, types))
    kind = draw(st.sampled_from(MUTATIONS))
    if kind == "replace":
        request[draw(st.sampled_from([*request, "replay_of", "extra"]))] = draw(JSON_VALUES)
    elif kind == "delete":
        del request[draw(st.sampled_from(sorted(request)))]
    elif kind == "task_field":
        task = draw(st.sampled_from(request["tasks"]))
        task[draw(st.sampled_from(["operation_id", "type", "params", "extra"]))] = draw(JSON_VALUES)
    elif kind == "many_tasks":
        request["tasks"] = [{"operation_id": str(i), "type": "x"} for i in range(draw(st.integers(60, 70)))]
    elif kind == "long_text":
        request["request_id"] = "r" * draw(st.integers(500, 520))
    elif kind == "big_metadata":
        request["metadata"] = {"blob": "x" * draw(st.integers(MAX_METADATA_BYTES - 64, MAX_METADATA_BYTES + 64))}
    data = as_bytes(request)
    if kind == "deep_metadata":  # a later key wins in orjson, so this replaces any metadata already there
        data = data[:-1] + b',"metadata":' + nested(draw(DEPTHS)) + b"}"
    elif kind == "deep_params":
        data = data[:-1] + b',"tasks":[{"operation_id":"a","type":"x","params":{"p":' + nested(draw(DEPTHS)) + b"}}]}"
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif kind == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1:]
    return data


ANY_EVENT = st.one_of(st.binary(max_size=200), JSON_VALUES.map(as_bytes), mutated_requests())

# -- the pure path: decoder, then the result encoder ------------------------------------------------


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    return open_blob_store(str(tmp_path_factory.mktemp("crops")))


def ends_as_dlq_or_encodable_results(data: bytes, crops) -> None:
    try:
        request = decode_request(data)
    except InvalidEvent as exc:
        event(f"dead-lettered: {exc.code}")  # --hypothesis-show-statistics shows the mix
        assert exc.code in DLQ_CODES and exc.reason
        letter = DeadLetter(reason=exc.reason, error_code=exc.code, source_topic="t", source_partition=0,
                            source_offset=0)
        assert DeadLetter.from_headers(letter.headers()).error_code == exc.code  # the DLQ record can be written
        return
    event("answered")
    request.request_id.encode()  # the results' key
    # What the worker may publish for it: an error result per task (fetch failed, or the fallback), and
    # results as the engine builds them.
    results = error_results(request, "image_fetch_failed", "HTTP 404", image=image_info(request))
    results += [task_result(request, task, "success", data=[0.25, -0.5], model=ModelInfo(name="m", weights="random"))
                for task in request.tasks]
    assert len(results) == 2 * len(request.tasks)
    for result in results:
        fitted = fit_result(result, 1_000_000, crops)
        back = decode_result(fitted.payload)
        assert (back.request_id, back.operation_id) == (request.request_id, result.operation_id)
        assert back.metadata == request.metadata and back.status == result.status
    # Replay and retries write the request again: it must survive that unchanged.
    assert decode_request(encode(request)) == request


@PURE
@given(st.binary(max_size=300))
def test_arbitrary_bytes_end_in_the_dlq_or_as_encodable_results(crops, data):
    ends_as_dlq_or_encodable_results(data, crops)


@PURE
@given(JSON_VALUES)
def test_arbitrary_json_ends_in_the_dlq_or_as_encodable_results(crops, value):
    ends_as_dlq_or_encodable_results(as_bytes(value), crops)


@PURE
@given(mutated_requests())
def test_mutated_requests_end_in_the_dlq_or_as_encodable_results(crops, data):
    ends_as_dlq_or_encodable_results(data, crops)


@PURE
@given(valid_requests(IMAGES, TYPES), st.data())
def test_requests_built_in_python_validate_only_when_every_result_encodes(crops, request, data):
    # A producer in Python can put anything JSON cannot hold into metadata: integers past 64 bits, keys that
    # are not strings, lone surrogates, sets. Validation refuses those; whatever it accepts is answerable.
    odd = data.draw(st.sampled_from([2**64, -(2**63) - 1, {1: "x"}, "\ud800", {"a", "b"}, float("nan"), b"raw"]))
    request["metadata"] = {**request.get("metadata", {}), "odd": odd}
    try:
        validated = AnalysisRequest.model_validate(request)
    except ValueError:
        return
    ends_as_dlq_or_encodable_results(encode(validated), crops)


# -- through a running worker and the real broker ----------------------------------------------------


class Outcomes:
    """Reads the results and DLQ topics from the start in the background."""

    def __init__(self, bootstrap: str, results: str, dlq: str) -> None:
        self.bootstrap, self.topics = bootstrap, (results, dlq)
        self.results: Counter[tuple[str, str]] = Counter()
        self.dead: set[tuple[int, int]] = set()  # (source partition, source offset)
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Outcomes:
        consumer = AIOKafkaConsumer(*self.topics, bootstrap_servers=self.bootstrap, group_id=None,
                                    auto_offset_reset="earliest")
        await consumer.start()
        self._task = asyncio.create_task(self._read(consumer))
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait([self._task])

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while True:
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    for record in records:
                        if tp.topic == self.topics[0]:
                            result = decode_result(record.value)
                            self.results[result.request_id, result.operation_id] += 1
                        else:
                            letter = DeadLetter.from_headers(record.headers)
                            self.dead.add((letter.source_partition, letter.source_offset))
        finally:
            await consumer.stop()


async def _send_and_await_outcomes(producer: AIOKafkaProducer, topic: str, outcomes: Outcomes,
                                   events: list[bytes], timeout_s: float = 120.0) -> None:
    """Produce `events`; wait until each has a DLQ record or (a valid request) one result per operation."""
    before = Counter(outcomes.results)
    expected: list[tuple[tuple[int, int], list[tuple[str, str]] | None]] = []
    for value in events:
        sent = await producer.send_and_wait(topic, value, key=uuid.uuid4().bytes)
        try:
            request = decode_request(value)
            wanted = [(request.request_id, task.operation_id) for task in request.tasks]
        except InvalidEvent:
            wanted = None  # only a DLQ record will do
        expected.append(((sent.partition, sent.offset), wanted))

    def missing() -> list:
        need: Counter[tuple[str, str]] = Counter()
        gone = []
        for where, wanted in expected:
            if where in outcomes.dead:
                continue
            if wanted is None:
                gone.append(where)
            else:
                need.update(wanted)
        short = [key for key, n in need.items() if outcomes.results[key] - before[key] < n]
        return gone + short

    deadline = time.monotonic() + timeout_s
    while missing():
        assert time.monotonic() < deadline, f"no result and no DLQ record for {missing()[:10]}"
        await asyncio.sleep(0.1)


# The worker runs on the test's loop while hypothesis draws in a thread; aiokafka's use of `random` there
# is not the strategies' doing.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
async def test_every_event_through_a_running_worker_ends_as_results_or_a_dlq_record(broker, topics, engine, tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes(64))
    images = st.sampled_from([{"blob": photo.as_uri()}, {"blob": (tmp_path / "missing.jpg").as_uri()},
                              {"url": "http://127.0.0.1:1/refused.jpg"}])
    # Cheap real operations, and names the registry does not know (skipped at once).
    types = st.sampled_from(["embed_clip_vit_b_32", "detect_bounding_box"]) | st.text(max_size=8)
    face = {"target": "prominent_face", "face_context": "whole_image"}
    events = st.one_of(st.binary(max_size=100), JSON_VALUES.map(as_bytes), mutated_requests(images, types),
                       valid_requests(images, types).map(lambda r: as_bytes(
                           {**r, "tasks": [{**t, "params": face} if t["type"] == "detect_bounding_box" else t
                                           for t in r["tasks"]]})))
    config = WorkerConfig(
        kafka=KafkaConfig(bootstrap=broker, group=f"g-{uuid.uuid4().hex[:8]}", topics=topics, session_timeout_ms=3000),
        fetch=FetchConfig(blob_roots=[str(tmp_path)], allow_private_addresses=True, retries=0, total_timeout_s=2.0),
        blobs={"dir": str(tmp_path / "blobs")}, drain_timeout_s=5)
    worker = Worker(config, engine)
    running = asyncio.create_task(worker.run())
    loop = asyncio.get_running_loop()
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all", max_request_size=2_000_000)
    await producer.start()
    try:
        async with Outcomes(broker, topics.results, topics.dlq) as outcomes:

            @settings(max_examples=6, deadline=None, database=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
            @given(st.lists(events, min_size=1, max_size=6))
            def each_ends_as_results_or_a_dlq_record(batch: list[bytes]) -> None:
                # hypothesis drives from a thread; the broker and the worker stay on the test's loop
                asyncio.run_coroutine_threadsafe(
                    _send_and_await_outcomes(producer, topics.requests, outcomes, batch), loop).result()

            await asyncio.to_thread(each_ends_as_results_or_a_dlq_record)
            assert outcomes.results and outcomes.dead  # both ends were reached
        assert worker.metrics.value("imgstream_requests_unhandled_total") == 0
        assert worker.tracker.in_flight() == 0
    finally:
        await producer.stop()
        worker.request_stop("test finished")
        await asyncio.wait_for(running, 60)
