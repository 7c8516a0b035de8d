"""Benchmark face detection: facenet-pytorch's stock `MTCNN.detect` against our cascade (FaceDetector).

Both run on the same real photos (scikit-image's, resized so the longest side is --size px),
one image per call, in one process, alternating which goes first in each round, for --rounds
rounds after a warm-up; the figure is the median time per image, and the ratio stock/ours. Stock
gets a PIL image, as the seed service called it; ours gets the decoded uint8 tensor, as the
engine hands it over, and its time includes building the summed-area table (collate). A last
line times ours on all the photos in one call (mixed sizes), which stock cannot do.

    python scripts/bench_mtcnn.py                      # 1024 px, 5 rounds, CPU
    python scripts/bench_mtcnn.py --threads 1 --rounds 9 --json mtcnn.json

The machine may be shared: the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, also when loaded by path

from benchlib import PHOTOS, fit_longest, load_average, load_photos, machine_info, progress_logger  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="longest side of each photo, px (default 1024)")
    parser.add_argument("--photos", default=",".join(PHOTOS), help="scikit-image photo names, comma-separated")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds over all photos (default 5)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = progress_logger("bench_mtcnn")
    import torch
    from facenet_pytorch import MTCNN

    from imgstream.analysis.imaging import pixels_of
    from imgstream.analysis.models.face import FaceDetector
    from imgstream.schemas.config import ModelsConfig

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine_info(device)
    names = [n for n in args.photos.split(",") if n]
    images = [fit_longest(image, args.size) for image in load_photos(names)]
    pixels = [pixels_of(image).to(device) for image in images]
    stock = MTCNN(keep_all=True, device=device).eval()
    ours = FaceDetector(ModelsConfig(), device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run_stock(index: int) -> int:
        boxes, _ = stock.detect(images[index])
        return 0 if boxes is None else len(boxes)

    def run_ours(index: int) -> int:
        return len(ours.run_batch([pixels[index]])[0])

    def timed(run: Any, index: int) -> tuple[float, int]:
        sync()
        started = time.perf_counter()
        found = run(index)
        sync()
        return time.perf_counter() - started, found

    progress(f"{len(images)} photos at {args.size} px on {device}, torch threads {torch.get_num_threads()}; "
             f"load average {load_average()}")
    counts = {}
    for index, name in enumerate(names):  # warm-up, and both find the same number of faces
        counts[name] = (timed(run_stock, index)[1], timed(run_ours, index)[1])
    times: dict[str, dict[str, list[float]]] = {name: {"stock": [], "ours": []} for name in names}
    for round_ in range(args.rounds):
        for index, name in enumerate(names):
            order = [("stock", run_stock), ("ours", run_ours)]
            for label, run in order if (round_ + index) % 2 == 0 else order[::-1]:
                times[name][label].append(timed(run, index)[0])
        progress(f"round {round_ + 1}/{args.rounds} done")
    batched = []
    for _ in range(args.rounds):
        sync()
        started = time.perf_counter()
        ours.run_batch(pixels)
        sync()
        batched.append((time.perf_counter() - started) / len(pixels))

    ms = lambda seconds: round(1000 * seconds, 1)  # noqa: E731
    per_photo = {}
    print(f"{'photo':22s} {'size':>10s} {'faces':>6s} {'stock ms':>9s} {'ours ms':>8s} {'ratio':>6s}")
    for name, image in zip(names, images):
        s, o = statistics.median(times[name]["stock"]), statistics.median(times[name]["ours"])
        per_photo[name] = {"size": list(image.size), "faces": counts[name], "stock_ms": ms(s), "ours_ms": ms(o),
                           "ratio": round(s / o, 2)}
        print(f"{name:22s} {f'{image.width}x{image.height}':>10s} {f'{counts[name][0]}/{counts[name][1]}':>6s} "
              f"{ms(s):9.1f} {ms(o):8.1f} {s / o:5.2f}x")
    all_stock = statistics.median(t for name in names for t in times[name]["stock"])
    all_ours = statistics.median(t for name in names for t in times[name]["ours"])
    print(f"{'all (median per image)':22s} {'':>10s} {'':>6s} {ms(all_stock):9.1f} {ms(all_ours):8.1f} "
          f"{all_stock / all_ours:5.2f}x")
    print(f"ours, all {len(images)} photos in one call: {ms(statistics.median(batched))} ms per image")
    info["loadavg_end"] = load_average()
    print(f"load average: start {info['loadavg_start']}, end {info['loadavg_end']}; "
          f"{info['device_name']}, torch {info['torch']} ({info['torch_threads']} threads)")
    mismatched = [name for name, (a, b) in counts.items() if a != b]
    if mismatched:
        print(f"WARNING: different face counts on {mismatched}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({
            "machine": info, "size": args.size, "rounds": args.rounds, "photos": per_photo,
            "median_ms": {"stock": ms(all_stock), "ours": ms(all_ours)}, "ratio": round(all_stock / all_ours, 2),
            "ours_batched_ms_per_image": ms(statistics.median(batched)),
        }, indent=2))
    return 1 if mismatched else 0


if __name__ == "__main__":
    raise SystemExit(main())
