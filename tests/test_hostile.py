"""Hostile images through a running worker and the real broker: each becomes the right error
result for every task of its request, and the worker goes on serving."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from PIL import Image

from imgstream.consumer.worker import Worker
from imgstream.producer.embedded_broker import find_free_port
from imgstream.schemas.codec import decode_result
from imgstream.schemas.config import FetchConfig, KafkaConfig, WorkerConfig
from tests.kafka_helpers import consume_all, produce
from tests.test_imaging import png_header_only
from tests.worker_procs import jpeg_bytes, request_bytes

TASKS = [
    {"operation_id": "box", "type": "detect_bounding_box",
     "params": {"target": "prominent_face", "face_context": "whole_image"}},
    {"operation_id": "clip", "type": "embed_clip_vit_b_32", "params": {}},
]
JPEG = jpeg_bytes(128)


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()[:3000]


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[str]:
    """A hostile image server on 127.0.0.1; yields its base URL."""

    async def never_answers(_: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        chunk = JPEG[:2] + bytes(64 * 1024)
        while True:
            await response.write(chunk)

    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        for byte in JPEG:
            await response.write(bytes([byte]))
            await asyncio.sleep(0.2)
        return response

    async def loop(_: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    def fixed(body: bytes, content_type: str = "image/jpeg"):
        async def handler(_: web.Request) -> web.Response:
            return web.Response(body=body, content_type=content_type)
        return handler

    app = web.Application()
    app.router.add_get("/never", never_answers)
    app.router.add_get("/endless.jpg", endless)
    app.router.add_get("/drip.jpg", drip)
    app.router.add_get("/loop", loop)
    app.router.add_get("/login.html", fixed(b"<!doctype html><html><body>Sign in</body></html>", "text/html"))
    app.router.add_get("/empty.jpg", fixed(b""))
    app.router.add_get("/truncated.jpg", fixed(_truncated_jpeg()))
    app.router.add_get("/huge.png", fixed(png_header_only(20_000, 20_000), "image/png"))
    app.router.add_get("/ok.jpg", fixed(JPEG))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    port = find_free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def _running_worker(broker, topics, engine, tmp_path, *, allow_private: bool):
    config = WorkerConfig(
        kafka=KafkaConfig(bootstrap=broker, group=f"g-{uuid.uuid4().hex[:8]}", topics=topics,
                          session_timeout_ms=3000),
        # One attempt: this test pins the final answers (deferred retries: tests/test_deferred.py).
        fetch=FetchConfig(blob_roots=[str(tmp_path)], allow_private_addresses=allow_private, total_timeout_s=2.0,
                          retries=1, backoff_s=0.1, deferred_attempts=1),
        blobs={"dir": str(tmp_path / "blobs")},
        drain_timeout_s=5,
    )
    worker = Worker(config, engine)
    return worker, asyncio.create_task(worker.run())


@pytest.fixture
async def worker(broker, topics, engine, tmp_path):
    worker, running = await _running_worker(broker, topics, engine, tmp_path, allow_private=True)
    yield worker
    worker.request_stop("test finished")
    await asyncio.wait_for(running, 60)


@pytest.fixture
async def guarded_worker(broker, topics, engine, tmp_path):
    worker, running = await _running_worker(broker, topics, engine, tmp_path, allow_private=False)
    yield worker
    worker.request_stop("test finished")
    await asyncio.wait_for(running, 60)


async def _submit_and_collect(broker, topics, images: dict[str, dict[str, str]], already: int = 0):
    """Produce one request per entry and return {request_id: {operation_id: result}}."""
    await produce(broker, topics.requests,
                  [(rid.encode(), request_bytes(rid, image, TASKS), []) for rid, image in images.items()])
    expected = already + len(images) * len(TASKS)
    records = await consume_all(broker, topics.results, expected, timeout_s=90)
    assert len(records) == expected
    out: dict[str, dict] = {}
    for record in records:
        result = decode_result(record.value)
        out.setdefault(result.request_id, {})[result.operation_id] = result
    return out


async def test_hostile_images_become_error_results_and_the_worker_keeps_serving(broker, topics, worker, server):
    cases = {
        "never-answers": (f"{server}/never", "image_fetch_failed"),
        "endless-body": (f"{server}/endless.jpg", "image_too_large"),
        "slow-drip": (f"{server}/drip.jpg", "image_fetch_failed"),
        "redirect-loop": (f"{server}/loop", "image_fetch_failed"),
        "html-page": (f"{server}/login.html", "image_undecodable"),
        "empty-body": (f"{server}/empty.jpg", "image_undecodable"),
        "truncated-jpeg": (f"{server}/truncated.jpg", "image_undecodable"),
        "png-20000x20000": (f"{server}/huge.png", "image_too_large"),
        "not-found": (f"{server}/missing.jpg", "image_fetch_failed"),
    }
    results = await _submit_and_collect(broker, topics, {rid: {"url": url} for rid, (url, _) in cases.items()})
    for request_id, (url, code) in cases.items():
        by_op = results[request_id]
        assert set(by_op) == {"box", "clip"}, request_id
        for result in by_op.values():
            assert (result.status, result.error_code) == ("error", code), (request_id, result.error_message)
            assert result.error_message and result.image.url == url
    assert "redirect" in results["redirect-loop"]["box"].error_message
    assert "deadline" in results["never-answers"]["box"].error_message

    # The same worker serves a good image afterwards, and holds no image bytes for the failed ones.
    results = await _submit_and_collect(broker, topics, {"good": {"url": f"{server}/ok.jpg"}},
                                        already=len(cases) * len(TASKS))
    assert {r.status for r in results["good"].values()} == {"success"}
    assert len(results["good"]["clip"].data) == 512
    assert worker.images.held == 0 and worker.tracker.in_flight() == 0
    assert worker.metrics.value("imgstream_results_total", status="error", error_code="image_too_large") == 4


async def test_private_addresses_are_refused_when_the_guard_is_on(broker, topics, guarded_worker, server, tmp_path):
    port = server.rsplit(":", 1)[1]
    cases = {
        "private-range": "http://10.0.0.1/x.jpg",
        "loopback-literal": f"{server}/ok.jpg",
        "loopback-name": f"http://localhost:{port}/ok.jpg",
        "metadata": "http://169.254.169.254/latest/meta-data/",
    }
    results = await _submit_and_collect(broker, topics, {rid: {"url": url} for rid, url in cases.items()})
    for request_id in cases:
        for result in results[request_id].values():
            assert (result.status, result.error_code) == ("error", "image_fetch_failed"), request_id
            assert "refused" in result.error_message, result.error_message
    # Blob references do not go through the network guard; the worker still serves them.
    path = tmp_path / "ok.jpg"
    path.write_bytes(JPEG)
    results = await _submit_and_collect(broker, topics, {"blob": {"blob": path.as_uri()}},
                                        already=len(cases) * len(TASKS))
    assert {r.status for r in results["blob"].values()} == {"success"}
