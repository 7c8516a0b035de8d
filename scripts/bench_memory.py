"""Benchmark the worker's memory over a large backlog: peak RSS against RSS after model load.

Starts the embedded broker (or uses --bootstrap), starts one `imgstream worker` subprocess
(random weights, CPU by default), waits until it is ready and has joined its group, samples
its resident set size for a baseline, then produces a backlog of --requests requests in one
go and samples RSS (psutil, every 50 ms) until every result is on the results topic. The
worker's own /metrics are scraped alongside for the requests and image bytes it held.

    python scripts/bench_memory.py                                  # 10,000 face-box requests, 96 px photo
    python scripts/bench_memory.py --task decode --image-size 2048  # fetch+decode only, big images
    python scripts/bench_memory.py --max-in-flight-image-bytes 67108864

Progress goes to stderr; the summary (and, with --json, one JSON document) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, also when loaded by path

from benchlib import (  # noqa: E402
    WorkerFailed,
    WorkerProcess,
    fresh_topics,
    jpeg_bytes,
    machine_info,
    photo,
    progress_logger,
    scrape_metrics,
    worker_env,
)

from imgstream.producer.embedded_broker import EmbeddedBroker, find_free_port  # noqa: E402
from imgstream.producer.topics import create_topics  # noqa: E402

TASKS: dict[str, list[dict[str, Any]]] = {
    # MTCNN alone (face_context=whole_image), the cheapest model task.
    "face": [{"operation_id": "face", "type": "detect_bounding_box",
              "params": {"target": "prominent_face", "face_context": "whole_image"}}],
    # No model: the worker fetches and decodes the image, then answers `skipped`
    # (unsupported_operation). Isolates the consume/fetch/decode/publish path.
    "decode": [{"operation_id": "noop", "type": "benchmark_decode_only", "params": {}}],
}


log = progress_logger("bench_memory")


def save_photo(path: Path, size: int) -> int:
    path.write_bytes(jpeg_bytes(photo("astronaut").resize((size, size)), quality=90))
    return path.stat().st_size


class RssSampler(threading.Thread):
    """Samples one process's RSS every `interval_s` in a thread; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                rss = self.process.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self.samples.append((time.monotonic(), rss))
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


GAUGES = ("imgstream_requests_in_flight", "imgstream_image_bytes_in_flight")


def scrape(port: int) -> dict[str, float]:
    """The worker's unlabelled gauges of interest from /metrics (empty if it does not answer)."""
    snapshot = scrape_metrics(port)
    if snapshot is None:
        return {}
    return {name: value for name in GAUGES if (value := snapshot.value(name)) is not None}


