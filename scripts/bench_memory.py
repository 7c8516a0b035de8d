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
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

from producer.embedded_broker import EmbeddedBroker, find_free_port  # noqa: E402
from producer.topics import create_topics  # noqa: E402
from schemas.config import Topics  # noqa: E402

TASKS: dict[str, list[dict[str, Any]]] = {
    # MTCNN alone (face_context=whole_image), the cheapest model task.
    "face": [{"operation_id": "face", "type": "detect_bounding_box",
              "params": {"target": "prominent_face", "face_context": "whole_image"}}],
    # No model: the worker fetches and decodes the image, then answers `skipped`
    # (unsupported_operation). Isolates the consume/fetch/decode/publish path.
    "decode": [{"operation_id": "noop", "type": "benchmark_decode_only", "params": {}}],
}


def log(message: str) -> None:
    print(f"[bench_memory {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def save_photo(path: Path, size: int) -> int:
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).convert("RGB").resize((size, size)).save(path, "JPEG", quality=90)
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


def scrape(port: int) -> dict[str, float]:
    """The worker's unlabelled gauges of interest from /metrics (empty if it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    out = {}
    for name in ("imgstream_requests_in_flight", "imgstream_image_bytes_in_flight"):
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        if match:
            out[name] = float(match.group(1))
    return out


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


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
                           worker: subprocess.Popen[bytes], on_progress) -> int:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    seen: set[tuple[str, str]] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < expected and time.monotonic() < deadline and worker.poll() is None:
            for records in (await consumer.getmany(timeout_ms=500, max_records=5000)).values():
                for record in records:
                    result = orjson.loads(record.value)
                    seen.add((result["request_id"], result["operation_id"]))
            on_progress(len(seen))
    finally:
        await consumer.stop()
    return len(seen)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="imgstream-bench-memory-"))
    embedded = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        embedded = EmbeddedBroker().start()
        bootstrap = embedded.bootstrap
    u = uuid.uuid4().hex[:8]
    topics = Topics(requests=f"bench-{u}.requests", replay=f"bench-{u}.replay", results=f"bench-{u}.results",
                    dlq=f"bench-{u}.dlq")
    await create_topics(bootstrap, topics, partitions=args.partitions)
    photo = workdir / "photo.jpg"
    photo_bytes = save_photo(photo, args.image_size)
    tasks = TASKS[args.task]
    http_port = find_free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSTREAM_")}
    env.update({
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "IMGSTREAM_KAFKA__BOOTSTRAP": bootstrap,
        "IMGSTREAM_KAFKA__GROUP": f"bench-{u}",
        "IMGSTREAM_KAFKA__SESSION_TIMEOUT_MS": "3000",
        "IMGSTREAM_KAFKA__TOPICS__REQUESTS": topics.requests,
        "IMGSTREAM_KAFKA__TOPICS__REPLAY": topics.replay,
        "IMGSTREAM_KAFKA__TOPICS__RESULTS": topics.results,
        "IMGSTREAM_KAFKA__TOPICS__DLQ": topics.dlq,
        "IMGSTREAM_MODELS__WEIGHTS": "random",
        "IMGSTREAM_MODELS__DEVICE": args.device,
        "IMGSTREAM_MODELS__PRELOAD": json.dumps(["face"] if args.task == "face" else []),
        "IMGSTREAM_BLOBS__DIR": str(workdir / "blobs"),
        "IMGSTREAM_MAX_IN_FLIGHT": str(args.max_in_flight),
    })
    if args.max_in_flight_image_bytes is not None:
        env["IMGSTREAM_MAX_IN_FLIGHT_IMAGE_BYTES"] = str(args.max_in_flight_image_bytes)
    log_path = workdir / "worker.log"
    command = [sys.executable, "-m", "producer.cli", "worker", "--http-port", str(http_port)]
    log(f"worker log: {log_path}")
    with open(log_path, "ab") as worker_log:
        worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=worker_log, stderr=subprocess.STDOUT)
    sampler = RssSampler(worker.pid)
    try:
        deadline = time.monotonic() + 300
        while not (ready(http_port) and "partitions assigned" in log_path.read_text(errors="replace")):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker did not become ready; log:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        sampler.start()
        await asyncio.sleep(args.baseline_s)
        baseline = max(rss for _, rss in sampler.samples)
        log(f"baseline RSS {baseline / 2**20:.0f} MiB (models loaded, group joined, nothing consumed)")

        produce_s = await produce_backlog(bootstrap, topics.requests, args.requests, {"blob": photo.as_uri()}, tasks)
        log(f"backlog of {args.requests} requests produced in {produce_s:.1f}s")
        started = time.perf_counter()
        held = {"imgstream_requests_in_flight": 0.0, "imgstream_image_bytes_in_flight": 0.0}
        last_report = [0.0]

        def progress(done: int) -> None:
            for name, value in scrape(http_port).items():
                held[name] = max(held[name], value)
            if time.monotonic() - last_report[0] > 10:
                last_report[0] = time.monotonic()
                log(f"{done}/{expected} results, RSS now {sampler.samples[-1][1] / 2**20:.0f} MiB, "
                    f"peak {sampler.peak / 2**20:.0f} MiB")

        expected = args.requests * len(tasks)
        got = await wait_for_results(bootstrap, topics.results, expected, args.timeout, worker, progress)
        elapsed = time.perf_counter() - started
        sampler.stop()
        worker.send_signal(signal.SIGTERM)
        exit_code = worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
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
    ok = summary["results"] == summary["results_expected"] and summary["worker_exit_code"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
