"""Delivery under crashes, rebalances, shutdowns and hostile events, with real worker processes.

Every scenario checks what a user sees on the results topic: every (request_id, operation_id)
of every accepted request, eventually (duplicates allowed after a crash, missing never).
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from urllib.parse import urlsplit

import orjson
import pytest

from imgstream.consumer.worker import Worker
from imgstream.producer.embedded_broker import EmbeddedBroker, find_free_port
from imgstream.producer.topics import create_topics
from imgstream.schemas.config import FetchConfig, KafkaConfig, WorkerConfig
from imgstream.schemas.events import DeadLetter
from tests.kafka_helpers import consume_all, unique_topics
from tests.worker_procs import (  # noqa: F401 - `workers` is a fixture
    FACE_TASKS,
    RequestStream,
    ResultReader,
    produce_paced,
    request_bytes,
    small_photo,
    workers,
)


@pytest.fixture
def image(tmp_path):
    # Large enough that a backlog of a few hundred takes seconds to drain (the kills must land mid-stream).
    return {"blob": small_photo(tmp_path / "face.jpg", size=192).as_uri()}


def _requests(prefix: str, count: int, image: dict) -> tuple[list[tuple[bytes, bytes]], set[tuple[str, str]]]:
    messages = [(f"{prefix}-{i}".encode(), request_bytes(f"{prefix}-{i}", image)) for i in range(count)]
    expected = {(f"{prefix}-{i}", t["operation_id"]) for i in range(count) for t in FACE_TASKS}
    return messages, expected


@pytest.mark.slow
async def test_sigkill_three_times_loses_no_result(broker, topics, workers, image):
    messages, expected = _requests("crash", 500, image)
    async with ResultReader(broker, topics.results) as results:
        producing = asyncio.create_task(produce_paced(broker, topics.requests, messages, per_second=100))
        worker = workers.start("first")
        for kill, progress in enumerate((0.15, 0.4, 0.65)):
            # Kill mid-stream: once 15%, 40% and 65% of the results are out.
            await results.wait_for(int(progress * len(expected)), timeout_s=120, workers=[worker])
            worker.kill()
            worker = workers.start(f"after-kill-{kill + 1}")
        await producing
        await results.wait_for(len(expected), timeout_s=180, workers=[worker])
        assert results.missing(expected) == set()
        print(f"{results.duplicates} duplicate results after 3 SIGKILLs")
    assert await worker.terminate() == 0


@pytest.mark.slow
async def test_group_shares_partitions_and_a_member_joining_and_leaving_loses_nothing(broker, workers, image):
    topics = unique_topics("group")
    await create_topics(broker, topics, partitions=8)
    workers.topics = topics
    async with ResultReader(broker, topics.results) as results:
        first, second = workers.start("first"), workers.start("second")
        async with RequestStream(broker, topics.requests, "group", image, per_second=10) as stream:
            await results.wait_for(20, timeout_s=120, workers=[first, second])
            third = workers.start("third")
            await third.wait_for_log(r"request group-\d+: 2 results", timeout_s=120)
            assert await third.terminate() == 0  # leaves mid-stream; its partitions go back to the others
            await results.wait_for(results.distinct + 40, timeout_s=120, workers=[first, second])
        await results.wait_for(len(stream.expected), timeout_s=180, workers=[first, second])
        assert results.missing(stream.expected) == set()
        print(f"{stream.produced} requests, {results.duplicates} duplicate results")
    for worker in (first, second):
        assert worker.count(r"request group-\d+: 2 results") > 0, f"{worker.name} processed nothing"
        assert worker.count(r"partitions revoked") >= 1  # at least when the third joined
        assert await worker.terminate() == 0


def _malformed_events(count: int) -> list[tuple[bytes | None, bytes | None]]:
    """Events that are not AnalysisRequests: broken JSON, wrong types, missing fields, and worse."""
    rng = random.Random(4)
    good_task = {"operation_id": "a", "type": "detect_bounding_box"}
    image = {"url": "https://example.org/a.jpg"}
    makers = [
        lambda i: b"{not json " + str(i).encode(),
        lambda i: rng.randbytes(rng.randint(1, 300)),
        lambda i: b"",
        lambda i: orjson.dumps([1, 2, i]),
        lambda i: orjson.dumps(f"just a string {i}"),
        lambda i: b"null",
        lambda i: orjson.dumps({"request_id": i, "image": image, "tasks": [good_task]}),
        lambda i: orjson.dumps({"request_id": f"m{i}", "image": image, "tasks": "detect_bounding_box"}),
        lambda i: orjson.dumps({"request_id": f"m{i}", "image": [image], "tasks": [good_task]}),
        lambda i: orjson.dumps({"request_id": f"m{i}", "image": image, "tasks": [{**good_task, "params": [1]}]}),
        lambda i: orjson.dumps({"schema_version": 2, "request_id": f"m{i}", "image": image, "tasks": [good_task]}),
        lambda i: orjson.dumps({"image": image, "tasks": [good_task]}),
        lambda i: orjson.dumps({"request_id": f"m{i}", "tasks": [good_task]}),
        lambda i: orjson.dumps({"request_id": f"m{i}", "image": image}),
        lambda i: orjson.dumps({"request_id": f"m{i}", "image": image, "tasks": [good_task, good_task]}),
        lambda i: orjson.dumps({"request_id": f"m{i}", "image": image, "tasks": []}),
        lambda i: orjson.dumps({"request_id": f"m{i}", "image": image,
                                "tasks": [{**good_task, "operation_id": str(n)} for n in range(65)]}),
        lambda i: orjson.dumps({"request_id": f"m{i}", "image": {"url": "ftp://example.org/a.jpg"},
                                "tasks": [good_task]}),
        lambda i: orjson.dumps({"request_id": f"m{i}", "image": {**image, "blob": "file:///a.jpg"},
                                "tasks": [good_task]}),
        lambda i: orjson.dumps({"request_id": f"m{i}", "image": image, "tasks": [good_task],
                                "metadata": {"blob": "x" * 20_000}}),
        lambda i: orjson.dumps({"request_id": "", "image": image, "tasks": [good_task]}),
        lambda i: b'{"request_id": "m' + str(i).encode() + b'", "image": ' + b"[" * 5000,
        lambda i: "{\"request_id\": \"\udc80\"}".encode("utf-8", "surrogatepass"),
    ]
    events: list[tuple[bytes | None, bytes | None]] = []
    for i in range(count):
        key = rng.choice([None, f"bad-{i}".encode(), rng.randbytes(8)])
        events.append((key, makers[i % len(makers)](i)))
    # Huge garbage: a few hundred KB, and one over the worker's 1 MB message limit (cut to fit the DLQ).
    for n, size in enumerate((300_000, 700_000, 1_200_000)):
        events[100 + n * 300] = (b"huge", rng.randbytes(size))
    events[50] = (b"tombstone", None)
    return events


@pytest.mark.slow
async def test_a_thousand_malformed_events_land_in_the_dlq_while_valid_requests_are_served(broker, workers, image):
    topics = unique_topics("hostile")
    # Room for the 1.2 MB event on brokers that enforce the topic limit (Apache Kafka does).
    await create_topics(broker, topics, partitions=4, max_message_bytes=4_000_000)
    workers.topics = topics
    bad = _malformed_events(1000)
    good, expected = _requests("valid", 50, image)
    messages: list[tuple[bytes | None, bytes | None]] = []
    for i, event in enumerate(bad):
        messages.append(event)
        if i % 20 == 0:
            messages.append(good[i // 20])
    worker = workers.start()
    await produce_paced(broker, topics.requests, messages, max_request_size=4_000_000)
    dlq = await consume_all(broker, topics.dlq, len(bad), timeout_s=120)
    letters = [DeadLetter.from_headers(r.headers) for r in dlq]
    assert len(dlq) == len(bad)
    assert len({(d.source_partition, d.source_offset) for d in letters}) == len(bad)
    assert {d.error_code for d in letters} >= {"not_json", "schema_violation", "empty"}
    assert all(d.reason and d.source_topic == topics.requests for d in letters)
    by_size = sorted(len(r.value) for r in dlq)
    assert by_size[-3] == 300_000 and by_size[-2] == 700_000
    assert 900_000 < by_size[-1] < 1_000_000  # the 1.2 MB one, cut to the message limit
    async with ResultReader(broker, topics.results) as results:
        await results.wait_for(len(expected), timeout_s=120, workers=[worker])
        assert results.missing(expected) == set()
    assert worker.alive()
    assert await worker.terminate() == 0


@pytest.mark.slow
async def test_sigterm_under_load_drains_exits_zero_and_loses_nothing(broker, topics, workers, image):
    messages, expected = _requests("term", 300, image)
    await produce_paced(broker, topics.requests, messages)
    async with ResultReader(broker, topics.results) as results:
        worker = workers.start("first")
        await results.wait_for(60, timeout_s=120, workers=[worker])
        assert await worker.terminate(timeout_s=40) == 0
        assert worker.count("SIGTERM: draining") == 1 and worker.count("worker stopped") == 1
        assert worker.count("abandoned") == 0
        done_before_restart = results.distinct
        assert done_before_restart < len(expected), "the load was over before SIGTERM; nothing was tested"
        restarted = workers.start("restarted")
        await results.wait_for(len(expected), timeout_s=180, workers=[restarted])
        assert results.missing(expected) == set()
        # A drained shutdown commits everything it published: nothing is done twice.
        await asyncio.sleep(1.0)
        assert results.duplicates == 0
    assert await restarted.terminate() == 0


async def test_unreachable_broker_is_retried_until_sigterm(workers):
    workers.bootstrap = f"127.0.0.1:{find_free_port()}"  # nothing listens there
    worker = workers.start()
    await worker.wait_for_log(r"broker 127\.0\.0\.1:\d+ unreachable \(attempt \d+", count=3, timeout_s=90)
    assert worker.alive()
    assert await worker.terminate(timeout_s=20) == 0
    assert "Traceback" not in worker.log()


@pytest.mark.slow
async def test_broker_going_away_and_coming_back_is_survived(workers, tmp_path, image):
    port = find_free_port()
    topics = unique_topics("flaky")
    embedded = EmbeddedBroker(port=port).start()
    try:
        await create_topics(embedded.bootstrap, topics, partitions=2)
        workers.bootstrap, workers.topics = embedded.bootstrap, topics
        worker = workers.start()
        await produce_paced(embedded.bootstrap, topics.requests, [(b"before", request_bytes("before", image))])
        await worker.wait_for_log(r"request before: 2 results", timeout_s=90)
        embedded.stop()
        await worker.wait_for_log(r"broker 127\.0\.0\.1:\d+ unreachable", timeout_s=30)
        await asyncio.sleep(2.0)
        assert worker.alive()
        # Same address, empty broker (Tansu keeps data in memory): the worker finds it and carries on.
        embedded = EmbeddedBroker(port=port).start()
        await create_topics(embedded.bootstrap, topics, partitions=2)
        await produce_paced(embedded.bootstrap, topics.requests, [(b"after", request_bytes("after", image))])
        await worker.wait_for_log(r"request after: 2 results", timeout_s=120)
        assert await worker.terminate(timeout_s=40) == 0
    finally:
        embedded.stop()


async def test_paused_partitions_keep_the_member_in_its_group(broker, topics, engine, tmp_path, image):
    """At the in-flight bounds the worker pauses but keeps polling: no rebalance, no duplicate."""
    from aiohttp import web

    from tests.worker_procs import jpeg_bytes

    body = jpeg_bytes(160)

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(4.0)  # longer than max.poll.interval below
        return web.Response(body=body, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/slow.jpg", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = find_free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    config = WorkerConfig(
        kafka=KafkaConfig(bootstrap=broker, group=f"g-{uuid.uuid4().hex[:8]}", topics=topics,
                          session_timeout_ms=3000, max_poll_interval_ms=2500),
        fetch=FetchConfig(blob_roots=[str(tmp_path)], allow_private_addresses=True, total_timeout_s=10),
        blobs={"dir": str(tmp_path / "blobs")},
        max_in_flight=3,
        max_in_flight_image_bytes=1,  # one image at a time
    )
    worker = Worker(config, engine)
    running = asyncio.create_task(worker.run())
    try:
        url = {"url": f"http://127.0.0.1:{port}/slow.jpg"}
        messages = [(f"slow-{i}".encode(), request_bytes(f"slow-{i}", url)) for i in range(3)]
        messages += [(f"fast-{i}".encode(), request_bytes(f"fast-{i}", image)) for i in range(20)]
        await produce_paced(broker, topics.requests, messages)
        records = await consume_all(broker, topics.results, 2 * len(messages), timeout_s=90)
        assert len(records) == 2 * len(messages)
        more = await consume_all(broker, topics.results, 2 * len(messages) + 1, timeout_s=3)
        assert len(more) == 2 * len(messages), "a result was published twice"
        assert worker.metrics.value("imgstream_rebalance_events_total", event="revoked") == 0
        # One image at a time: never more than the larger of the two, fetched plus decoded.
        fast_image = urlsplit(image["blob"]).path
        largest = max(len(body) + 160 * 160 * 3, os.path.getsize(fast_image) + 192 * 192 * 3)
        assert worker.images.peak <= largest
    finally:
        worker.request_stop("test finished")
        await asyncio.wait_for(running, 60)
        await runner.cleanup()


async def test_image_byte_bound_limits_memory_held_in_flight(broker, topics, engine, tmp_path):
    from tests.worker_procs import jpeg_bytes

    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(256))
    one_image = path.stat().st_size + 256 * 256 * 3
    bound = 3 * one_image
    config = WorkerConfig(
        kafka=KafkaConfig(bootstrap=broker, group=f"g-{uuid.uuid4().hex[:8]}", topics=topics,
                          session_timeout_ms=3000),
        fetch=FetchConfig(blob_roots=[str(tmp_path)]),
        blobs={"dir": str(tmp_path / "blobs")},
        max_in_flight=64,
        max_in_flight_image_bytes=bound,
    )
    worker = Worker(config, engine)
    running = asyncio.create_task(worker.run())
    try:
        messages = [(f"b-{i}".encode(), request_bytes(f"b-{i}", {"blob": path.as_uri()})) for i in range(40)]
        await produce_paced(broker, topics.requests, messages)
        records = await consume_all(broker, topics.results, 2 * len(messages), timeout_s=120)
        assert len(records) == 2 * len(messages)
        assert one_image <= worker.images.peak <= bound
        assert worker.images.used == worker.images.held == 0
    finally:
        worker.request_stop("test finished")
        await asyncio.wait_for(running, 60)



async def test_a_crop_too_large_for_the_message_limit_goes_to_the_blob_store(broker, topics, engine, tmp_path):
    from pathlib import Path
    from urllib.parse import urlsplit

    from PIL import Image

    from imgstream.schemas.codec import decode_result
    from tests.engine_helpers import photo

    path = tmp_path / "astronaut.png"
    photo("astronaut").save(path)
    limit = 20_000
    config = WorkerConfig(
        kafka=KafkaConfig(bootstrap=broker, group=f"g-{uuid.uuid4().hex[:8]}", topics=topics,
                          session_timeout_ms=3000, max_message_bytes=limit),
        fetch=FetchConfig(blob_roots=[str(tmp_path)]),
        blobs={"dir": str(tmp_path / "blobs")},
    )
    worker = Worker(config, engine)
    running = asyncio.create_task(worker.run())
    try:
        tasks = [
            {"operation_id": "face_clip", "type": "embed_clip_vit_b_32",
             "params": {"target": "prominent_face", "face_context": "whole_image"}},
            {"operation_id": "face_clip_no_crop", "type": "embed_clip_vit_b_32",
             "params": {"target": "prominent_face", "face_context": "whole_image", "return_crop": False}},
        ]
        request = request_bytes("big-crop", {"blob": path.as_uri()}, tasks)
        await produce_paced(broker, topics.requests, [(b"big-crop", request)])
        records = await consume_all(broker, topics.results, 2, timeout_s=90)
        assert len(records) == 2 and all(len(r.value) <= limit for r in records)
        by_op = {r.operation_id: r for r in (decode_result(record.value) for record in records)}
        offloaded = by_op["face_clip"]
        assert offloaded.status == "success" and len(offloaded.data) == 512
        assert offloaded.cropped_image_base64 is None and offloaded.cropped_image_ref.startswith("file://")
        crop_path = Path(urlsplit(offloaded.cropped_image_ref).path)
        assert crop_path.is_relative_to(tmp_path / "blobs")
        with Image.open(crop_path) as crop:
            assert crop.format == "PNG"
            x0, y0, x1, y1 = offloaded.cropped_image_bbox
            assert crop.size == (x1 - x0, y1 - y0)
        assert 4 * (crop_path.stat().st_size + 2) // 3 > limit  # its base64 could not have travelled inline
        inline = by_op["face_clip_no_crop"]
        assert inline.cropped_image_ref is None and inline.cropped_image_base64 is None
        assert worker.metrics.value("imgstream_crops_offloaded_total") == 1
    finally:
        worker.request_stop("test finished")
        await asyncio.wait_for(running, 60)


async def test_a_second_stop_signal_abandons_the_drain_without_committing(broker, topics, engine, tmp_path):
    from aiohttp import web
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def stuck(_: web.Request) -> web.Response:
        await asyncio.sleep(120)
        return web.Response()

    app = web.Application()
    app.router.add_get("/stuck.jpg", stuck)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    port = find_free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    group = f"g-{uuid.uuid4().hex[:8]}"
    config = WorkerConfig(
        kafka=KafkaConfig(bootstrap=broker, group=group, topics=topics, session_timeout_ms=3000),
        fetch=FetchConfig(blob_roots=[str(tmp_path)], allow_private_addresses=True, total_timeout_s=120),
        blobs={"dir": str(tmp_path / "blobs")},
        drain_timeout_s=120,
    )
    worker = Worker(config, engine)
    running = asyncio.create_task(worker.run())
    try:
        request = request_bytes("stuck", {"url": f"http://127.0.0.1:{port}/stuck.jpg"})
        await produce_paced(broker, topics.requests, [(b"stuck", request)])
        for _ in range(300):
            if worker.tracker.in_flight() == 1:
                break
            await asyncio.sleep(0.1)
        assert worker.tracker.in_flight() == 1
        worker.request_stop("SIGTERM")
        await asyncio.sleep(1.0)
        assert not running.done()  # draining: the request may still finish
        worker.request_stop("SIGTERM")
        await asyncio.wait_for(running, 20)
        assert worker.metrics.value("imgstream_requests_abandoned_total") == 1
    finally:
        worker.request_stop("test finished")
        await asyncio.wait_for(running, 60)
        await runner.cleanup()
    # Nothing was committed past the abandoned request: the group's next member redoes it.
    probe = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group)
    await probe.start()
    try:
        partitions = range(4)  # the `topics` fixture makes 4
        committed = [await probe.committed(TopicPartition(topics.requests, p)) for p in partitions]
    finally:
        await probe.stop()
    assert all(offset in (None, 0) for offset in committed), committed