async def produce_backlog(bootstrap: str, topic: str, count: int, image: dict[str, str],
                          tasks: list[dict[str, Any]]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    started = time.perf_counter()
    try:
        pending = []
        for i in range(count):
            request_id = f"bench-{i}"
            value = orjson.dumps({"schema_version": 1, "request_id": request_id, "image": image, "tasks": tasks})
            pending.append(await producer.send(topic, value, key=request_id.encode()))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def wait_for_results(bootstrap: str, topic: str, expected: int, timeout_s: float,
                           worker: WorkerProcess, on_progress) -> dict[str, int]:
    """Read results until `expected` distinct ones arrived (or the deadline, or the worker exits); by status."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    seen: dict[tuple[str, str], str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < expected and time.monotonic() < deadline and worker.exited() is None:
            for records in (await consumer.getmany(timeout_ms=500, max_records=5000)).values():
                for record in records:
                    result = orjson.loads(record.value)
                    seen[(result["request_id"], result["operation_id"])] = result["status"]
            on_progress(len(seen))
    finally:
        await consumer.stop()
    statuses: dict[str, int] = {}
    for status in seen.values():
        statuses[status] = statuses.get(status, 0) + 1
    return statuses


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="imgstream-bench-memory-"))
    embedded = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        embedded = EmbeddedBroker().start()
        bootstrap = embedded.bootstrap
    topics = fresh_topics("bench")
    await create_topics(bootstrap, topics, partitions=args.partitions)
    photo_path = workdir / "photo.jpg"
    photo_bytes = save_photo(photo_path, args.image_size)
    tasks = TASKS[args.task]
    env = worker_env(
        bootstrap=bootstrap, topics=topics, group=f"bench-{uuid.uuid4().hex[:8]}", device=args.device,
        preload=["face"] if args.task == "face" else [], blob_dir=workdir / "blobs",
        # file:// blobs are read only inside the blob roots; the photo lies in the workdir.
        blob_roots=[str(workdir)], max_in_flight=args.max_in_flight,
        max_in_flight_image_bytes=args.max_in_flight_image_bytes, session_timeout_ms=3000,
    )
    log_path = workdir / "worker.log"
    log(f"worker log: {log_path}")
    worker = WorkerProcess(env, find_free_port(), log_path).start()
    sampler = RssSampler(worker.pid)
    http_port = worker.http_port
    try:
        try:
            worker.wait_ready(timeout_s=300)
        except WorkerFailed as exc:
            raise SystemExit(f"worker did not become ready: {exc}") from exc
        sampler.start()
        await asyncio.sleep(args.baseline_s)
        baseline = max(rss for _, rss in sampler.samples)
        log(f"baseline RSS {baseline / 2**20:.0f} MiB (models loaded, group joined, nothing consumed)")

        produce_s = await produce_backlog(bootstrap, topics.requests, args.requests, {"blob": photo_path.as_uri()},
                                          tasks)
        log(f"backlog of {args.requests} requests produced in {produce_s:.1f}s")
        started = time.perf_counter()
        held = {name: 0.0 for name in GAUGES}
        last_report = [0.0]

        def progress(done: int) -> None:
            for name, value in scrape(http_port).items():
                held[name] = max(held[name], value)
            if time.monotonic() - last_report[0] > 10:
                last_report[0] = time.monotonic()
                log(f"{done}/{expected} results, RSS now {sampler.samples[-1][1] / 2**20:.0f} MiB, "
                    f"peak {sampler.peak / 2**20:.0f} MiB")

        expected = args.requests * len(tasks)
        statuses = await wait_for_results(bootstrap, topics.results, expected, args.timeout, worker, progress)
        got = sum(statuses.values())
        elapsed = time.perf_counter() - started
        sampler.stop()
        exit_code = worker.stop(timeout_s=60)
    finally:
        worker.kill()
        if embedded is not None:
            embedded.stop()
    peak = sampler.peak
    return {
        "requests": args.requests,
        "task": args.task,
        "image": {"size_px": args.image_size, "jpeg_bytes": photo_bytes,
                  "decoded_bytes": args.image_size * args.image_size * 3},
        "max_in_flight": args.max_in_flight,
        "max_in_flight_image_bytes": args.max_in_flight_image_bytes,
        "results": got,
        "results_expected": expected,
        "statuses": statuses,
        "seconds": round(elapsed, 1),
        "requests_per_s": round(args.requests / elapsed, 1),
        "baseline_rss_mib": round(baseline / 2**20, 1),
        "peak_rss_mib": round(peak / 2**20, 1),
        "peak_over_baseline": round(peak / baseline, 3),
        "peak_requests_in_flight": held["imgstream_requests_in_flight"],
        "peak_image_bytes_in_flight_mib": round(held["imgstream_image_bytes_in_flight"] / 2**20, 1),
        "worker_exit_code": exit_code,
        "worker_log": str(log_path),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "device": args.device,
        "machine": machine_info(args.device),
        "command": " ".join(sys.argv),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--task", choices=sorted(TASKS), default="face")
    parser.add_argument("--image-size", type=int, default=96, help="Square photo side in px (default 96).")
    parser.add_argument("--max-in-flight", type=int, default=64)
    parser.add_argument("--max-in-flight-image-bytes", type=int, default=None,
                        help="The worker's image byte bound (default: the worker's default).")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline-s", type=float, default=2.0, help="Seconds of baseline sampling.")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--bootstrap", help="Use this broker instead of starting the embedded one.")
    parser.add_argument("--json", help="Also write the summary as JSON to this file.")
    args = parser.parse_args()
    summary = asyncio.run(bench(args))
    for key, value in summary.items():
        print(f"{key:32} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    # An `error` result means the figures measured a failure path (a fetch refused, say), not the task.
    ok = (summary["results"] == summary["results_expected"] and summary["worker_exit_code"] == 0
          and not summary["statuses"].get("error"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
