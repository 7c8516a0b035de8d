"""Benchmark reuse on a duplicate-heavy stream: N requests over K distinct images, reuse on and off.

Crawlers see the same image again and again. This pre-produces N requests (a face box each;
--with-clip adds a CLIP embedding) whose images are K distinct JPEGs (each request keyed by its
image's sha256, as `imgstream submit` does), then
starts a real worker through the CLI and measures requests/s from its first consume to the last
result, and the model work it did (items and calls per model, from /metrics). It does so twice in
one run on fresh topics: with reuse (the default) and with `IMGSTREAM_MODELS__REUSE=false`, in
the order given by --order.

    python scripts/bench_reuse.py                                 # 10,000 requests over 500 images
    python scripts/bench_reuse.py --requests 2000 --distinct 100 --json reuse.json

Progress goes to stderr; the table (and, with --json, one JSON document) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib

from benchlib import (  # noqa: E402
    WorkerProcess,
    fresh_topics,
    jpeg_bytes,
    load_average,
    machine_info,
    photo,
    progress_logger,
    scrape_metrics,
    unique_jpeg,
    worker_env,
)

from imgstream.producer.embedded_broker import EmbeddedBroker, find_free_port  # noqa: E402
from imgstream.producer.topics import create_topics  # noqa: E402

log = progress_logger("bench_reuse")

FACE = {"operation_id": "face", "type": "detect_bounding_box",
        "params": {"target": "prominent_face", "face_context": "whole_image"}}
CLIP = {"operation_id": "clip", "type": "embed_clip_vit_b_32", "params": {}}


def images(distinct: int, size: int, workdir: Path) -> list[Path]:
    """`distinct` JPEG files: the astronaut at `size` px, each with its own comment (own bytes)."""
    base = jpeg_bytes(photo("astronaut").resize((size, size)))
    paths = []
    for i in range(distinct):
        path = workdir / f"img-{i}.jpg"
        path.write_bytes(unique_jpeg(base, f"bench_reuse {i}".encode()))
        paths.append(path)
    return paths


async def produce(bootstrap: str, topic: str, paths: list[Path], requests: int, seed: int,
                  tasks: list[dict[str, Any]]) -> None:
    keys = {path: hashlib.sha256(path.read_bytes()).hexdigest().encode() for path in paths}
    rng = random.Random(seed)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    try:
        sends = []
        for i in range(requests):
            path = paths[i % len(paths)] if i < len(paths) else rng.choice(paths)
            value = orjson.dumps({"schema_version": 1, "request_id": f"dup-{i}", "image": {"blob": path.as_uri()},
                                  "tasks": tasks})
            sends.append(await producer.send(topic, value, key=keys[path]))
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def first_consume(worker: WorkerProcess) -> float:
    """The moment the worker's consumed-requests counter first moves (polled every 20 ms)."""
    while True:
        snapshot = scrape_metrics(worker.http_port)
        if snapshot is not None and snapshot.total("imgstream_requests_consumed_total") > 0:
            return time.time()
        await asyncio.sleep(0.02)


