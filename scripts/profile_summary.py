"""Where the worker's CPU goes per request: py-spy's collapsed stacks, sorted into the stream's categories.

Reads what `scripts/bench_stream.py --profile-worker DIR` writes: DIR/<workload>.txt (py-spy's raw
format: one collapsed stack per line, the thread first, a sample count last; a speedscope JSON works
too) and DIR/<workload>.meta.json (requests, sampling rate, and each thread's own CPU seconds and
run-queue wait from /proc/<pid>/task/<tid>/schedstat while it was sampled).

    python scripts/profile_summary.py prof/W4.txt              # the table
    python scripts/profile_summary.py prof/W4.txt --markdown   # the same, as a Markdown table
    python scripts/profile_summary.py prof/W4.txt --unclassified 30   # frames the rules miss

How a sample is classified (RULES below, in order): its frames are walked from the leaf to the root.
The first frame that matches a *specific* rule decides the category (our own modules by function,
and the libraries that do one job only: pydantic under decode_request, aiokafka's producer, fetcher
and commit code, aiohttp's client, PIL, prometheus_client, logging). Frames of shared machinery
(asyncio, concurrent.futures, threading, aiokafka's connection and protocol code, pydantic outside
the request decoder) are *generic*: they take the category of the nearest specific frame above them
(asyncio.to_thread under the blob reader is blob read; a socket write under aiokafka's sender is
produce), and only a stack with no specific frame at all goes to the generic category of its frame
nearest the leaf (the event loop's own work, aiokafka's connection reads). Samples of a thread
waiting (a pool thread in its work queue's get, the loop in select) are left out.

Figures: bench_stream.py samples with py-spy's --gil (the thread running Python), so a sample is
CPU time spent in Python or in C code that keeps the GIL. Each thread's samples are scaled to that
thread's own CPU seconds (schedstat) when the meta file has them, so the totals are CPU time; C work
that lets go of the GIL (libjpeg's decoding inside Pillow, socket syscalls, file reads) has no
samples of its own and is spread over the rest of its thread in proportion. `perf record -e
cpu-clock` on the worker put that at about a seventh of the event loop's CPU on W4 (libjpeg 6.5%, the
kernel 7%). Without the meta file, seconds = samples / rate.

The rules name functions of the worker's modules (consumer/worker.py and the modules it calls); a
moved or renamed function falls to its library's category or "other": check `--unclassified` and
`--explain` after a refactor.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

# The categories of issue 21, in the order the table shows them.
CATEGORIES = (
    "consume and parse",
    "validation",
    "blob read",
    "http fetch",
    "fetch, shared (deadline, dispatch)",
    "decode",
    "planning",
    "scheduling",
    "result building",
    "JSON encoding",
    "produce",
    "acknowledgement and offset tracking",
    "metrics",
    "logging",
    "request glue (worker's own lines)",
    "asyncio/event-loop overhead",
    "aiokafka internals",
    "models (preprocessing and inference; none on W4)",
    "other",
)
IDLE = "idle"


@dataclass(frozen=True)
class Rule:
    category: str
    module: str  # regex searched in the normalised module path
    function: str | None = None  # regex matched against the whole function name (qualified: Class.method)
    generic: bool = False
    below: str | None = None  # regex: only when a frame nearer the leaf is in a module matching it

    def matches(self, frame: Frame, below: list[Frame]) -> bool:
        if not re.search(self.module, frame.module):
            return False
        if self.function is not None and re.fullmatch(self.function, frame.function) is None:
            return False
        return self.below is None or any(re.search(self.below, f.module) for f in below)


_WORKER = r"(^|/)(consumer/worker|imgstream/[a-z_]+)\.py$"
RULES: tuple[Rule, ...] = (
    # -- idle: a thread waiting (py-spy saw it runnable, i.e. just woken) ------------------------
    Rule(IDLE, r"concurrent/futures/thread\.py$", r"_worker"),  # a pool thread in work_queue.get
    Rule(IDLE, r"(^|/)selectors\.py$", r".*select"),  # the event loop in epoll
    Rule(IDLE, r"(^|/)threading\.py$", r"(Condition|Event|Semaphore)\.wait"),
    # -- our code, by function -----------------------------------------------------------------
    # decode_request's pydantic work is validation; its own lines (orjson.loads) are parsing.
    Rule("validation", r"(^|/)schemas/codec\.py$", r"decode_request.*",
         below=r"^(pydantic|pydantic_core)/|(^|/)schemas/events\.py$"),
    Rule("consume and parse", r"(^|/)schemas/codec\.py$", r"decode_request.*|_summarise"),
    Rule("JSON encoding", r"(^|/)schemas/codec\.py$", r"encode.*|_fields"),
    Rule("result building", r"(^|/)consumer/publish\.py$", r"fit_result|failed_result|Fitted\..*"),
    Rule("produce", r"(^|/)consumer/(publish|batches)\.py$"),
    Rule("produce", r"(^|/)kafka_clients/partitioner\.py$"),
    Rule("acknowledgement and offset tracking", r"(^|/)consumer/offsets\.py$"),
    Rule("metrics", r"(^|/)(consumer|service)/(metrics|health)\.py$"),
    Rule("logging", r"(^|/)(consumer|service)/logs\.py$"),
    Rule("blob read", r"(^|/)consumer/(blob_readers|s3_reader)\.py$"),
    Rule("blob read", r"(^|/)consumer/(fetch|s3blobs)\.py$",
         r"ImageFetcher\._read_blob|FileBlobReader\..*|S3BlobReader\..*|_read_regular_file"),
    Rule("fetch, shared (deadline, dispatch)", r"(^|/)consumer/fetch\.py$",
         r"ImageFetcher\.(fetch|_fetch_within)|_Progress\..*|FetchedImage\..*"),
    Rule("http fetch", r"(^|/)consumer/(fetch|politeness)\.py$"),
    Rule("scheduling", r"(^|/)(analysis/(batcher|reuse)|consumer/image_budget)\.py$"),
    Rule("scheduling", r"(^|/)consumer/deferred\.py$"),
    Rule("decode", r"(^|/)analysis/(imaging|jpeg_header)\.py$"),
    # torchvision's image codecs decode; torch's op dispatch belongs to whoever called the op.
    Rule("decode", r"^torchvision/io/"),
    Rule("models (preprocessing and inference; none on W4)", r"^torch/(_ops\.py|jit/)", generic=True),
    Rule("models (preprocessing and inference; none on W4)",
         r"(^|/)analysis/(models/|preprocess\.py|devices\.py|area_resample\.py|classifiers\.py|vectors\.py)"
         r"|^(torch|torchvision|open_clip|transformers|timm|facenet_pytorch|sklearn)/"),
    Rule("decode", r"(^|/)analysis/engine\.py$", r"Engine\.(decode|_decode|device_decode)|_sha256"),
    Rule("result building", r"(^|/)analysis/results\.py$"),
    Rule("result building", r"(^|/)analysis/engine\.py$", r"_RequestRun\._timings|_TaskClock\..*"),
    Rule("planning", r"(^|/)analysis/engine\.py$", r"Engine\.run|_RequestRun\..*|_score"),
    Rule("planning", r"(^|/)schemas/operations\.py$"),
    # The worker's rooms (consumer/worker.py wires them; the rules after these name its methods
    # before the rooms were split out of it, for profiles of older commits).
    Rule("request glue (worker's own lines)", r"(^|/)consumer/handling\.py$",
         r"RequestHandler\.(process|handle|analyse)|lane_of"),
    Rule("produce", r"(^|/)consumer/handling\.py$", r"RequestHandler\.(publish|dead_letter|defer)"),
    Rule("result building", r"(^|/)consumer/handling\.py$", r"RequestHandler\.fit_all"),
    Rule("request glue (worker's own lines)", r"(^|/)consumer/(intake|lifecycle)\.py$",
         r"Intake\._request|Lifecycle\..*"),
    Rule("consume and parse", r"(^|/)consumer/intake\.py$"),
    Rule("acknowledgement and offset tracking", r"(^|/)consumer/checkpoint\.py$"),
    Rule("logging", r"(^|/)consumer/report\.py$", r"report_periodically"),
    Rule("metrics", r"(^|/)consumer/report\.py$"),
    Rule("acknowledgement and offset tracking", _WORKER, r"Worker\.(commit|release|assigned)"),
    Rule("produce", _WORKER, r"Worker\.(_publish|_dead_letter|_defer)"),
    Rule("result building", _WORKER, r"Worker\.(_fit|_fit_all)"),
    Rule("consume and parse", _WORKER,
         r"Worker\.(_consume|_take|_start|_room|_replay_room|_live_has_work|_held_replay|_pause|_wait_for_room"
         r"|in_flight_by_lane|lane|replay_slots)|Worker\._start\.<locals>.*"),
    Rule("metrics", _WORKER, r"Worker\.(_lag|_register_gauges|_host_waits|_publish_failures)|.*<lambda>"),
    Rule("logging", _WORKER, r"Worker\._report_periodically"),
    Rule("request glue (worker's own lines)", _WORKER, r"Worker\.(_process|_handle|_analyse)"),
    # -- libraries that do one job here ----------------------------------------------------------
    Rule("acknowledgement and offset tracking", r"^aiokafka/consumer/group_coordinator\.py$",
         r".*[Cc]ommit.*"),
    Rule("acknowledgement and offset tracking", r"^aiokafka/producer/sender\.py$",
         r".*handle_response.*|.*_handle_.*"),
    Rule("acknowledgement and offset tracking", r"^aiokafka/producer/message_accumulator\.py$",
         r".*\.(done|done_noack|_set_result|failure)"),
    Rule("produce", r"^aiokafka/(producer/|partitioner\.py)"),
    Rule("consume and parse", r"^aiokafka/consumer/(fetcher|consumer|subscription_state)\.py$"),
    Rule("metrics", r"^prometheus_client/|^aiohttp/web"),
    Rule("logging", r"^logging/"),
    Rule("http fetch", r"^(aiohttp|yarl|multidict|aiohappyeyeballs|propcache|aiosignal|frozenlist)/"),
    Rule("decode", r"^(PIL|numpy)/"),
    # -- generic: the category of the nearest specific frame above them --------------------------
    Rule("validation", r"^(pydantic|pydantic_core)/", generic=True),
    Rule("aiokafka internals", r"^aiokafka/", generic=True),
    Rule("asyncio/event-loop overhead",
         r"^(asyncio/|concurrent/|threading\.py|queue\.py|contextlib\.py|selectors\.py|_weakrefset\.py"
         r"|weakref\.py|functools\.py|contextvars|socket\.py|ssl\.py)", generic=True),
)

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(:(?P<line>\d+))?\)$")
_LIB = re.compile(r".*/(?:site-packages|dist-packages|python3\.\d+)/(.*)$")
_THREAD = re.compile(r"^thread \((?P<tid>(0x)?[0-9a-fA-F]+)\)(: (?P<name>.*))?$")


def module_of(path: str, root: str | None) -> str:
    """A file path as a module path: site-packages/stdlib-relative, repo-relative, or <frozen x> -> x.py."""
    if path.startswith("<frozen "):
        return path[len("<frozen "):-1].replace(".", "/") + ".py"
    found = _LIB.match(path)
    if found:
        return found.group(1)
    if root and path.startswith(root):
        return path[len(root):].lstrip("/")
    for top in ("consumer", "analysis", "schemas", "producer", "kafka_clients", "blobs", "service", "imgstream"):
        index = path.rfind(f"/{top}/")
        if index >= 0:
            return path[index + 1:]
    return path


@dataclass(frozen=True)
class Frame:
    function: str
    module: str

    @classmethod
    def parse(cls, text: str, root: str | None) -> Frame:
        found = _FRAME.match(text)
        if not found:
            return cls(text, "")
        return cls(found.group("function"), module_of(found.group("file"), root))

    def __str__(self) -> str:
        return f"{self.function} ({self.module})"


def _rule_for(frame: Frame, below: list[Frame]) -> Rule | None:
    for rule in RULES:
        if rule.matches(frame, below):
            return rule
    return None


def classify(frames: list[Frame]) -> str:
    """The category of one stack (root first), by RULES: see the module docstring."""
    return decide(frames)[0]


def decide(frames: list[Frame]) -> tuple[str, Frame | None]:
    """The category of one stack (root first) and the frame that decided it."""
    if not frames:
        return "other", None
    leaf_rule = _rule_for(frames[-1], [])
    if leaf_rule is not None and leaf_rule.category == IDLE:
        return IDLE, frames[-1]
    generic: tuple[str, Frame] | None = None
    for depth in range(len(frames) - 1, -1, -1):
        rule = _rule_for(frames[depth], frames[depth + 1:])
        if rule is None or rule.category == IDLE:
            continue
        if not rule.generic:
            return rule.category, frames[depth]
        if generic is None:
            generic = (rule.category, frames[depth])
    return generic or ("other", frames[-1])


@dataclass
class Sample:
    tid: str
    thread: str
    frames: list[Frame]
    count: int


def read_raw(path: Path, root: str | None) -> Iterator[Sample]:
    """py-spy --format raw --threads: `thread (tid): name;frame;frame N` per line."""
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        parts = stack.split(";")
        tid, name = "?", "?"
        found = _THREAD.match(parts[0])
        if found:
            tid, name = found.group("tid"), found.group("name") or "?"
            parts = parts[1:]
        yield Sample(_decimal(tid), name, [Frame.parse(p, root) for p in parts if p], int(count))


def read_speedscope(path: Path, root: str | None, rate_hz: float) -> Iterator[Sample]:
    """py-spy --format speedscope: one sampled profile per thread, named `Thread <tid> "<name>"`, its
    stacks root first, each sample weighted in seconds (1 / rate)."""
    doc = json.loads(path.read_text())
    frames = [Frame(f.get("name", "?"), module_of(f.get("file") or "", root)) for f in doc["shared"]["frames"]]
    for profile in doc["profiles"]:
        found = re.match(r'^Thread (?P<tid>(0x)?[0-9a-fA-F]+)(?: "(?P<name>.*)")?', profile.get("name", ""))
        tid, name = (_decimal(found.group("tid")), found.group("name") or "?") if found else ("?", "?")
        for stack, weight in zip(profile["samples"], profile["weights"]):
            # --threads also puts the thread in as the root frame.
            stack_frames = [frames[i] for i in stack if not _THREAD.match(frames[i].function)]
            yield Sample(tid, name, stack_frames, max(1, round(weight * rate_hz)))


def _decimal(tid: str) -> str:
    return str(int(tid, 16)) if tid.lower().startswith("0x") else tid


@dataclass
class Summary:
    requests: int | None
    rate_hz: float
    # category -> thread kind ("loop" or "threads") -> seconds of CPU
    seconds: dict[str, dict[str, float]]
    samples: Counter
    idle_samples: int
    scaled: bool
    thread_cpu: dict[str, tuple[str, float, float]]  # tid -> (name, cpu s, run-queue wait s)
    unclassified: Counter
    deciding: dict[str, Counter]  # category -> deciding frame -> samples


def summarise(samples: Iterable[Sample], meta: dict | None) -> Summary:
    rate = float((meta or {}).get("rate_hz") or 100)
    threads = {str(tid): info for tid, info in ((meta or {}).get("threads") or {}).items()}
    main_tid = str((meta or {}).get("pid") or "")
    per_thread: dict[str, Counter] = defaultdict(Counter)
    names: dict[str, str] = {}
    counts: Counter = Counter()
    unclassified: Counter = Counter()
    deciding: dict[str, Counter] = defaultdict(Counter)
    idle = 0
    for sample in samples:
        category, frame = decide(sample.frames)
        deciding[category][str(frame)] += sample.count
        if category == IDLE:
            idle += sample.count
            continue
        if sample.thread != "?":
            names[sample.tid] = sample.thread
        per_thread[sample.tid][category] += sample.count
        counts[category] += sample.count
        if category == "other" and sample.frames:
            unclassified[str(sample.frames[-1])] += sample.count
    seconds: dict[str, dict[str, float]] = defaultdict(lambda: {"loop": 0.0, "threads": 0.0})
    thread_cpu = {}
    scaled = bool(threads)
    for tid, categories in per_thread.items():
        total = sum(categories.values())
        sampled_s = total / rate
        info = threads.get(tid)
        cpu_s = float(info["cpu_s"]) if info else None
        factor = cpu_s / sampled_s if cpu_s is not None and sampled_s > 0 else 1.0
        if info is None:
            scaled = False
        name = names.get(tid, "?")
        kind = "loop" if tid == main_tid or name == "MainThread" else "threads"
        thread_cpu[tid] = (name, cpu_s if cpu_s is not None else sampled_s,
                           float(info["runqueue_wait_s"]) if info else float("nan"))
        for category, n in categories.items():
            seconds[category][kind] += n / rate * factor
    requests = (meta or {}).get("requests")
    return Summary(requests, rate, dict(seconds), counts, idle, scaled, thread_cpu, unclassified,
                   dict(deciding))


def render(summary: Summary, markdown: bool) -> str:
    per = 1000.0 / summary.requests if summary.requests else None
    unit = "ms/request" if per else "s"
    scale = per if per else 1.0
    total = {kind: sum(v[kind] for v in summary.seconds.values()) for kind in ("loop", "threads")}
    grand = total["loop"] + total["threads"]
    header = ("category", f"event loop {unit}", f"other threads {unit}", f"total {unit}", "% of CPU", "samples")
    rows = []
    for category in CATEGORIES:
        v = summary.seconds.get(category, {"loop": 0.0, "threads": 0.0})
        both = v["loop"] + v["threads"]
        rows.append((category, f"{v['loop'] * scale:.3f}", f"{v['threads'] * scale:.3f}", f"{both * scale:.3f}",
                     f"{100.0 * both / grand:.1f}" if grand else "-", str(summary.samples.get(category, 0))))
    rows.append(("all", f"{total['loop'] * scale:.3f}", f"{total['threads'] * scale:.3f}", f"{grand * scale:.3f}",
                 "100.0", str(sum(summary.samples.values()))))
    lines = _table(header, rows, markdown)
    lines.append("")
    lines.append(f"{summary.requests} requests; {summary.rate_hz:g} samples/s; {summary.idle_samples} samples of "
                 f"waiting threads left out; "
                 + ("each thread scaled to its own CPU seconds (schedstat)" if summary.scaled
                    else "seconds = samples / rate (no per-thread CPU in the meta file)"))
    for tid, (name, cpu, wait) in sorted(summary.thread_cpu.items(), key=lambda item: -item[1][1]):
        lines.append(f"  thread {tid} {name}: {cpu:.2f} CPU s, {wait:.2f} s runnable waiting for a core")
    return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], markdown: bool) -> list[str]:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        return out
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    fmt = lambda row: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths)))
    return [fmt(header), "  ".join("-" * w for w in widths), *[fmt(r) for r in rows]]


def load(path: Path, root: str | None) -> tuple[list[Sample], dict | None]:
    """The samples of a raw or speedscope file, and the meta file bench_stream.py wrote beside it."""
    meta_path = path.with_suffix(".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if path.read_text(errors="replace")[:1] == "{":
        samples = list(read_speedscope(path, root, float((meta or {}).get("rate_hz") or 100)))
    else:
        samples = list(read_raw(path, root))
    return samples, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path, help="DIR/<workload>.txt from bench_stream.py --profile-worker")
    parser.add_argument("--requests", type=int, help="requests the profile covers (default: from the meta file)")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table")
    parser.add_argument("--unclassified", type=int, default=0, metavar="N",
                        help="also list the N leaf frames most often left in 'other'")
    parser.add_argument("--explain", type=int, default=0, metavar="N",
                        help="also list, per category, the N frames that most often decided it")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    root = str(Path(__file__).resolve().parent.parent)
    samples, meta = load(args.profile, root)
    if args.requests:
        meta = {**(meta or {}), "requests": args.requests}
    summary = summarise(samples, meta)
    print(render(summary, args.markdown))
    if args.explain:
        print(f"\nwhat decided each category (top {args.explain} frames, samples):")
        for category in (*CATEGORIES, IDLE):
            top = summary.deciding.get(category, Counter()).most_common(args.explain)
            if top:
                print(f"  {category}: " + "; ".join(f"{frame} {n}" for frame, n in top))
    if args.unclassified:
        print(f"\nleaf frames of 'other' (top {args.unclassified}):")
        for frame, n in summary.unclassified.most_common(args.unclassified):
            print(f"  {n:6d}  {frame}")
    if args.json:
        per = 1000.0 / summary.requests if summary.requests else None
        Path(args.json).write_text(json.dumps({
            "requests": summary.requests, "scaled_to_thread_cpu": summary.scaled,
            "ms_per_request" if per else "seconds": {
                c: {k: round(v * (per or 1.0), 4)
                    for k, v in summary.seconds.get(c, {"loop": 0.0, "threads": 0.0}).items()}
                for c in CATEGORIES},
            "samples": dict(summary.samples), "idle_samples": summary.idle_samples,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
