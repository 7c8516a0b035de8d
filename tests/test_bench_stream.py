"""scripts/bench_stream.py's pure parts: unique request images and the JSON report's shape (no models, no broker)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_stream.py"


@pytest.fixture(scope="module")
def bench_stream():
    spec = importlib.util.spec_from_file_location("bench_stream", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_stream"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_stream", None)


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    buffer = io.BytesIO()
    gradient = np.linspace(0, 255, 48 * 64 * 3).reshape(48, 64, 3).astype(np.uint8)
    Image.fromarray(gradient).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_a_comment_segment_makes_the_bytes_unique_and_keeps_the_pixels(bench_stream, jpeg):
    first = bench_stream.unique_jpeg(jpeg, b"bench 1")
    second = bench_stream.unique_jpeg(jpeg, b"bench 2")

    assert hashlib.sha256(first).digest() != hashlib.sha256(second).digest()
    # SOI, then COM with a big-endian length that counts itself, then the original segments.
    assert first[:4] == b"\xff\xd8\xff\xfe"
    assert int.from_bytes(first[4:6], "big") == len(b"bench 1") + 2
    assert first[6:13] == b"bench 1"
    assert first[13:] == jpeg[2:]
    original = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    for unique in (first, second):
        decoded = Image.open(io.BytesIO(unique))
        assert decoded.info.get("comment", b"").startswith(b"bench ")
        assert np.array_equal(np.asarray(decoded.convert("RGB")), original)


def test_torchvision_decodes_the_tagged_jpeg_to_the_same_pixels(bench_stream, jpeg):
    torchvision_io = pytest.importorskip("torchvision.io")
    import torch

    tagged = bench_stream.unique_jpeg(jpeg, b"bench 3")
    plain = torchvision_io.decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))
    decoded = torchvision_io.decode_jpeg(torch.frombuffer(bytearray(tagged), dtype=torch.uint8))

    assert torch.equal(plain, decoded)


def test_unique_jpeg_refuses_what_is_not_a_jpeg(bench_stream):
    with pytest.raises(ValueError, match="not a JPEG"):
        bench_stream.unique_jpeg(b"\x89PNG\r\n\x1a\n", b"tag")


def fake_run(bench_stream, *, received: int, exit_code: int = 0):
    run = bench_stream.StreamRun(requests=10, tasks=2, t0_ms=1_000_000.0, end_ms=1_002_000.0,
                                 latencies_ms=[float(v) for v in range(1, 21)], published_before_t0=10,
                                 results_received=received, results_ok=received - 1,
                                 statuses={"success": received - 1, "skipped:no_face_found": 1},
                                 light_rate=0.5, light_requests=2, light_latencies_ms=[30.0, 50.0, 40.0, 60.0],
                                 light_received=4, worker_exit_code=exit_code,
                                 cpu_s={"worker": 3.0, "broker": 0.5, "bench": 0.25},
                                 mean_batch={"clip": 7.5}, mean_queue_wait_ms={"clip": 4.0})
    return bench_stream.stream_summary(run)


def test_the_report_has_the_keys_other_tools_read(bench_stream):
    workloads = bench_stream.WORKLOADS
    stream = fake_run(bench_stream, received=20)
    report = {
        "device": "cpu",
        "machine": {},
        "settings": {},
        "workloads": {
            "W1": bench_stream.workload_summary(workloads["W1"], stream, {"images_per_s": 2.5},
                                                {"images_per_s": 10.0, "batch_size": 16}),
            "W4": bench_stream.workload_summary(workloads["W4"], stream, {"images_per_s": 4.0}, None),
        },
    }
    report = json.loads(json.dumps(report))  # what --json writes is plain JSON

    w1 = report["workloads"]["W1"]
    assert set(w1["stream"]) >= {"images_per_s", "p50_ms", "p95_ms", "p99_ms", "light_p50_ms", "light_p99_ms",
                                 "results_ok", "results_expected"}
    assert w1["stream"]["images_per_s"] == 5.0  # 10 requests in 2 s from t0 to the last result
    assert w1["stream"]["results_expected"] == 20
    assert w1["stream"]["results_ok"] == 19
    assert w1["stream"]["p50_ms"] == 10.5
    assert w1["stream"]["light_p50_ms"] == 45.0
    assert w1["stream"]["cpu_ms_per_image"]["worker"] == 300.0
    assert w1["seed_style"]["images_per_s"] == 2.5
    assert set(w1["model_only"]) >= {"images_per_s", "batch_size"}
    assert w1["stream_over_seed"] == 2.0
    assert w1["stream_over_model_only"] == 0.5
    assert "model_only" not in report["workloads"]["W4"]
    assert report["workloads"]["W4"]["stream_over_seed"] == 1.25
    assert bench_stream.failures(report) == []


def test_lost_results_and_a_failed_worker_fail_the_run(bench_stream):
    workloads = bench_stream.WORKLOADS
    lost = fake_run(bench_stream, received=19)
    crashed = fake_run(bench_stream, received=20, exit_code=1)
    report = {"workloads": {
        "W1": bench_stream.workload_summary(workloads["W1"], lost, None, None),
        "W5": bench_stream.workload_summary(workloads["W5"], crashed, None, None),
    }}

    assert lost["images_per_s"] is None  # no throughput figure from an incomplete run
    assert bench_stream.failures(report) == ["W1: 19/20 backlog results", "W5: worker exit status 1"]


def test_the_decode_only_workload_counts_unsupported_operation_as_ok(bench_stream):
    w4 = bench_stream.WORKLOADS["W4"]

    assert w4.ok("skipped", "unsupported_operation")
    assert not w4.ok("error", "image_fetch_failed")
    assert bench_stream.WORKLOADS["W5"].ok("success", None)
    assert not bench_stream.WORKLOADS["W5"].ok("skipped", "no_face_found")


def test_profile_options_and_per_thread_cpu(bench_stream, tmp_path, monkeypatch):
    import os
    import threading

    # Without py-spy the option is a usage error, said before anything runs.
    monkeypatch.setattr(bench_stream.shutil, "which", lambda name: None)
    monkeypatch.setattr(bench_stream.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(SystemExit):
        bench_stream.parse_args(["--workloads", "W4", "--profile-worker", str(tmp_path)])
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        bench_stream.parse_args(["--profile-rate", "0"])

    times = bench_stream.thread_times(os.getpid())
    if not Path(f"/proc/{os.getpid()}/task").exists():
        assert times == {}
        return
    assert threading.get_native_id() in times
    cpu, waiting = times[threading.get_native_id()]
    assert cpu > 0 and waiting >= 0, times


def test_several_worker_processes_are_counted_from_when_all_of_them_consume(bench_stream):
    """--processes N: the rate counts only results stamped from t0 on (when the last process consumed its
    first request), over the same window; CPU per image divides by those requests too."""
    run = bench_stream.StreamRun(requests=10, tasks=1, t0_ms=1_000_000.0, processes=2, worker_exit_code=0,
                                 cpu_s={"worker": 1.6, "broker": 0.1, "bench": 0.1})

    class Result:
        def __init__(self, timestamp_ms: float) -> None:
            self.timestamp_ms, self.status, self.error_code = timestamp_ms, "skipped", "unsupported_operation"

    class Collector:
        # two requests answered before t0 (one process alone), eight after it
        results = {(f"r-b-{i}", "noop"): Result(999_900.0 + i * 50 if i < 2 else 1_000_000.0 + i * 250)
                   for i in range(10)}
        duplicates = 0
        timestamp_types: set[int] = set()

    published = {f"r-b-{i}": 999_000 for i in range(10)}
    bench_stream.tally(run, bench_stream.WORKLOADS["W4"], Collector(), published)
    summary = bench_stream.stream_summary(run)
    one = fake_run(bench_stream, received=20)

    assert run.after_t0 == 8
    assert summary["requests_in_window"] == 8 and summary["processes"] == 2
    assert summary["window_s"] == 2.25
    assert summary["images_per_s"] == round(8 / 2.25, 2)
    assert summary["cpu_ms_per_image"]["worker"] == 200.0  # 1.6 s over the 8 requests of the window
    w4 = bench_stream.workload_summary(bench_stream.WORKLOADS["W4"], one, {"images_per_s": 4.0}, None, multi=summary)
    assert w4["processes_over_one"] == round(summary["images_per_s"] / one["images_per_s"], 3)
    assert bench_stream.failures({"workloads": {"W4": w4}}) == []
    crashed = dict(summary, worker_exit_code=1)
    w4 = bench_stream.workload_summary(bench_stream.WORKLOADS["W4"], one, {"images_per_s": 4.0}, None, multi=crashed)
    assert bench_stream.failures({"workloads": {"W4": w4}}) == ["W4 processes: 10/10 results, worker exit status 1"]


@pytest.mark.parametrize("kind", ["aiohttp", "minimal"])
def test_the_image_server_answers_as_http_1_1_clients_expect(bench_stream, jpeg, kind):
    """The benchmark's own HTTP servers: kept-alive GETs (aiohttp, as the worker fetches), one connection
    per GET (requests, as the seed-style loop fetches), HEAD, HTTP/1.0, pipelining, and refusals."""
    import asyncio
    import socket

    import aiohttp
    import requests

    class Images:
        def bytes_of(self, index: int) -> bytes:
            return bench_stream.unique_jpeg(jpeg, str(index).encode())

    def raw(payload: bytes) -> bytes:
        with socket.create_connection((bench_stream.HOST, server.port), timeout=5) as sock:
            sock.sendall(payload)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    server = bench_stream.ImageServer.of_kind(kind).start()
    assert server.kind == kind
    try:
        server.sets["W4"] = Images()

        async def kept_alive() -> list[tuple[int, bytes]]:
            opened = []
            trace = aiohttp.TraceConfig()

            async def on_create(*_args: object) -> None:
                opened.append(1)

            trace.on_connection_create_end.append(on_create)
            async with aiohttp.ClientSession(trace_configs=[trace]) as session:
                out = []
                for i in range(3):
                    async with session.get(server.url(f"W4/{i}.jpg")) as response:
                        out.append((response.status, await response.read()))
            assert len(opened) == 1  # one connection, kept alive for all three
            return out

        assert asyncio.run(kept_alive()) == [(200, Images().bytes_of(i)) for i in range(3)]

        response = requests.get(server.url("W4/7.jpg"), timeout=5)
        assert response.status_code == 200 and response.content == Images().bytes_of(7)
        assert response.headers["Content-Type"] == "image/jpeg"
        head = requests.head(server.url("W4/7.jpg"), timeout=5)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["Content-Length"]) == len(Images().bytes_of(7))
        assert requests.get(server.url("W9/7.jpg"), timeout=5).status_code == 404
        assert requests.get(server.url("W4/x.jpg"), timeout=5).status_code == 404
        assert requests.get(server.url("W4/7.png"), timeout=5).status_code == 404
        assert requests.post(server.url("W4/7.jpg"), timeout=5).status_code == 405
        if kind == "aiohttp":  # the rest pins the minimal server's own HTTP handling
            assert server.served == 3 + 1 + 1
            return

        # HTTP/1.0 without keep-alive: the server closes after its answer (raw() reads to EOF).
        answer = raw(b"GET /W4/3.jpg HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(Images().bytes_of(3))
        # HTTP/1.0 that asks to keep alive: told so, and a second request on the connection is answered.
        answer = raw(b"GET /W4/4.jpg HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
                     b"GET /W4/5.jpg HTTP/1.0\r\n\r\n")
        assert answer.count(b"HTTP/1.1 200 OK") == 2 and b"Connection: keep-alive\r\n" in answer
        assert answer.endswith(Images().bytes_of(5))
        # Two requests in one write: two answers, in order; the second asked to close.
        answer = raw(b"GET /W4/1.jpg HTTP/1.1\r\nHost: x\r\n\r\nGET /W4/2.jpg HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert answer.count(b"HTTP/1.1 200 OK") == 2
        assert answer.index(Images().bytes_of(1)) < answer.index(Images().bytes_of(2))
        assert raw(b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(b"GET /W4/1.jpg HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").startswith(b"HTTP/1.1 400 ")
        assert raw(b"GET /" + b"a" * 20_000).startswith(b"HTTP/1.1 431 ")
        assert server.served == 3 + 1 + 1 + 1 + 2 + 2  # the 200s (HEAD included)
        assert bench_stream.parse_args(["--image-server", "minimal"]).image_server == "minimal"
        assert bench_stream.parse_args([]).image_server == "aiohttp"
    finally:
        server.stop()
