"""Benchmark the task engine's micro-batching: batched vs `max_batch_size=1`, in one run.

For each operation, N requests of real photos (the ones that ship inside scikit-image) are
submitted concurrently (at most --concurrency in flight) to one Engine, and the wall time
from the first submit to the last result gives images/s. The same workload runs with the
batched configuration and with `max_batch_size=1`, in the same process, on the same loaded
models, after a warm-up of both, in alternating order over --rounds rounds, so the ratio
batched/unbatched is fair on a noisy machine. Images are decoded once up front: the figures
cover the engine (per-image preprocessing on CPU threads, the batcher, the model, results),
not fetching or decoding.

    python scripts/bench_engine.py                          # all operations, CPU-sized defaults
    python scripts/bench_engine.py --device cuda --json out.json
    python scripts/bench_engine.py --operations embed_clip_vit_b_32 --requests 256 --batch-size 64

Progress goes to stderr; the table (and, with --json, one JSON document) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, also when loaded by path

from benchlib import PHOTOS, load_average, load_photos, machine_info, progress_logger  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CLASSIFIER_COLLECTION = 1


@dataclass(frozen=True)
class Workload:
    """One benchmarked operation: the task every request carries and the models it uses."""

    name: str
    type: str
    params: dict[str, Any]
    models: tuple[str, ...]
    cpu_requests: int  # default N on the CPU (the whole default run takes a few minutes on 2 cores)
    gpu_requests: int  # default N on a GPU


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        # face_context=whole_image: MTCNN alone (the default context would run Faster R-CNN first).
        Workload("detect_bounding_box:prominent_face", "detect_bounding_box",
                 {"target": "prominent_face", "face_context": "whole_image"}, ("face",), 64, 256),
        Workload("detect_bounding_box:prominent_person", "detect_bounding_box",
                 {"target": "prominent_person"}, ("person",), 6, 256),
        Workload("embed_clip_vit_b_32", "embed_clip_vit_b_32", {"target": "whole_image"}, ("clip",), 96, 2048),
        Workload("embed_dino_v2", "embed_dino_v2", {"target": "whole_image"}, ("dino",), 32, 1024),
        # The classifier (trained at start) works on CLIP of the whole image: CLIP + a sklearn predict.
        Workload("classify", "classify", {"collection_id": CLASSIFIER_COLLECTION}, ("clip",), 96, 2048),
        Workload("describe_image", "describe_image", {"target": "whole_image", "max_length": 20},
                 ("caption",), 8, 128),
    )
}
# `detect_bounding_box` on the command line means both of its targets.
ALIASES = {"detect_bounding_box": ["detect_bounding_box:prominent_face", "detect_bounding_box:prominent_person"]}


progress = progress_logger("bench")


# -- setup ----------------------------------------------------------------------------------


def train_classifier(directory: Path, dim: int = 512) -> None:
    """A tiny LogisticRegression on CLIP-sized features, indexed in best_models.json."""
    import joblib
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(CLASSIFIER_COLLECTION)
    features = rng.normal(size=(64, dim))
    labels = np.array([True, False] * 32)
    name = f"collection_{CLASSIFIER_COLLECTION}_classifier_bench.pkl"
    joblib.dump(LogisticRegression(max_iter=200).fit(features, labels), directory / name)
    index = {str(CLASSIFIER_COLLECTION): {"model_file": name, "derivative_type": "whole_image",
                                          "embedding_type": "embed_clip_vit_b_32", "threshold": 0.5}}
    (directory / "best_models.json").write_text(json.dumps(index))


# -- one measured run -----------------------------------------------------------------------


@dataclass
class RunResult:
    mode: str  # "batched" or "unbatched"
    images: int
    wall_s: float
    statuses: dict[str, int]
    batch_stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0


async def run_once(models_config: Any, models: dict[str, Any], workload: Workload, photos: list[Any],
                   requests: int, concurrency: int, mode: str) -> RunResult:
    """A fresh Engine over the already loaded models (fresh batchers and stats), N requests."""
    from imgstream.analysis.engine import Engine
    from imgstream.schemas.events import AnalysisRequest

    engine = Engine(models_config, models={k: models[k] for k in workload.models})
    await engine.start()
    batch = [
        AnalysisRequest(
            request_id=f"bench-{mode}-{i}",
            image={"url": f"https://example.org/{PHOTOS[i % len(PHOTOS)]}.png"},
            tasks=[{"operation_id": "op", "type": workload.type, "params": workload.params}],
        )
        for i in range(requests)
    ]
    gate = asyncio.Semaphore(concurrency)
    statuses: dict[str, int] = {}
    errors: list[str] = []

    async def one(i: int) -> None:
        async with gate:
            (result,) = await engine.run(batch[i], photos[i % len(photos)])
        statuses[result.status] = statuses.get(result.status, 0) + 1
        if result.status == "error" and len(errors) < 3:
            errors.append(f"{result.error_code}: {result.error_message}")

    try:
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - started
        stats = engine.batch_stats()
    finally:
        await engine.close()
    if errors:
        raise RuntimeError(f"{workload.name} ({mode}): {statuses.get('error')} task(s) failed, e.g. {errors}")
    return RunResult(mode, requests, wall, statuses, stats)


# -- the benchmark --------------------------------------------------------------------------


def build_configs(args: argparse.Namespace, classifiers_dir: str) -> tuple[Any, Any]:
    from imgstream.schemas.config import BatchConfig, ModelsConfig

    base = ModelsConfig(weights=args.weights, device=args.device, classifiers_dir=classifiers_dir,
                        preload=[], fp16=not args.no_fp16)
    batched = {}
    for key in ("clip", "dino", "person", "face", "caption"):
        default = base.batch(key)
        batched[key] = BatchConfig(
            max_batch_size=args.batch_size or default.max_batch_size,
            max_wait_ms=default.max_wait_ms if args.max_wait_ms is None else args.max_wait_ms,
            max_queue=default.max_queue,
        )
    unbatched = {key: cfg.model_copy(update={"max_batch_size": 1}) for key, cfg in batched.items()}
    return (base.model_copy(update={"batching": batched}), base.model_copy(update={"batching": unbatched}))


def summarise(workload: Workload, runs: list[RunResult]) -> dict[str, Any]:
    out: dict[str, Any] = {"operation": workload.name, "models": list(workload.models)}
    for mode in ("batched", "unbatched"):
        mine = [r for r in runs if r.mode == mode]
        images = sum(r.images for r in mine)
        wall = sum(r.wall_s for r in mine)
        calls = sum(r.batch_stats.get(k, {}).get("calls", 0) for r in mine for k in workload.models)
        items = sum(r.batch_stats.get(k, {}).get("items", 0) for r in mine for k in workload.models)
        statuses: dict[str, int] = {}
        for r in mine:
            for status, count in r.statuses.items():
                statuses[status] = statuses.get(status, 0) + count
        out[mode] = {
            "images": images,
            "wall_s": wall,
            "images_per_s": images / wall if wall else 0.0,
            "rounds_images_per_s": [r.images_per_s for r in mine],
            "mean_batch": items / calls if calls else 0.0,
            "max_batch": max((r.batch_stats.get(k, {}).get("max_batch", 0) for r in mine for k in workload.models),
                             default=0),
            "statuses": statuses,
        }
    unbatched = out["unbatched"]["images_per_s"]
    out["ratio"] = out["batched"]["images_per_s"] / unbatched if unbatched else float("nan")
    # The ratio within each round (batched and unbatched ran back to back): its spread shows the noise.
    out["round_ratios"] = [b / u if u else float("nan") for b, u in
                           zip(out["batched"]["rounds_images_per_s"], out["unbatched"]["rounds_images_per_s"])]
    return out


def print_table(machine: dict[str, Any], settings: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    print(f"device: {machine['device']} ({machine['device_name']}); CPU: {machine['cpu_model']}, "
          f"{machine['cpu_count']} cores; torch {machine['torch']} ({machine['torch_threads']} threads)")
    print(f"load average at start {machine['loadavg_start']}, at end {machine.get('loadavg_end')}")
    print(f"weights={settings['weights']} concurrency={settings['concurrency']} rounds={settings['rounds']} "
          f"batched max_batch_size={settings['batch_sizes']} max_wait_ms={settings['max_wait_ms']}")
    header = ("operation", "N", "batched img/s", "unbatched img/s", "ratio", "per-round ratios", "mean batch")
    lines = []
    for row in rows:
        b, u = row["batched"], row["unbatched"]
        lines.append((
            row["operation"], str(row["requests"]), f"{b['images_per_s']:.2f}", f"{u['images_per_s']:.2f}",
            f"{row['ratio']:.2f}x", " ".join(f"{v:.2f}" for v in row["round_ratios"]),
            f"{b['mean_batch']:.1f} (max {b['max_batch']})",
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)))


async def bench(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    import torch

    from imgstream.analysis.models import load_model, select_device

    with tempfile.TemporaryDirectory(prefix="imgstream-bench-") as tmp:
        classifiers_dir = Path(tmp) / "trained_classifiers"
        classifiers_dir.mkdir()
        train_classifier(classifiers_dir)
        batched_cfg, unbatched_cfg = build_configs(args, str(classifiers_dir))
        device = select_device(batched_cfg)
        machine = machine_info(device)
        progress(f"device {machine['device']} ({machine['device_name']}), torch {machine['torch']}, "
                 f"{machine['cpu_count']} CPUs, weights={args.weights}")
        photos = load_photos()
        models: dict[str, Any] = {}
        rows = []
        for name in names:
            workload = WORKLOADS[name]
            for key in workload.models:
                if key not in models:
                    progress(f"loading model {key}")
                    started = time.perf_counter()
                    models[key] = await asyncio.get_running_loop().run_in_executor(
                        None, load_model, key, batched_cfg, device)
                    progress(f"model {key} loaded in {time.perf_counter() - started:.1f}s")
            requests = args.requests or (workload.gpu_requests if device.type == "cuda" else workload.cpu_requests)
            batch_size = max(batched_cfg.batch(k).max_batch_size for k in workload.models)
            # Warm-up, not measured: one full batch, and every photo (every input size) unbatched.
            warmups = (("batched", batched_cfg, min(requests, max(batch_size, len(PHOTOS)))),
                       ("unbatched", unbatched_cfg, min(requests, len(PHOTOS))))
            progress(f"{name}: warm-up ({warmups[0][2]} batched + {warmups[1][2]} unbatched requests)")
            for mode, cfg, count in warmups:
                await run_once(cfg, models, workload, photos, count, args.concurrency, mode)
            runs: list[RunResult] = []
            for round_index in range(args.rounds):
                order = [("batched", batched_cfg), ("unbatched", unbatched_cfg)]
                if round_index % 2:
                    order.reverse()
                for mode, cfg in order:
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    result = await run_once(cfg, models, workload, photos, requests, args.concurrency, mode)
                    runs.append(result)
                    progress(f"{name}: round {round_index + 1}/{args.rounds} {mode}: {requests} requests in "
                             f"{result.wall_s:.2f}s = {result.images_per_s:.2f} img/s")
            row = summarise(workload, runs)
            row["requests"] = requests
            rows.append(row)
            progress(f"{name}: batched {row['batched']['images_per_s']:.2f} img/s, unbatched "
                     f"{row['unbatched']['images_per_s']:.2f} img/s, ratio {row['ratio']:.2f}x")
            if args.free_models:
                still_needed = {k for n in names[names.index(name) + 1:] for k in WORKLOADS[n].models}
                for key in [k for k in models if k not in still_needed]:
                    del models[key]
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    machine["loadavg_end"] = load_average()
    settings = {
        "weights": args.weights,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "fp16": batched_cfg.fp16 and device.type == "cuda",
        "batch_sizes": {k: batched_cfg.batch(k).max_batch_size for k in ("clip", "dino", "person", "face", "caption")},
        "max_wait_ms": {k: batched_cfg.batch(k).max_wait_ms for k in ("clip", "dino", "person", "face", "caption")},
        "photos": list(PHOTOS),
    }
    return {"machine": machine, "settings": settings, "results": rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    choices = list(WORKLOADS) + list(ALIASES)
    parser = argparse.ArgumentParser(
        description="Engine micro-batching benchmark: the same workload batched and with max_batch_size=1 "
        "in one run; images/s for both and their ratio, per operation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--operations", nargs="+", default=list(WORKLOADS), metavar="OP",
                        help=f"operations to run; choices: {', '.join(choices)} "
                        "(detect_bounding_box = both targets)")
    parser.add_argument("--requests", type=int, default=None, metavar="N",
                        help="requests per operation per run (default per operation and device: CPU "
                        + ", ".join(f"{w.name.split(':')[-1]} {w.cpu_requests}" for w in WORKLOADS.values())
                        + "; GPU " + ", ".join(f"{w.name.split(':')[-1]} {w.gpu_requests}"
                                              for w in WORKLOADS.values()) + ")")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="requests in flight at once (the worker's max_in_flight default is 64)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="max_batch_size of every model in the batched run (default: each model's "
                        "configured default, schemas/config.py)")
    parser.add_argument("--max-wait-ms", type=float, default=None,
                        help="max_wait_ms of every model in the batched run (default: each model's default)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measured runs of each configuration, alternating which goes first")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--weights", choices=["random", "pretrained"], default="random",
                        help="random: seeded random weights (same compute; nothing to download); MTCNN always "
                        "uses its bundled weights")
    parser.add_argument("--no-fp16", action="store_true", help="keep fp32 on CUDA (fp16 is the engine's default)")
    parser.add_argument("--free-models", action="store_true",
                        help="drop each model once no later operation needs it (less memory)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="also write the results as JSON: to PATH, or as the last line of stdout")
    args = parser.parse_args(argv)
    for value, flag in ((args.requests, "--requests"), (args.batch_size, "--batch-size")):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1")
    if args.concurrency < 1 or args.rounds < 1:
        parser.error("--concurrency and --rounds must be at least 1")
    names: list[str] = []
    for op in args.operations:
        if op not in WORKLOADS and op not in ALIASES:
            parser.error(f"unknown operation {op!r}; choices: {', '.join(choices)}")
        for name in ALIASES.get(op, [op]):
            if name not in names:
                names.append(name)
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = asyncio.run(bench(args, args.names))
    except (RuntimeError, OSError, ValueError) as exc:  # no CUDA, weights not in the cache, a failing task
        print(f"bench_engine: error: {exc}", file=sys.stderr)
        return 1
    print_table(report["machine"], report["settings"], report["results"])
    if args.json == "-":
        print(json.dumps(report))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        progress(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