async def last_result(bootstrap: str, topic: str, expected: int, timeout_s: float) -> tuple[float, int, int]:
    """(broker timestamp of the last result, results seen, results reused) once `expected` have arrived."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    seen, reused, last = set(), 0, 0.0
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
                for record in records:
                    result = orjson.loads(record.value)
                    key = (result["request_id"], result["operation_id"])
                    if key not in seen:
                        seen.add(key)
                        reused += bool(result.get("reused"))
                        last = max(last, record.timestamp / 1000.0)
    finally:
        await consumer.stop()
    return last, len(seen), reused


async def one_run(args: argparse.Namespace, bootstrap: str, paths: list[Path], workdir: Path, reuse: bool) -> dict:
    topics = fresh_topics("reuse")
    await create_topics(bootstrap, topics, partitions=args.partitions)
    tasks = [FACE, CLIP] if args.with_clip else [FACE]
    await produce(bootstrap, topics.requests, paths, args.requests, args.seed, tasks)
    env = worker_env(bootstrap=bootstrap, topics=topics, group=f"bench-{topics.requests}", device=args.device,
                     preload=["face", "clip"] if args.with_clip else ["face"], blob_dir=workdir / "blobs",
                     max_in_flight=args.max_in_flight,
                     blob_roots=[str(workdir)], session_timeout_ms=3000)
    env["IMGSTREAM_MODELS__REUSE"] = "true" if reuse else "false"
    label = "reuse on" if reuse else "reuse off"
    worker = WorkerProcess(env, find_free_port(), workdir / f"worker-{'on' if reuse else 'off'}.log").start()
    try:
        expected = args.requests * len(tasks)
        watching = asyncio.create_task(first_consume(worker))
        end, seen, reused = await last_result(bootstrap, topics.results, expected, args.timeout)
        start = await asyncio.wait_for(watching, 10)
        metrics = scrape_metrics(worker.http_port)
    finally:
        exit_code = worker.stop()
    items = metrics.by_label("imgstream_model_items_total", "model") if metrics else {}
    calls = metrics.by_label("imgstream_model_batches_total", "model") if metrics else {}
    window = max(end - start, 1e-9)
    log(f"{label}: {seen}/{expected} results in {window:.1f}s, model items {items}")
    return {"reuse": reuse, "requests_per_s": round(args.requests / window, 1), "window_s": round(window, 2),
            "results": seen, "results_expected": expected, "results_reused": reused,
            "model_items": {k: int(v) for k, v in items.items()},
            "model_calls": {k: int(v) for k, v in calls.items()}, "worker_exit_code": exit_code}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    workdir = Path(tempfile.mkdtemp(prefix="imgstream-bench-reuse-"))
    paths = images(args.distinct, args.image_size, workdir)
    with EmbeddedBroker() as broker:
        runs = {}
        for reuse in ([True, False] if args.order == "on-first" else [False, True]):
            runs["on" if reuse else "off"] = await one_run(args, broker.bootstrap, paths, workdir, reuse)
    on, off = runs["on"], runs["off"]
    return {
        "machine": machine_info(torch.device(args.device)),
        "settings": {"requests": args.requests, "distinct_images": args.distinct, "image_size": args.image_size,
                     "tasks": ["face box"] + (["clip"] if args.with_clip else []),
                     "max_in_flight": args.max_in_flight,
                     "partitions": args.partitions, "order": args.order, "command": " ".join(sys.argv)},
        "runs": runs,
        "speedup": round(on["requests_per_s"] / off["requests_per_s"], 2) if off["requests_per_s"] else None,
        "load_average_end": load_average(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--distinct", type=int, default=500, help="Distinct images the requests are spread over.")
    parser.add_argument("--image-size", type=int, default=128, help="Side of the square photos in px.")
    parser.add_argument("--with-clip", action="store_true",
                        help="Each request also asks for a CLIP embedding (reuse off then takes minutes on a CPU).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-in-flight", type=int, default=64)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--order", choices=["on-first", "off-first"], default="off-first")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the order in which duplicates come.")
    parser.add_argument("--timeout", type=float, default=1800.0, help="Seconds to wait for one run's results.")
    parser.add_argument("--json", help="Also write the summary as JSON to this file.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = asyncio.run(bench(args))
    print(f"{'run':10} {'requests/s':>11} {'window s':>9} {'results':>15} {'reused':>8}  model items (calls)")
    for name, run in summary["runs"].items():
        work = ", ".join(f"{k} {v} ({run['model_calls'].get(k, 0)})" for k, v in sorted(run["model_items"].items()))
        print(f"reuse {name:4} {run['requests_per_s']:>11} {run['window_s']:>9} "
              f"{run['results']:>7}/{run['results_expected']:<7} {run['results_reused']:>8}  {work}")
    print(f"reuse on / off: {summary['speedup']}x")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    ok = all(r["results"] == r["results_expected"] and r["worker_exit_code"] == 0 for r in summary["runs"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
