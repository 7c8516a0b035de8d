"""CPU per file:// blob read: in the thread pool (fetch.blob_reads=thread) against on the event loop (inline).

Writes --files small files (--size bytes each, W4's thumbnails are about 2 KB) to a temporary
directory, then reads every one through `FileBlobReader.read`, --concurrency at a time, on uvloop
(asyncio's loop without it), once per route and --rounds times in turn, and prints the process's CPU
and the wall time per read. The ratio between the routes is the figure; the absolute numbers move
with the machine.

    python scripts/bench_blob_reads.py
    python scripts/bench_blob_reads.py --files 4000 --size 2500 --rounds 3 --json blob_reads.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from imgstream.consumer.blob_readers import FileBlobReader  # noqa: E402
from imgstream.service.loops import run  # noqa: E402

ROUTES = ("thread", "inline")


async def _read_all(reader: FileBlobReader, references: list[str], concurrency: int) -> tuple[float, float]:
    """(CPU us, wall us) per read of every reference, `concurrency` at a time."""
    slots = asyncio.Semaphore(concurrency)

    async def one(reference: str) -> bytes:
        async with slots:
            return await reader.read(reference, 1 << 24)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(reference) for reference in references))
    return ((time.process_time() - cpu) / len(references) * 1e6,
            (time.perf_counter() - wall) / len(references) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=4000, help="files read per route and round (default 4000)")
    parser.add_argument("--size", type=int, default=2500, help="bytes per file (default 2500)")
    parser.add_argument("--concurrency", type=int, default=64, help="reads at once (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each route once per round (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="imgstream-blob-reads-") as root:
        references = []
        for i in range(args.files):
            path = Path(root) / f"{i}.jpg"
            path.write_bytes(os.urandom(args.size))
            references.append(path.as_uri())
        readers = {route: FileBlobReader([root], reads=route) for route in ROUTES}
        if not readers["inline"].inline:
            sys.exit("inline reads need Linux's O_PATH and /proc/self/fd: nothing to compare here")
        run(_read_all(readers["thread"], references[:200], args.concurrency), "auto")  # the pool's threads, the cache
        figures: dict[str, list[tuple[float, float]]] = {route: [] for route in ROUTES}
        for round_ in range(args.rounds):
            for route in ROUTES:
                figures[route].append(run(_read_all(readers[route], references, args.concurrency), "auto"))
                print(f"round {round_ + 1} {route}: {figures[route][-1][0]:.1f} us CPU per read", file=sys.stderr)

    summary = {route: {"cpu_us_per_read": [round(cpu, 1) for cpu, _ in runs],
                       "median_cpu_us_per_read": round(statistics.median(cpu for cpu, _ in runs), 1),
                       "median_wall_us_per_read": round(statistics.median(wall for _, wall in runs), 1)}
               for route, runs in figures.items()}
    ratio = summary["thread"]["median_cpu_us_per_read"] / summary["inline"]["median_cpu_us_per_read"]
    print(f"{args.files} files of {args.size} bytes, {args.concurrency} at a time, {args.rounds} rounds")
    print("route   | CPU us per read (each round) | median CPU us | median wall us")
    for route, row in summary.items():
        print(f"{route:7} | {', '.join(map(str, row['cpu_us_per_read'])):28} | "
              f"{row['median_cpu_us_per_read']:13} | {row['median_wall_us_per_read']}")
    print(f"thread / inline CPU per read: {ratio:.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "routes": summary,
                                         "thread_over_inline": round(ratio, 2)}, indent=1))


if __name__ == "__main__":
    main()
