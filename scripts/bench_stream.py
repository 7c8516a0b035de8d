"""End-to-end stream benchmark: Kafka -> fetch -> decode -> engine -> result -> publish, beside two baselines.

For each workload it pre-produces N requests on fresh topics of a broker (the embedded Tansu by
default), starts a real `imgstream worker` subprocess through the CLI (random weights, only the
workload's models) and measures from the worker's first consume (its /metrics, polled every
20 ms) to the broker timestamp of the last result: images/s, and the latency of every result
(result timestamp minus request timestamp; for requests published before the first consume,
from that moment). Then, with the same worker, requests offered at a slow fixed rate give the
light-load latency. In the same run, on the same photos and tasks, this process measures two
baselines while the worker is stopped: the model-only limit (the engine's models on
preprocessed tensors, run_batch timed alone, at their best batch size) and a seed-style
pipeline (one request at a time: fetch, PIL decode, each task at batch size 1 with the stock
library calls, crops as PNG base64, stdlib JSON), the way the per-request HTTP service worked.

Images are real photos from scikit-image, the longest side resized to --image-size (W4: 64 px),
JPEG quality 90, each request's bytes made unique by a JPEG comment segment (same pixels).
Even-numbered requests reference file:// blobs, odd-numbered ones http URLs on a local aiohttp
server (the worker runs with private addresses allowed).

Workloads: W1 CLIP ViT-B/32 of the whole image; W2 the typical four tasks (CLIP whole image,
person box, face box in the person context, CLIP of that face); W3 captions (describe_image,
max_length 20); W4 pipeline overhead (an unknown task type on 64 px images: fetch, decode and a
`skipped` result; no model-only entry); W5 face box (MTCNN, whole-image context).

    python scripts/bench_stream.py --quick                          # all five, under 4 min on 2 CPU cores
    python scripts/bench_stream.py --json bench_stream_cpu.json     # CPU defaults, ~10-15 min on 2 cores
    python scripts/bench_stream.py --device cuda --json gpu.json    # sized for one H100/H200
    python scripts/bench_stream.py --workloads W1,W5 --requests 2000 --batching '{"clip": {"max_batch_size": 128}}'
    python scripts/bench_stream.py --bootstrap 127.0.0.1:9092 --workloads W4 --max-in-flight 256
    python scripts/bench_stream.py --workloads W4 --tracing        # W4 untraced, then traced: the ratio

With --tracing each workload's stream runs twice, the second time with tracing on (IMGSTREAM_TRACING=on),
its spans exported over OTLP/HTTP to a receiver this process runs on loopback (scripts/otlp_receiver.py),
so the worker pays for making, encoding and sending every span; the report gives traced/untraced.
OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG, when set here, sample the traced run (e.g.
parentbased_traceidratio and 0.01).
    python scripts/bench_stream.py --workloads W4 --profile-worker prof/   # + py-spy on the worker (as root)

Progress goes to stderr and the table to stdout. The exit status is 1 when a stream run lost
results (or timed out) or a worker exited non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, also when loaded by path

from benchlib import (  # noqa: E402
    MORE_PHOTOS,
    PHOTOS,
    WorkerFailed,
    WorkerProcess,
    cpu_seconds,
    embedded_broker_pid,
    fit_longest,
    free_ports,
    fresh_topics,
    jpeg_bytes,
    load_average,
    machine_busy_seconds,
    machine_info,
    photo,
    progress_logger,
    scrape_metrics,
    unique_jpeg,
    worker_env,
)

from imgstream.producer.embedded_broker import EmbeddedBroker, find_free_port  # noqa: E402
from imgstream.producer.topics import create_topics  # noqa: E402
from imgstream.service.loops import loop_factory  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

log = progress_logger("bench_stream")

STREAM_PHOTOS = PHOTOS + MORE_PHOTOS
HOST = "127.0.0.1"
METRICS_POLL_S = 0.02
# Minimum score of the prominent person and face (SPEC §4 defaults), used by both baselines so
# that they do the work the stream does (the same regions get searched and cropped).
PERSON_MIN_SCORE = 0.5
FACE_MIN_SCORE = 0.95
CAPTION_TOKENS = 20


# -- workloads ------------------------------------------------------------------------------


def _per_profile(cpu: int, cpu_quick: int, cuda: int, cuda_quick: int) -> dict[str, int]:
    return {"cpu": cpu, "cpu-quick": cpu_quick, "cuda": cuda, "cuda-quick": cuda_quick}


@dataclass(frozen=True)
class Workload:
    """One benchmarked request shape: its tasks, the worker's models, and N (stream) and M (seed) per profile."""

    name: str
    title: str
    tasks: tuple[dict[str, Any], ...]
    models: tuple[str, ...]
    requests: dict[str, int]
    seed_requests: dict[str, int]
    image_size: int | None = None  # None: --image-size
    model_only: bool = True
    ok_statuses: tuple[tuple[str, str | None], ...] = (("success", None),)

    def ok(self, status: str, error_code: str | None) -> bool:
        return (status, error_code) in self.ok_statuses


def _task(operation_id: str, type_: str, **params: Any) -> dict[str, Any]:
    return {"operation_id": operation_id, "type": type_, "params": params}


# Sized so that on 2 CPU cores the default run takes ~10-15 min and --quick 3-4 min (measured there,
# undisturbed: Faster R-CNN ~1.7 s and BLIP's 20 tokens ~1.5 s per image, W2 ~0.3 and W5 ~3
# requests/s through the stream); CUDA sizes are for one H100/H200.
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("W1", "CLIP ViT-B/32, whole image",
                 (_task("clip", "embed_clip_vit_b_32", target="whole_image"),),
                 ("clip",), _per_profile(600, 48, 20_000, 2_000), _per_profile(120, 12, 500, 100)),
        Workload("W2", "CLIP + person box + face box + CLIP of the face (person context)",
                 (_task("clip_whole", "embed_clip_vit_b_32", target="whole_image"),
                  _task("person_box", "detect_bounding_box", target="prominent_person"),
                  _task("face_box", "detect_bounding_box", target="prominent_face", face_context="prominent_person"),
                  _task("clip_face", "embed_clip_vit_b_32", target="prominent_face",
                        face_context="prominent_person")),
                 ("clip", "person", "face"), _per_profile(20, 4, 2_000, 300), _per_profile(10, 2, 200, 50)),
        Workload("W3", f"captions (BLIP, {CAPTION_TOKENS} tokens)",
                 (_task("caption", "describe_image", target="whole_image", max_length=CAPTION_TOKENS),),
                 ("caption",), _per_profile(24, 2, 2_000, 256), _per_profile(6, 1, 60, 20)),
        # An unknown type: the worker fetches and decodes the image, then answers `skipped`.
        Workload("W4", "pipeline overhead: fetch + decode only, 64 px",
                 (_task("noop", "benchmark_decode_only"),),
                 (), _per_profile(10_000, 400, 20_000, 4_000), _per_profile(1_000, 100, 2_000, 500),
                 image_size=64, model_only=False, ok_statuses=(("skipped", "unsupported_operation"),)),
        Workload("W5", "face box (MTCNN, whole image)",
                 (_task("face", "detect_bounding_box", target="prominent_face", face_context="whole_image"),),
                 ("face",), _per_profile(200, 24, 2_000, 300), _per_profile(80, 6, 200, 50)),
    )
}

# Model-only batch sizes swept per model, and the least time each point is timed for.
SWEEPS: dict[str, dict[str, tuple[int, ...]]] = {
    "cpu": {"clip": (1, 4, 16, 32), "face": (1, 4, 8), "person": (1, 2, 4), "caption": (1, 4)},
    "cpu-quick": {"clip": (1, 16), "face": (1, 4), "person": (1,), "caption": (1,)},
    "cuda": {"clip": (16, 64, 128, 256), "face": (8, 16, 32), "person": (4, 8, 16), "caption": (8, 32, 64)},
    "cuda-quick": {"clip": (64, 256), "face": (16,), "person": (8,), "caption": (32,)},
}
MIN_TIMED_S = {"cpu": 2.0, "cpu-quick": 0.5, "cuda": 1.0, "cuda-quick": 0.5}


# -- images ---------------------------------------------------------------------------------


class ImageBank:
    """The base JPEGs (one per photo) at each size, and their decoded pixels, made once."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self._jpegs: dict[int, list[bytes]] = {}

    def jpegs(self, size: int) -> list[bytes]:
        if size not in self._jpegs:
            self._jpegs[size] = [jpeg_bytes(fit_longest(photo(name), size), quality=90) for name in self.names]
        return self._jpegs[size]

    def decoded(self, size: int) -> list[Any]:
        """What the worker decodes from each base JPEG (RGB PIL images)."""
        from PIL import Image

        return [Image.open(io.BytesIO(data)).convert("RGB") for data in self.jpegs(size)]


class RequestImages:
    """One workload's request images, unique per index: even indices as file:// blobs, odd as http URLs."""

    def __init__(self, name: str, bases: list[bytes], directory: Path, server: ImageServer, run_id: str) -> None:
        self.name = name
        self.bases = bases
        self.directory = directory
        self.server = server
        self.run_id = run_id
        directory.mkdir(parents=True, exist_ok=True)

    def bytes_of(self, index: int) -> bytes:
        tag = f"imgstream-bench {self.run_id} {self.name} {index}".encode()
        return unique_jpeg(self.bases[index % len(self.bases)], tag)

    def ref(self, index: int) -> dict[str, str]:
        """The request's `image` field; writes the blob file for even indices."""
        if index % 2 == 0:
            path = self.directory / f"{index}.jpg"
            path.write_bytes(self.bytes_of(index))
            return {"blob": path.as_uri()}
        return {"url": self.server.url(f"{self.name}/{index}.jpg")}

    def remove_files(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class ImageServer:
    """An HTTP server on 127.0.0.1, in a thread with its own event loop, serving request images from memory.

    Two kinds (`--image-server`). `aiohttp`, the default, is the server issue 21's targets and all but
    one run of record used, and the seed-style loop's rate depends on it. It runs on the cores it
    helps measure, though: in W4's backlog this process took 0.08 to 0.12 ms of CPU per request
    (about 120 to 200 us per GET), a quarter to a third of the worker's own cost. With `minimal`
    (MinimalImageServer) it took 0.03 to 0.04 ms. The minimal server also answers a new connection
    for less (about 130 us of CPU against 290 to 440), so the seed-style loop, which opens one per GET
    as the seed did, gets faster with it. docs/BENCHMARKS.md (2026-12-07, morning) has both effects.
    """

    kind = "aiohttp"

    def __init__(self) -> None:
        self.sets: dict[str, RequestImages] = {}
        self.port = find_free_port(HOST)
        self.served = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @staticmethod
    def of_kind(kind: str) -> ImageServer:
        return IMAGE_SERVERS[kind]()

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}/{path}"

    def start(self) -> ImageServer:
        self._thread = threading.Thread(target=self._serve, name="image-server", daemon=True)
        self._thread.start()
        if not self._started.wait(10) or self._error is not None:
            raise RuntimeError(f"the image server did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.new_event_loop()

    async def _listen(self) -> Any:
        """Start serving; what `_close` takes to stop."""
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/{set}/{index}.jpg", self._image)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, self.port).start()
        return runner

    async def _close(self, handle: Any) -> None:
        await handle.cleanup()

    def _serve(self) -> None:
        loop = self._new_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            handle = loop.run_until_complete(self._listen())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        loop.run_forever()
        loop.run_until_complete(self._close(handle))
        loop.close()

    async def _image(self, request: Any) -> Any:
        from aiohttp import web

        body = self.image(request.match_info["set"], request.match_info["index"])
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="image/jpeg")

    def image(self, name: str, index: str) -> bytes | None:
        """Request image `index` of set `name` (counted as served); None: no such image."""
        images = self.sets.get(name)
        if images is None or not index.isdigit():
            return None
        self.served += 1
        return images.bytes_of(int(index))


class MinimalImageServer(ImageServer):
    """`--image-server minimal`: HTTP/1.1 by hand on uvloop, the least CPU per GET that still speaks it.

    It reads the request line and the one header it needs (Connection), keeps connections alive as
    HTTP/1.1 does, answers requests in order (pipelined ones too), and answers 404, 405, 400 or 431 to
    anything but a GET or HEAD of `/<set>/<index>.jpg` without a body.
    """

    kind = "minimal"

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        return (loop_factory("auto") or asyncio.new_event_loop)()  # uvloop where installed, as the worker

    async def _listen(self) -> Any:
        assert self._loop is not None
        return await self._loop.create_server(lambda: _ImageProtocol(self), HOST, self.port)

    async def _close(self, handle: Any) -> None:
        handle.close()
        await handle.wait_closed()

    def respond(self, method: bytes, target: bytes) -> tuple[bytes, bytes]:
        """The status line's tail and the body for one request."""
        if method not in (b"GET", b"HEAD"):
            return b"405 Method Not Allowed", b""
        parts = target.split(b"?", 1)[0].split(b"/")
        if len(parts) != 3 or parts[0] or not parts[2].endswith(b".jpg"):
            return b"404 Not Found", b""
        body = self.image(parts[1].decode("ascii", "replace"), parts[2][:-4].decode("ascii", "replace"))
        return (b"404 Not Found", b"") if body is None else (b"200 OK", body)


class _ImageProtocol(asyncio.Protocol):
    """One connection to the ImageServer: requests parsed as they arrive, answered in order."""

    MAX_HEAD = 16 * 1024

    def __init__(self, server: MinimalImageServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is no subclass)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while not self.transport.is_closing():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > self.MAX_HEAD:
                    self._write(b"431 Request Header Fields Too Large", b"", close=True, head_only=False)
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            lines = head.split(b"\r\n")
            request = lines[0].split(b" ")
            if len(request) != 3 or not request[2].startswith(b"HTTP/1."):
                self._write(b"400 Bad Request", b"", close=True, head_only=False)
                return
            method, target, version = request
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip().lower()
            if headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers:
                self._write(b"400 Bad Request", b"", close=True, head_only=False)  # no GET here sends a body
                return
            connection = headers.get(b"connection", b"")
            old = version == b"HTTP/1.0"  # closes after each answer unless it asked to keep alive
            close = connection == b"close" or (old and connection != b"keep-alive")
            status, body = self.server.respond(method, target)
            self._write(status, body, close=close, head_only=method == b"HEAD", keep_alive=old and not close)

    def _write(self, status: bytes, body: bytes, close: bool, head_only: bool, keep_alive: bool = False) -> None:
        assert self.transport is not None
        kind = b"image/jpeg" if status == b"200 OK" else b"text/plain"
        connection = b"Connection: close\r\n" if close else b"Connection: keep-alive\r\n" if keep_alive else b""
        head = (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"
                % (status, kind, len(body), connection))
        self.transport.write(head if head_only else head + body)
        if close:
            self.transport.close()


IMAGE_SERVERS: dict[str, type[ImageServer]] = {cls.kind: cls for cls in (ImageServer, MinimalImageServer)}


# -- the stream -----------------------------------------------------------------------------


@dataclass
class Result:
    timestamp_ms: int
    status: str
    error_code: str | None


class ResultCollector:
    """Reads a results topic from its start in the background; keeps each (request_id, operation_id) once."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.results: dict[tuple[str, str], Result] = {}
        self.duplicates = 0
        self.timestamp_types: set[int] = set()
        self._per_phase: Counter[str] = Counter()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            self.topic, bootstrap_servers=self.bootstrap, group_id=None, auto_offset_reset="earliest",
            max_partition_fetch_bytes=16 * 2**20, fetch_max_bytes=64 * 2**20)
        await self._consumer.start()
        self._task = asyncio.create_task(self._read(), name="results")

    def count(self, phase: str) -> int:
        return self._per_phase[phase]

    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=10_000)
            for records in batches.values():
                for record in records:
                    result = orjson.loads(record.value)
                    key = (result["request_id"], result["operation_id"])
                    if key in self.results:
                        self.duplicates += 1
                        continue
                    self.timestamp_types.add(record.timestamp_type)
                    self.results[key] = Result(record.timestamp, result["status"], result.get("error_code"))
                    self._per_phase[phase_of(key[0])] += 1

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._consumer is not None:
            await self._consumer.stop()


def request_id(run_id: str, workload: str, phase: str, index: int) -> str:
    return f"{run_id}-{workload}-{phase}-{index:06d}"


def phase_of(rid: str) -> str:
    """'b' (backlog) or 'l' (light load), from request_id()."""
    return rid.rsplit("-", 2)[1]


def cpu_now(pids: dict[str, int | None]) -> dict[str, float | None]:
    """CPU seconds so far of each named process, and of the whole machine under "machine"."""
    # The worker's with its child processes: with --processes N, the supervisor's workers.
    return {**{name: cpu_seconds(pid, children=name == "worker") for name, pid in pids.items()},
            "machine": machine_busy_seconds()}


def cpu_since(start: dict[str, float | None], pids: dict[str, int | None]) -> dict[str, float | None]:
    """CPU seconds each process used since `start` (cpu_now), and "other": the rest of the machine's."""
    end = cpu_now(pids)
    used = {name: None if end[name] is None or start.get(name) is None else end[name] - start[name] for name in end}
    machine = used.pop("machine")
    # What else kept the cores busy meanwhile (other jobs on a shared machine): noise, not the stream's.
    if machine is not None:
        used["other"] = max(0.0, machine - sum(v for v in used.values() if v is not None))
    return used


class FirstConsume(threading.Thread):
    """Polls the worker's /metrics every 20 ms until it has consumed a request: t0, and CPU times then.

    With several worker processes (one port each), t0 is when the last of them consumed its first: from
    then on all of them work (the group's rebalances as each joined are over)."""

    def __init__(self, ports: list[int], pids: dict[str, int | None], halt: threading.Event) -> None:
        super().__init__(name="first-consume", daemon=True)
        self.ports = ports
        self.pids = pids
        self.halt = halt
        self.found = threading.Event()
        self.t0: float | None = None  # epoch seconds
        self.resolution_s: float | None = None  # since the last scrape that saw nothing; None: the first did
        self.cpu_at_t0: dict[str, float | None] = {}

    def run(self) -> None:
        previous: float | None = None
        while not self.halt.is_set():
            asked = time.time()
            snapshots = [scrape_metrics(port, timeout_s=1.0) for port in self.ports]
            if all(snapshot is not None for snapshot in snapshots):
                if all(snapshot.total("imgstream_requests_consumed_total") > 0 for snapshot in snapshots):
                    self.cpu_at_t0 = cpu_now(self.pids)
                    self.t0 = asked
                    self.resolution_s = None if previous is None else asked - previous
                    self.found.set()
                    return
                previous = asked
            self.halt.wait(METRICS_POLL_S)


class WorkerProfiler:
    """`py-spy record` attached to the worker from /readyz to the end of its backlog: where its CPU goes.

    Attached once the worker is ready (models loaded, broker reached), before its group join ends and
    it consumes, so the samples cover the backlog and not the imports or model loading; stopped
    (SIGINT, py-spy then writes its file) when the last backlog result arrived, before the light load.

    `--gil`: a sample is taken only of the thread holding the GIL, i.e. running Python. py-spy's other
    test of a busy thread (its state is R) also counts a thread that is runnable but waiting for a
    core: on 2 cores shared with the broker and the benchmark, a socket write that wakes its peer
    leaves the writer preempted in send(), and that test put a quarter of the loop's samples there,
    where `perf` (on-CPU samples only) found 2% of its CPU in the kernel's send path. The worker is
    paused for each sample (py-spy's default): exact stacks. `--nonblocking` reads them while it runs:
    on W4 a third of the reads then fail or come back torn, more often in frames that change fast,
    which moved a tenth of the loop's samples into the generic categories. `--threads
    --full-filenames`: each sample's thread and module paths, for scripts/profile_summary.py, which
    also reads each thread's own CPU seconds from the meta file (schedstat, read at start and stop)
    to turn samples into CPU time.
    """

    def __init__(self, directory: Path, workload: str, rate: int, fmt: str, nonblocking: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.rate = rate
        self.format = fmt
        self.nonblocking = nonblocking
        self.path = directory / f"{workload}.{'txt' if fmt == 'raw' else 'speedscope.json'}"
        self.log_path = directory / f"{workload}.py-spy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.threads_at_start: dict[int, tuple[float, float]] = {}
        self.threads: dict[int, dict[str, float]] = {}

    @staticmethod
    def executable() -> str:
        """py-spy next to this interpreter (the venv's), else on PATH."""
        beside = Path(sys.executable).parent / "py-spy"
        found = str(beside) if beside.exists() else shutil.which("py-spy")
        if found is None:
            raise RuntimeError("--profile-worker needs py-spy (pip install py-spy) and ptrace rights (root, or "
                               "kernel.yama.ptrace_scope=0)")
        return found

    def start(self, pid: int) -> None:
        command = [self.executable(), "record", "--pid", str(pid), "--rate", str(self.rate), "--format",
                   self.format, "--threads", "--full-filenames", "--gil", "--output", str(self.path)]
        if self.nonblocking:
            command.append("--nonblocking")
        self.pid = pid
        self.threads_at_start = thread_times(pid)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        log(f"py-spy attached to the worker (pid {pid}) at {self.rate} Hz: {self.path}")

    def stop(self) -> Path | None:
        """Stop sampling and wait for the file; None (with py-spy's log) if it wrote none."""
        if self.proc is None:
            return None
        end = thread_times(self.pid)
        start = self.threads_at_start
        # Each thread's own CPU and run-queue wait while sampled (threads started meanwhile from zero).
        self.threads = {tid: {"cpu_s": round(cpu - start.get(tid, (0.0, 0.0))[0], 4),
                              "runqueue_wait_s": round(wait - start.get(tid, (0.0, 0.0))[1], 4)}
                        for tid, (cpu, wait) in end.items()}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if not self.path.exists():
            log(f"py-spy wrote no profile; its log: {self.log_path.read_text(errors='replace')[-2000:]}")
            return None
        return self.path


def thread_times(pid: int) -> dict[int, tuple[float, float]]:
    """Per thread of `pid` (Linux): (seconds on a core, seconds runnable but waiting for one), from
    /proc/<pid>/task/<tid>/schedstat; empty where there is no such file."""
    out: dict[int, tuple[float, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                on_cpu, waiting, *_ = f.read().split()
        except (OSError, ValueError):
            continue
        out[int(tid)] = (int(on_cpu) / 1e9, int(waiting) / 1e9)
    return out


@dataclass
class StreamRun:
    """What one workload's stream phase measured (timestamps in epoch ms, from the broker's records)."""

    requests: int
    tasks: int
    t0_ms: float | None = None
    t0_resolution_ms: float | None = None
    end_ms: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    published_before_t0: int = 0
    results_received: int = 0
    results_ok: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    light_rate: float | None = None
    light_requests: int = 0
    light_latencies_ms: list[float] = field(default_factory=list)
    light_received: int = 0
    worker_exit_code: int | None = None
    startup_s: float | None = None
    cpu_s: dict[str, float | None] = field(default_factory=dict)
    mean_batch: dict[str, float] = field(default_factory=dict)
    mean_queue_wait_ms: dict[str, float] = field(default_factory=dict)
    mean_fetch_ms: float | None = None
    timestamp_types: list[int] = field(default_factory=list)
    error: str | None = None
    worker_log: str = ""
    worker_env: dict[str, str] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    processes: int = 1  # worker processes (--processes)
    after_t0: int = 0  # backlog results the broker stamped at or after t0

    @property
    def measured_requests(self) -> int:
        """The requests the window's rate counts: all of them with one worker process; with several, those
        answered from t0 on (before it, the first processes worked while the others still joined)."""
        return self.requests if self.processes == 1 else self.after_t0 // max(1, self.tasks)

    @property
    def results_expected(self) -> int:
        return self.requests * self.tasks

    @property
    def light_expected(self) -> int:
        return self.light_requests * self.tasks

    @property
    def window_s(self) -> float | None:
        if self.t0_ms is None or self.end_ms is None:
            return None
        return (self.end_ms - self.t0_ms) / 1000.0

    @property
    def images_per_s(self) -> float | None:
        window = self.window_s
        complete = self.results_received == self.results_expected
        return self.measured_requests / window if window and complete else None


@dataclass
class Context:
    args: argparse.Namespace
    profile: str
    bootstrap: str
    broker_pid: int | None
    workdir: Path
    run_id: str
    light_requests: int
    light_max_s: float
    otlp: Any = None  # the OTLP receiver traced workers export to (--tracing)


async def produce(producer: AIOKafkaProducer, topic: str, rid: str, image: dict[str, str],
                  tasks: list[dict[str, Any]]) -> tuple[asyncio.Future[Any], int]:
    """Send one request stamped with the current time (its CreateTime); the send future and the stamp."""
    value = orjson.dumps({"schema_version": 1, "request_id": rid, "image": image, "tasks": tasks})
    stamp = int(time.time() * 1000)
    return await producer.send(topic, value, key=rid.encode(), timestamp_ms=stamp), stamp


async def wait_for_results(collector: ResultCollector, phase: str, expected: int, worker: WorkerProcess,
                           timeout_s: float, label: str) -> bool:
    """Until `expected` distinct results of `phase` arrived: True; False at the deadline."""
    deadline = time.monotonic() + timeout_s
    last_report = time.monotonic()
    while collector.count(phase) < expected:
        code = worker.exited()
        if code is not None:
            raise WorkerFailed(f"the worker exited with status {code} during {label}; log ends:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            log(f"{label}: timed out after {timeout_s:.0f}s with {collector.count(phase)}/{expected} results")
            return False
        if time.monotonic() - last_report > 10:
            last_report = time.monotonic()
            log(f"{label}: {collector.count(phase)}/{expected} results")
        await asyncio.sleep(0.05)
    return True


async def run_stream(ctx: Context, workload: Workload, images: RequestImages, n: int,
                     traced: bool = False, processes: int = 1) -> StreamRun:
    """Backlog of n requests, a fresh worker from its first consume to the last result, then light load.

    `traced`: the worker runs with tracing on, exporting to `ctx.otlp`. `processes`: `imgstream worker
    --processes N`, measured from the moment every one of its processes has consumed."""
    args = ctx.args
    tasks = [dict(task) for task in workload.tasks]
    run = StreamRun(requests=n, tasks=len(tasks), processes=processes)
    topics = fresh_topics(f"bench-{workload.name.lower()}")
    await create_topics(ctx.bootstrap, topics, partitions=args.partitions)
    env = worker_env(
        bootstrap=ctx.bootstrap, topics=topics, group=f"bench-{ctx.run_id}-{workload.name}", device=args.device,
        preload=list(workload.models), blob_dir=ctx.workdir / "blobs", blob_roots=[str(ctx.workdir)],
        allow_private_addresses=True, max_in_flight=args.max_in_flight,
        max_in_flight_image_bytes=args.max_in_flight_image_bytes, batching=args.batching,
    )
    env = {k: v for k, v in env.items() if not k.startswith("OTEL_")}
    env.update(dict(setting.split("=", 1) for setting in args.worker_env))
    if traced:  # this process's OTEL_TRACES_SAMPLER(_ARG), if set, samples the traced run
        env.update({k: v for k, v in os.environ.items() if k.startswith("OTEL_TRACES_SAMPLER")})
        env.update({"IMGSTREAM_TRACING": "on", "OTEL_EXPORTER_OTLP_ENDPOINT": ctx.otlp.endpoint,
                    "OTEL_SERVICE_NAME": "imgstream-worker-bench"})
    suffix = ("-traced" if traced else "") + (f"-{processes}-processes" if processes > 1 else "")
    worker = WorkerProcess(env, free_ports(processes), ctx.workdir / f"worker-{workload.name}{suffix}.log",
                           processes=processes)
    run.worker_log = str(worker.log_path)
    run.worker_env = {k: v for k, v in env.items() if k.startswith("IMGSTREAM_") and "__TOPICS__" not in k}
    collector = ResultCollector(ctx.bootstrap, topics.results)
    await collector.start()
    published: dict[str, int] = {}
    halt = threading.Event()
    profiler: WorkerProfiler | None = None
    producer = AIOKafkaProducer(bootstrap_servers=ctx.bootstrap, acks="all", linger_ms=20)
    await producer.start()
    try:
        started = time.monotonic()
        pending = []
        for i in range(n):
            rid = request_id(ctx.run_id, workload.name, "b", i)
            future, published[rid] = await produce(producer, topics.requests, rid, images.ref(i), tasks)
            pending.append(future)
        await asyncio.gather(*pending)
        log(f"{workload.name}: {n} requests produced in {time.monotonic() - started:.1f}s; starting the worker "
            f"(models {list(workload.models)}, log {worker.log_path})")

        worker.start()
        watch = FirstConsume(worker.http_ports, {"worker": worker.pid, "broker": ctx.broker_pid,
                                                "bench": os.getpid()}, halt)
        watch.start()
        launched = time.monotonic()
        if args.profile_worker is not None and processes == 1:
            profiler = WorkerProfiler(args.profile_worker, workload.name, args.profile_rate, args.profile_format,
                                      args.profile_nonblocking)
            await asyncio.to_thread(_wait_until, worker.ready, worker, args.startup_timeout)
            assert worker.pid is not None
            profiler.start(worker.pid)
        await asyncio.to_thread(worker.wait_ready, args.startup_timeout)
        run.startup_s = time.monotonic() - launched
        while not watch.found.is_set():
            if worker.exited() is not None:
                raise WorkerFailed(f"the worker exited with status {worker.exited()}; log ends:\n{worker.log_tail()}")
            await asyncio.sleep(0.02)
        assert watch.t0 is not None
        run.t0_ms = watch.t0 * 1000.0
        run.t0_resolution_ms = None if watch.resolution_s is None else watch.resolution_s * 1000.0
        log(f"{workload.name}: worker ready in {run.startup_s:.1f}s; consuming the backlog")

        complete = await wait_for_results(collector, "b", run.results_expected, worker, args.timeout,
                                          f"{workload.name} backlog")
        run.cpu_s = cpu_since(watch.cpu_at_t0, watch.pids)
        if profiler is not None:
            path = await asyncio.to_thread(profiler.stop)
            run.profile = {"path": str(path) if path else None, "rate_hz": profiler.rate,
                           "format": profiler.format, "nonblocking": profiler.nonblocking, "requests": n,
                           "pid": profiler.pid,
                           "threads": profiler.threads,
                           "worker_cpu_s": run.cpu_s.get("worker"), "other_cpu_s": run.cpu_s.get("other")}
        read_batch_metrics(run, worker.http_port)
        if complete:
            await light_load(ctx, run, workload, images, producer, topics.requests, tasks, published, collector,
                             worker)
        run.worker_exit_code = await asyncio.to_thread(worker.stop)
        if run.worker_exit_code != 0:
            log(f"{workload.name}: the worker exited with status {run.worker_exit_code}; log ends:\n"
                f"{worker.log_tail()}")
    except WorkerFailed as exc:
        run.error = str(exc)
        run.worker_exit_code = worker.exited()
        log(f"{workload.name}: {exc}")
    finally:
        halt.set()
        if profiler is not None:
            profiler.stop()
        worker.kill()
        await producer.stop()
        await collector.stop()
    tally(run, workload, collector, published)
    if run.profile is not None and run.profile["path"]:
        # The profile's own numbers beside it, for scripts/profile_summary.py (per request, CPU check).
        window = run.window_s
        meta = {**run.profile, "workload": workload.name, "window_s": window,
                "requests_per_s": run.images_per_s, "results_received": run.results_received,
                "command": " ".join(sys.argv)}
        Path(run.profile["path"]).with_suffix(".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        run.profile = meta
    return run


def _wait_until(ready: Any, worker: WorkerProcess, timeout_s: float) -> None:
    """Block until `ready()`; WorkerFailed if the worker exits or the time runs out first."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if worker.exited() is not None:
            raise WorkerFailed(f"the worker exited with status {worker.exited()}; log ends:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise WorkerFailed(f"the worker was not ready within {timeout_s:.0f}s; log ends:\n{worker.log_tail()}")
        time.sleep(0.02)


async def light_load(ctx: Context, run: StreamRun, workload: Workload, images: RequestImages,
                     producer: AIOKafkaProducer, topic: str, tasks: list[dict[str, Any]], published: dict[str, int],
                     collector: ResultCollector, worker: WorkerProcess) -> None:
    """Requests at a fixed slow rate (at most a quarter of the backlog's), so the worker is never saturated."""
    backlog_end_ms = max(r.timestamp_ms for r in collector.results.values())
    assert run.t0_ms is not None
    throughput = run.requests / max((backlog_end_ms - run.t0_ms) / 1000.0, 1e-3)
    rate = min(ctx.args.light_rate, 0.25 * throughput)
    count = min(ctx.light_requests, 1 + math.floor(rate * ctx.light_max_s))
    run.light_rate, run.light_requests = rate, count
    log(f"{workload.name}: light load, {count} requests at {rate:.3g}/s")
    started = time.monotonic()
    pending = []
    for k in range(count):
        await asyncio.sleep(max(0.0, started + k / rate - time.monotonic()))
        rid = request_id(ctx.run_id, workload.name, "l", k)
        future, published[rid] = await produce(producer, topic, rid, images.ref(run.requests + k), tasks)
        # Flushed at once: the linger would add to every light-load latency.
        await producer.flush()
        pending.append(future)
    await asyncio.gather(*pending)
    await wait_for_results(collector, "l", count * len(tasks), worker, ctx.args.timeout, f"{workload.name} light load")


def read_batch_metrics(run: StreamRun, port: int) -> None:
    """Mean batch size and queue wait per model, mean fetch time: the worker's /metrics after the backlog."""
    snapshot = scrape_metrics(port)
    if snapshot is None:
        return
    items = snapshot.by_label("imgstream_model_items_total", "model")
    batches = snapshot.by_label("imgstream_model_batches_total", "model")
    waits = snapshot.by_label("imgstream_model_queue_wait_ms_total", "model")
    run.mean_batch = {m: items[m] / batches[m] for m in items if batches.get(m)}
    run.mean_queue_wait_ms = {m: waits.get(m, 0.0) / items[m] for m in items if items[m]}
    fetch_sum = snapshot.value("imgstream_fetch_latency_ms_sum", outcome="ok")
    fetch_count = snapshot.value("imgstream_fetch_latency_ms_count", outcome="ok")
    if fetch_sum is not None and fetch_count:
        run.mean_fetch_ms = fetch_sum / fetch_count


def tally(run: StreamRun, workload: Workload, collector: ResultCollector, published: dict[str, int]) -> None:
    """Latencies, statuses and counts from the collected results."""
    statuses: Counter[str] = Counter()
    end = None
    for (rid, _), result in collector.results.items():
        sent = published.get(rid)
        if sent is None:
            continue
        if phase_of(rid) == "l":
            run.light_received += 1
            run.light_latencies_ms.append(result.timestamp_ms - sent)
            continue
        run.results_received += 1
        statuses[result.status if result.error_code is None else f"{result.status}:{result.error_code}"] += 1
        run.results_ok += workload.ok(result.status, result.error_code)
        end = result.timestamp_ms if end is None else max(end, result.timestamp_ms)
        if run.t0_ms is not None:
            run.latencies_ms.append(result.timestamp_ms - max(sent, run.t0_ms))
            run.after_t0 += result.timestamp_ms >= run.t0_ms
    run.end_ms = end
    if run.t0_ms is not None:
        run.published_before_t0 = sum(1 for rid, sent in published.items() if phase_of(rid) == "b" and sent < run.t0_ms)
    run.statuses = dict(statuses)
    run.duplicates = collector.duplicates
    run.timestamp_types = sorted(collector.timestamp_types)


# == model-only limit =======================================================================
# Everything here that touches the models goes through their interface (analysis/models/*.py):
# load_model(key, ModelsConfig, device) -> model with preprocess(pil) -> item (a uint8 image
# tensor), collate(items) -> batch (resized, cropped, normalised on the device) and
# forward(batch) -> outputs. Decoding and collate happen outside the timed region; only
# forward is timed, at each swept batch size: pre-decoded, pre-resized tensors.


@dataclass
class Part:
    """One model call an image needs: its preprocessed items and how many of them per image."""

    label: str
    model: str
    items: list[Any]
    per_image: float


def _prominent_box(detections: list[Any], min_score: float) -> list[float] | None:
    """The box of the first (best) detection at or above `min_score` (run_batch sorts them)."""
    for detection in detections:
        if detection.score >= min_score:
            return list(detection.box)
    return None


def _crop(image: Any, box: list[float]) -> Any:
    return image.crop(tuple(int(round(v)) for v in box))


def model_only_parts(workload: Workload, models: dict[str, Any], images: list[Any]) -> list[Part]:
    """The model calls behind one request of `workload`, with items made from `images`."""
    if workload.name == "W1":
        return [Part("clip: whole image", "clip", [models["clip"].preprocess(im) for im in images], 1.0)]
    if workload.name == "W3":
        caption = models["caption"]
        return [Part("caption", "caption", [(caption.preprocess(im), CAPTION_TOKENS) for im in images], 1.0)]
    if workload.name == "W5":
        return [Part("face: whole image", "face", [models["face"].preprocess(im) for im in images], 1.0)]
    if workload.name == "W2":
        clip, person, face = models["clip"], models["person"], models["face"]
        person_items = [person.preprocess(im) for im in images]
        # The regions the stream would search and crop, found once outside the timed region.
        regions = []
        for image, detections in zip(images, person.run_batch(person_items)):
            box = _prominent_box(detections, PERSON_MIN_SCORE)
            regions.append(image if box is None else _crop(image, box))
        face_items = [face.preprocess(region) for region in regions]
        face_crops = []
        for region, faces in zip(regions, face.run_batch(face_items)):
            found = _prominent_box(faces, FACE_MIN_SCORE)
            if found is not None:
                face_crops.append(_crop(region, found))
        parts = [
            Part("clip: whole image", "clip", [clip.preprocess(im) for im in images], 1.0),
            Part("person: whole image", "person", person_items, 1.0),
            Part("face: person context", "face", face_items, 1.0),
        ]
        if face_crops:
            # Only images with a face get the CLIP of the face (the others are `skipped`).
            parts.append(Part("clip: face crop", "clip", [clip.preprocess(c) for c in face_crops],
                              len(face_crops) / len(images)))
        return parts
    raise ValueError(f"{workload.name} has no model-only entry")


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sweep_batch_sizes(model: Any, items: list[Any], sizes: tuple[int, ...], min_s: float,
                      device: Any) -> dict[int, float]:
    """Items/s of forward at each batch size, each timed >= min_s. The batches (collated untimed)
    take the items in turn, so every size sees the whole mix of photos: a detector's cost
    follows each photo's size, and a batch of one must not time the first photo only."""
    rates: dict[int, float] = {}
    for index, size in enumerate(sizes):
        count = -(-len(items) // size)  # enough batches to hold every item once
        batches = [model.collate([items[(b * size + i) % len(items)] for i in range(size)]) for b in range(count)]
        _synchronize(device)
        # A warm-up call per size on CUDA (new shapes); on the CPU one at the first size, which is
        # also counted when it alone takes min_s (a slow model gains nothing from a second call).
        calls, elapsed = 0, 0.0
        if device.type == "cuda" or index == 0:
            started = time.perf_counter()
            model.forward(batches[0])
            _synchronize(device)
            warm = time.perf_counter() - started
            if device.type == "cpu" and warm >= min_s:
                calls, elapsed = 1, warm
        while calls < count or elapsed < min_s:  # every batch at least once
            started = time.perf_counter()
            model.forward(batches[calls % count])
            _synchronize(device)
            elapsed += time.perf_counter() - started
            calls += 1
        rates[size] = size * calls / elapsed
    return rates


def measure_model_only(workload: Workload, models: dict[str, Any], images: list[Any], profile: str,
                       device: Any) -> dict[str, Any]:
    """images/s = 1 / sum over parts of per_image / best items/s (W2 runs several models per image)."""
    parts = model_only_parts(workload, models, images)
    seconds_per_image = 0.0
    out = []
    for part in parts:
        rates = sweep_batch_sizes(models[part.model], part.items, SWEEPS[profile][part.model],
                                  MIN_TIMED_S[profile], device)
        best = max(rates, key=lambda size: rates[size])
        seconds_per_image += part.per_image / rates[best]
        out.append({"part": part.label, "model": part.model, "per_image": round(part.per_image, 3),
                    "batch_size": best, "items_per_s": round(rates[best], 2),
                    "sweep": {str(size): round(rate, 2) for size, rate in rates.items()}})
        log(f"{workload.name} model-only {part.label}: " + ", ".join(
            f"batch {size} {rate:.1f}/s" for size, rate in rates.items()))
    batch_size: Any = out[0]["batch_size"] if len(out) == 1 else {p["part"]: p["batch_size"] for p in out}
    return {"images_per_s": round(1.0 / seconds_per_image, 2), "batch_size": batch_size, "parts": out}


# == seed-style pipeline ====================================================================
# One request at a time, the way the per-request HTTP service worked (shared/docs/reference/
# seed-behaviour.md §§1-3, 6-7): fetch, PIL decode (no EXIF step), each task at batch size 1
# in sequence with the stock library calls, detections reused within the request, crops
# PNG-encoded to base64, the response serialised with the stdlib json module as FastAPI does.
#
# -- adapter: the library modules inside the engine's loaded models. These attribute names
# -- (_transform, _model, _mtcnn, _processor, _tokenizer, dtype, device) are those of
# -- analysis/models/*.py; keep every access to them in this block.


def seed_clip(clip: Any, image: Any) -> list[float]:
    """open_clip's eval transform, then encode_image on a batch of one."""
    import torch

    pixels = clip._transform(image).unsqueeze(0).to(clip.device, dtype=clip.dtype)
    with torch.no_grad():
        return clip._model.encode_image(pixels)[0].float().cpu().numpy().tolist()


def seed_person_box(person: Any, image: Any) -> list[int] | None:
    """torchvision Faster R-CNN on the full-size image (it resizes internally); the best person box."""
    import torch
    from torchvision.transforms.functional import to_tensor

    with torch.no_grad():
        output = stock_person(person)([to_tensor(image).to(person.device)])[0]
    keep = (output["labels"] == 1) & (output["scores"] >= PERSON_MIN_SCORE)
    if not bool(keep.any()):
        return None
    best = int(output["scores"][keep].argmax())
    x0, y0, x1, y1 = output["boxes"][keep][best].cpu().numpy().astype(int).tolist()
    width, height = image.size
    return [max(0, min(x0, width)), max(0, min(y0, height)), max(0, min(x1, width)), max(0, min(y1, height))]


_STOCK_PERSON: dict[str, Any] = {}


def stock_person(person: Any) -> Any:
    """torchvision's Faster R-CNN as the seed ran it: the engine's weights and score threshold in
    torchvision's default layout (the engine runs its backbone channels-last)."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    key = str(person.device)
    if key not in _STOCK_PERSON:
        model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                        box_score_thresh=person._model.roi_heads.score_thresh)
        model.load_state_dict(person._model.state_dict())
        _STOCK_PERSON[key] = model.to(person.device).eval()
    return _STOCK_PERSON[key]


_STOCK_MTCNN: dict[str, Any] = {}


def stock_mtcnn(device: Any) -> Any:
    """facenet-pytorch's MTCNN as the seed used it (the engine's own runs its nets channels-last)."""
    from facenet_pytorch import MTCNN

    key = str(device)
    if key not in _STOCK_MTCNN:
        _STOCK_MTCNN[key] = MTCNN(keep_all=True, device=device).eval()
    return _STOCK_MTCNN[key]


def seed_face_box(face: Any, image: Any, region: list[int] | None) -> list[int] | None:
    """facenet-pytorch MTCNN.detect on the region (or the whole image); the most probable face, offset back."""
    import numpy as np

    searched = image.crop(tuple(region)) if region is not None else image
    boxes, probs = stock_mtcnn(face.device).detect(searched)
    if boxes is None or len(boxes) == 0:
        return None
    probs = np.asarray(probs, dtype=float)  # object arrays with numpy 2
    best = int(probs.argmax())
    if probs[best] < FACE_MIN_SCORE:
        return None
    dx, dy = (region[0], region[1]) if region is not None else (0, 0)
    x0, y0, x1, y1 = (float(v) for v in boxes[best])
    width, height = image.size
    return [max(0, min(int(x0) + dx, width)), max(0, min(int(y0) + dy, height)),
            max(0, min(int(x1) + dx, width)), max(0, min(int(y1) + dy, height))]


def seed_caption(caption: Any, image: Any, max_new_tokens: int) -> str:
    """The Hugging Face processor, generate on a batch of one, decode."""
    import torch

    pixels = caption._processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        tokens = caption._model.generate(pixel_values=pixels.to(caption.device, dtype=caption.dtype),
                                         max_new_tokens=max_new_tokens)
    return caption._tokenizer.decode(tokens[0], skip_special_tokens=True)


# -- end of the adapter


def seed_fetch(image: dict[str, str]) -> tuple[bytes, str]:
    """The image bytes and where they came from: a file read, or a blocking GET as the seed did it."""
    import requests

    if "blob" in image:
        path = urllib.request.url2pathname(urllib.parse.urlparse(image["blob"]).path)
        return Path(path).read_bytes(), image["blob"]
    response = requests.get(image["url"], stream=True, timeout=10, headers={"User-Agent": "ImageAnalysisAPI/0.2.1"})
    response.raise_for_status()
    return response.content, image["url"]


def _operation_result(status: str = "success", data: Any = None, bbox: list[int] | None = None,
                      crop_base64: str | None = None, error_message: str | None = None) -> dict[str, Any]:
    return {"status": status, "data": data, "cropped_image_bbox": bbox, "cropped_image_base64": crop_base64,
            "error_message": error_message}


def _png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("utf-8")


def seed_task(task: dict[str, Any], image: Any, models: dict[str, Any], shared: dict[Any, Any]) -> dict[str, Any]:
    """One task as the seed ran it; `shared` reuses the person and face detections within the request."""
    params = task.get("params") or {}
    target = params.get("target")

    def person() -> list[int] | None:
        if "person" not in shared:
            shared["person"] = seed_person_box(models["person"], image)
        return shared["person"]

    def face(context: str) -> list[int] | None:
        if ("face", context) not in shared:
            region = person() if context == "prominent_person" else None
            shared[("face", context)] = seed_face_box(models["face"], image, region)
        return shared[("face", context)]

    kind = task["type"]
    if kind == "detect_bounding_box":
        box = person() if target == "prominent_person" else face(params.get("face_context", "prominent_person"))
        return _operation_result(data=box)
    if kind == "embed_clip_vit_b_32":
        if target in (None, "whole_image"):
            return _operation_result(data=seed_clip(models["clip"], image))
        box = face(params.get("face_context", "prominent_person")) if target == "prominent_face" else person()
        if box is None:
            if target == "prominent_face":
                return _operation_result(
                    "skipped", error_message=f"No prominent face found for operation '{task['operation_id']}'.")
            return _operation_result(data=seed_clip(models["clip"], image))
        crop = image.crop(tuple(box))
        return _operation_result(data=seed_clip(models["clip"], crop), bbox=box, crop_base64=_png_base64(crop))
    if kind == "describe_image":
        return _operation_result(data=seed_caption(models["caption"], image, int(params.get("max_length", 50))))
    return _operation_result("skipped", error_message=f"Unsupported operation type: '{kind}'")


def seed_request(workload: Workload, models: dict[str, Any], image_ref: dict[str, str]) -> str:
    """Fetch, decode, every task in order, the JSON response body."""
    from PIL import Image

    data, location = seed_fetch(image_ref)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    shared: dict[Any, Any] = {}
    results = {task["operation_id"]: seed_task(task, image, models, shared) for task in workload.tasks}
    # What FastAPI's JSONResponse renders.
    return json.dumps({"image_url": location, "results": results}, ensure_ascii=False, allow_nan=False,
                      indent=None, separators=(",", ":"))


@dataclass
class SeedTimes:
    """Per-request wall times (ms) of seed-style requests, and the seconds the loops took."""

    per_request_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    warmup_requests: int = 0


def seed_style_half(workload: Workload, models: dict[str, Any], images: RequestImages, first: int, m: int,
                    device: Any, times: SeedTimes, warmup: bool) -> None:
    """Requests `first`..`first + m` one after another into `times` (after M // 10 unmeasured ones if `warmup`)."""
    if warmup:
        times.warmup_requests = max(1, m // 10)
        for i in range(times.warmup_requests):
            seed_request(workload, models, images.ref(first + m + i))
        _synchronize(device)
    started = time.perf_counter()
    for i in range(first, first + m):
        began = time.perf_counter()
        seed_request(workload, models, images.ref(i))
        _synchronize(device)
        times.per_request_ms.append((time.perf_counter() - began) * 1000.0)
    times.elapsed_s += time.perf_counter() - started


def seed_style_summary(times: SeedTimes) -> dict[str, Any]:
    m = len(times.per_request_ms)
    return {"images_per_s": round(m / times.elapsed_s, 2), "requests": m, "warmup_requests": times.warmup_requests,
            "p50_ms": _round(percentile(times.per_request_ms, 50), 1),
            "p99_ms": _round(percentile(times.per_request_ms, 99), 1)}


# -- summaries ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def stream_summary(run: StreamRun) -> dict[str, Any]:
    """The stream's figures, under the keys other tools read (plus the profiler evidence)."""
    window = run.window_s
    images = run.measured_requests if run.results_received == run.results_expected else None
    cpu = {name: _round(seconds) for name, seconds in run.cpu_s.items()}
    return {
        "images_per_s": _round(run.images_per_s),
        "p50_ms": _round(percentile(run.latencies_ms, 50), 1),
        "p95_ms": _round(percentile(run.latencies_ms, 95), 1),
        "p99_ms": _round(percentile(run.latencies_ms, 99), 1),
        "light_p50_ms": _round(percentile(run.light_latencies_ms, 50), 1),
        "light_p99_ms": _round(percentile(run.light_latencies_ms, 99), 1),
        "results_ok": run.results_ok,
        "results_expected": run.results_expected,
        "results_received": run.results_received,
        "statuses": run.statuses,
        "duplicates": run.duplicates,
        "requests": run.requests,
        "tasks_per_request": run.tasks,
        "processes": run.processes,
        "requests_in_window": run.measured_requests,
        "window_s": _round(window, 3),
        "t0_resolution_ms": _round(run.t0_resolution_ms, 1),
        "latency_from_t0_requests": run.published_before_t0,
        "light_rate_per_s": _round(run.light_rate, 3),
        "light_requests": run.light_requests,
        "light_results": run.light_received,
        "light_results_expected": run.light_expected,
        "cpu_s": cpu,
        "cpu_ms_per_image": {name: (None if s is None or not images else round(1000.0 * s / images, 2))
                             for name, s in run.cpu_s.items()},
        "mean_batch": {m: round(v, 2) for m, v in run.mean_batch.items()},
        "mean_queue_wait_ms": {m: round(v, 1) for m, v in run.mean_queue_wait_ms.items()},
        "mean_fetch_ms": _round(run.mean_fetch_ms, 2),
        "worker_startup_s": _round(run.startup_s, 1),
        "worker_exit_code": run.worker_exit_code,
        "timestamp_types": run.timestamp_types,
        "error": run.error,
        "worker_log": run.worker_log,
        "worker_env": run.worker_env,
        "profile": run.profile,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


def workload_summary(workload: Workload, stream: dict[str, Any], seed: dict[str, Any] | None,
                     model_only: dict[str, Any] | None, traced: dict[str, Any] | None = None,
                     multi: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"title": workload.title, "stream": stream,
                           "seed_style": seed or {"images_per_s": None}}
    if traced is not None:  # --tracing: the same stream with tracing on, and its throughput over the untraced one
        out["traced"] = traced
        out["traced_over_untraced"] = _ratio(traced["images_per_s"], stream["images_per_s"])
    if multi is not None:  # --processes N: the same stream on N worker processes, over the one-process figure
        out["processes"] = multi
        out["processes_over_one"] = _ratio(multi["images_per_s"], stream["images_per_s"])
    if workload.model_only:
        out["model_only"] = model_only or {"images_per_s": None, "batch_size": None}
    out["stream_over_seed"] = _ratio(stream["images_per_s"], out["seed_style"]["images_per_s"])
    if workload.model_only:
        out["stream_over_model_only"] = _ratio(stream["images_per_s"], out["model_only"]["images_per_s"])
    return out


def failures(report: dict[str, Any]) -> list[str]:
    """Why the run failed: lost results (backlog or light load), a worker that did not exit 0."""
    out = []
    for name, workload in report["workloads"].items():
        for variant in ("traced", "processes"):
            run = workload.get(variant)
            if run and (run["results_received"] < run["results_expected"] or run["worker_exit_code"] != 0):
                out.append(f"{name} {variant}: {run['results_received']}/{run['results_expected']} results, "
                           f"worker exit status {run['worker_exit_code']}")
        stream = workload["stream"]
        if stream["results_received"] < stream["results_expected"]:
            out.append(f"{name}: {stream['results_received']}/{stream['results_expected']} backlog results")
        if stream["light_results"] < stream["light_results_expected"]:
            out.append(f"{name}: {stream['light_results']}/{stream['light_results_expected']} light-load results")
        if stream["worker_exit_code"] != 0:
            out.append(f"{name}: worker exit status {stream['worker_exit_code']}"
                       + (f" ({stream['error'].splitlines()[0]})" if stream["error"] else ""))
    return out


def _worker_cpu(run: dict[str, Any]) -> str:
    return _fmt(run["cpu_ms_per_image"].get("worker"), ".2f")


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _columns(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths)),
             "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """The machine, the settings, the three-way table and the profiler evidence, as text."""
    m, s = report["machine"], report["settings"]
    out = [
        f"machine: {m['cpu_model']}, {m['cpu_count']} cores, {m['memory_gib']} GiB; load average "
        f"{m['loadavg_start']} at start, {m.get('loadavg_end')} at end",
        f"device: {m['device']} ({m['device_name']}); torch {m['torch']} ({m['torch_threads']} threads in this "
        f"process); Python {m['python']}" + (f"; CUDA {m['cuda']}" if m.get("cuda") else ""),
        "settings: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in s.items() if k not in ("requests",
                                                                                          "seed_requests")),
        "requests per workload (stream N / seed-style M): " + ", ".join(
            f"{w} {s['requests'][w]}/{s['seed_requests'][w]}" for w in s["requests"]),
        "",
    ]
    rows = []
    for name, w in report["workloads"].items():
        st = w["stream"]
        rows.append((
            name, _fmt(st["images_per_s"]), _fmt(st["p50_ms"], ".0f"), _fmt(st["p95_ms"], ".0f"),
            _fmt(st["p99_ms"], ".0f"), f"{_fmt(st['light_p50_ms'], '.0f')}/{_fmt(st['light_p99_ms'], '.0f')}",
            f"{st['results_ok']}/{st['results_expected']}"
            + (f" ({st['results_expected'] - st['results_received']} lost)"
               if st["results_received"] < st["results_expected"] else ""),
            _fmt(w["seed_style"]["images_per_s"]),
            _fmt(w["model_only"]["images_per_s"]) if "model_only" in w else "n/a",
            _fmt(w["stream_over_seed"], ".2f", "x"),
            _fmt(w.get("stream_over_model_only"), ".2f", "x") if "model_only" in w else "n/a",
        ))
    out.append(_columns(("workload", "stream img/s", "p50 ms", "p95 ms", "p99 ms", "light p50/p99 ms",
                         "results ok/expected", "seed-style img/s", "model-only img/s", "stream/seed",
                         "stream/model-only"), rows))
    out += ["", "Backlog latencies are measured from the worker's first consume (t0) for the requests published "
            "before it (all of the pre-produced backlog); light-load latencies from each request's publish. "
            "ok = status success (W4: skipped unsupported_operation); the statuses column below lists every "
            "result received."]
    rows = []
    for name, w in report["workloads"].items():
        st = w["stream"]
        cpu = st["cpu_s"]
        others = (cpu.get("other"), (w.get("model_only") or {}).get("other_cpu_s"), w["seed_style"].get("other_cpu_s"))
        rows.append((
            name, _fmt(st["window_s"], ".1f"),
            " / ".join(_fmt(cpu.get(k), ".1f") for k in ("worker", "broker", "bench")),
            " / ".join(_fmt(v, ".1f") for v in others),
            " / ".join(_fmt(st["cpu_ms_per_image"].get(k), ".1f") for k in ("worker", "broker", "bench")),
            " ".join(f"{k} {v:.1f}" for k, v in st["mean_batch"].items()) or "-",
            " ".join(f"{k} {v:.0f}" for k, v in st["mean_queue_wait_ms"].items()) or "-",
            _fmt(st["mean_fetch_ms"], ".1f"), _fmt(st["worker_startup_s"], ".1f"),
            " ".join(f"{k} {v}" for k, v in sorted(st["statuses"].items())) or "-",
            f"{st['light_requests']} at {_fmt(st['light_rate_per_s'], '.3g')}/s",
        ))
    out += ["", _columns(("workload", "window s", "CPU s worker/broker/bench",
                          "other jobs' CPU s stream/model-only/seed", "CPU ms/img worker/broker/bench",
                          "mean batch", "queue wait ms", "fetch ms", "worker start s", "statuses", "light load"),
                         rows)]
    for name, w in report["workloads"].items():
        parts = (w.get("model_only") or {}).get("parts") or []
        if len(parts) > 1:
            out.append(f"{name} model-only parts: " + "; ".join(
                f"{p['part']} x{p['per_image']} at batch {p['batch_size']}: {p['items_per_s']:.1f}/s" for p in parts))
    for name, w in report["workloads"].items():
        st = w["stream"]
        if "traced" in w:
            tr = w["traced"]
            out.append(f"{name} tracing on: {_fmt(tr['images_per_s'])} img/s (untraced {_fmt(st['images_per_s'])}; "
                       f"traced/untraced {_fmt(w['traced_over_untraced'], '.2f', 'x')}), p50 "
                       f"{_fmt(tr['p50_ms'], '.0f')} ms (untraced {_fmt(st['p50_ms'], '.0f')}), worker CPU ms/img "
                       f"{_worker_cpu(tr)} (untraced {_worker_cpu(st)}), {tr.get('spans_exported')} spans exported")
        if "processes" in w:
            mp = w["processes"]
            out.append(f"{name} on {mp['processes']} worker processes: {_fmt(mp['images_per_s'])} img/s (one process "
                       f"{_fmt(st['images_per_s'])}; {_fmt(w['processes_over_one'], '.2f', 'x')}), counted over the "
                       f"{mp['requests_in_window']} requests answered once every process consumed, worker CPU ms/img "
                       f"{_worker_cpu(mp)} (one process {_worker_cpu(st)}), light p50 "
                       f"{_fmt(mp['light_p50_ms'], '.0f')} ms")
    out += ["", "CPU s are user+system seconds during the backlog window (t0 to the last result); other jobs' CPU s "
            "is what the rest of the machine used meanwhile (during each baseline for the last two): well above "
            "zero means the figures are disturbed."]
    return "\n".join(out)


# -- the run --------------------------------------------------------------------------------


class OtherCpu:
    """CPU seconds other processes used while a block ran in this one: the noise of a shared machine."""

    def __enter__(self) -> OtherCpu:
        self._busy, self._own = machine_busy_seconds(), cpu_seconds(os.getpid()) or 0.0
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        own = (cpu_seconds(os.getpid()) or 0.0) - self._own
        self.seconds = round(max(0.0, machine_busy_seconds() - self._busy - own), 2)


def load_models(keys: tuple[str, ...], models: dict[str, Any], device: Any) -> None:
    """Load (once per run) the engine's models this process needs for the baselines."""
    from imgstream.analysis.models import load_model
    from imgstream.schemas.config import ModelsConfig

    config = ModelsConfig(weights="random", device=str(device))
    for key in keys:
        if key not in models:
            started = time.perf_counter()
            models[key] = load_model(key, config, device)
            log(f"model {key} loaded in this process in {time.perf_counter() - started:.1f}s")


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from imgstream.analysis.models import select_device
    from imgstream.schemas.config import ModelsConfig

    device = select_device(ModelsConfig(device=args.device))
    profile = ("cuda" if device.type == "cuda" else "cpu") + ("-quick" if args.quick else "")
    machine = machine_info(device)
    workloads = [WORKLOADS[name] for name in args.workloads]
    sizes = {w.name: args.requests or w.requests[profile] for w in workloads}
    seed_sizes = {w.name: args.seed_requests or w.seed_requests[profile] for w in workloads}
    light_requests = args.light_requests or (6 if args.quick else 20)
    light_max_s = args.light_max_s or (5.0 if args.quick else 40.0)
    log(f"device {device} ({machine['device_name']}), torch {machine['torch']}, {machine['cpu_count']} CPUs, "
        f"profile {profile}, workloads {', '.join(args.workloads)}")
    workdir = Path(tempfile.mkdtemp(prefix="imgstream-bench-stream-"))
    embedded = None
    server = None
    ctx: Context | None = None
    report_workloads: dict[str, Any] = {}
    try:
        bootstrap = args.bootstrap
        if bootstrap is None:
            embedded = EmbeddedBroker().start()
            bootstrap = embedded.bootstrap
        ctx = Context(args=args, profile=profile, bootstrap=bootstrap,
                      broker_pid=embedded_broker_pid() if embedded is not None else None, workdir=workdir,
                      run_id=uuid.uuid4().hex[:8], light_requests=light_requests, light_max_s=light_max_s)
        server = ImageServer.of_kind(args.image_server).start()
        if args.tracing:
            from otlp_receiver import OtlpReceiver  # needs the otel extra (opentelemetry-proto)

            ctx.otlp = OtlpReceiver().start()
        bank = ImageBank(STREAM_PHOTOS)
        models: dict[str, Any] = {}
        for workload in workloads:
            size = workload.image_size or args.image_size
            images = RequestImages(workload.name, bank.jpegs(size), workdir / "images" / workload.name, server,
                                   ctx.run_id)
            server.sets[workload.name] = images
            log(f"{workload.name}: {workload.title}; {sizes[workload.name]} requests, {len(STREAM_PHOTOS)} photos "
                f"at {size} px")
            # The baselines run in this process while no worker runs. The seed-style pipeline runs half
            # its requests before the stream and half after, so a machine that drifts (these are shared)
            # weighs on both sides of the ratio alike.
            load_models(workload.models, models, device)
            m = seed_sizes[workload.name]
            seed_times = SeedTimes()
            with OtherCpu() as seed_other:
                seed_style_half(workload, models, images, 0, m // 2, device, seed_times, warmup=True)
            run = await run_stream(ctx, workload, images, sizes[workload.name])
            stream = stream_summary(run)
            log(f"{workload.name} stream: {_fmt(stream['images_per_s'], '.2f')} img/s, p50 "
                f"{_fmt(stream['p50_ms'], '.0f')} ms, {stream['results_received']}/{stream['results_expected']} "
                f"results ({stream['results_ok']} ok)")
            model_only = None
            if workload.model_only:
                # The photos the stream's requests used (all of them unless N is smaller).
                photos_used = bank.decoded(size)[:sizes[workload.name]]
                with OtherCpu() as other:
                    model_only = measure_model_only(workload, models, photos_used, profile, device)
                model_only["other_cpu_s"] = other.seconds
                log(f"{workload.name} model-only: {model_only['images_per_s']:.2f} img/s")
            with OtherCpu() as other:
                seed_style_half(workload, models, images, m // 2, m - m // 2, device, seed_times, warmup=False)
            seed = seed_style_summary(seed_times)
            seed["other_cpu_s"] = round(seed_other.seconds + other.seconds, 2)
            log(f"{workload.name} seed-style: {seed['images_per_s']:.2f} img/s over {seed['requests']} requests")
            traced = None
            if args.tracing:
                before = ctx.otlp.total()
                traced = stream_summary(await run_stream(ctx, workload, images, sizes[workload.name], traced=True))
                traced["spans_exported"] = ctx.otlp.total() - before
                log(f"{workload.name} traced stream: {_fmt(traced['images_per_s'], '.2f')} img/s, p50 "
                    f"{_fmt(traced['p50_ms'], '.0f')} ms, {traced['spans_exported']} spans exported")
            multi = None
            if args.processes > 1:
                multi = stream_summary(await run_stream(ctx, workload, images, sizes[workload.name],
                                                        processes=args.processes))
                log(f"{workload.name} stream, {args.processes} worker processes: "
                    f"{_fmt(multi['images_per_s'], '.2f')} img/s over the {multi['requests_in_window']} requests "
                    f"answered once all of them worked")
            report_workloads[workload.name] = workload_summary(workload, stream, seed, model_only, traced, multi)
            images.remove_files()
            del server.sets[workload.name]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if server is not None:
            server.stop()
        if ctx is not None and ctx.otlp is not None:
            ctx.otlp.stop()
        if embedded is not None:
            embedded.stop()
    machine["loadavg_end"] = load_average()
    settings = {
        "profile": profile,
        "quick": args.quick,
        "broker": args.bootstrap or "embedded",
        "weights": "random",
        "image_size": args.image_size,
        "photos": list(STREAM_PHOTOS),
        "partitions": args.partitions,
        "max_in_flight": args.max_in_flight,
        "max_in_flight_image_bytes": args.max_in_flight_image_bytes,
        "batching": args.batching,
        "tracing": args.tracing,
        "worker_env": args.worker_env,
        "processes": args.processes,
        "tracing_sampler": {k: v for k, v in os.environ.items() if k.startswith("OTEL_TRACES_SAMPLER")},
        "image_server": args.image_server,
        "light_rate": args.light_rate,
        "light_requests": light_requests,
        "light_max_s": light_max_s,
        "model_only_sweeps": {k: list(v) for k, v in SWEEPS[profile].items()},
        "model_only_min_timed_s": MIN_TIMED_S[profile],
        "requests": sizes,
        "seed_requests": seed_sizes,
        "workdir": str(workdir),
    }
    return {"device": str(device), "machine": machine, "settings": settings, "workloads": report_workloads,
            "command": " ".join(sys.argv)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def defaults(attribute: str) -> str:
        return "; ".join(f"{profile}: " + " ".join(f"{w.name} {getattr(w, attribute)[profile]}"
                                                   for w in WORKLOADS.values())
                         for profile in ("cpu", "cpu-quick", "cuda", "cuda-quick"))

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N: the worker's and this "
                        "process's (baselines)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated (default all): " + "; ".join(f"{w.name} {w.title}"
                                                                          for w in WORKLOADS.values()))
    parser.add_argument("--quick", action="store_true",
                        help="small N and M, short sweeps and light load: all five in under 4 min on 2 CPU cores")
    parser.add_argument("--requests", type=int, metavar="N",
                        help=f"stream requests per workload (default, by profile: {defaults('requests')})")
    parser.add_argument("--seed-requests", type=int, metavar="M",
                        help=f"seed-style requests per workload (default: {defaults('seed_requests')})")
    parser.add_argument("--image-size", type=int, default=1024,
                        help="longest side of the photos in px (default 1024; W4 always 64)")
    parser.add_argument("--partitions", type=int, help="partitions of the requests topic (default: 4 CPU, 8 CUDA)")
    parser.add_argument("--max-in-flight", type=int, help="the worker's bound (default: 64 CPU, 1024 CUDA)")
    parser.add_argument("--max-in-flight-image-bytes", type=int,
                        help="the worker's image byte bound (default: the worker's on CPU, 4 GiB on CUDA)")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="also run each stream on N worker processes (imgstream worker --processes N) and report "
                        "its rate over the one-process run's, counted from when all N consume")
    parser.add_argument("--image-server", choices=tuple(IMAGE_SERVERS), default=ImageServer.kind,
                        help="the http images' server in this process: aiohttp (default; issue 21's targets were "
                             "set against it) or minimal (a third of the benchmark's CPU on W4, and a faster "
                             "seed-style side: see ImageServer)")
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the worker's environment, e.g. IMGSTREAM_EVENT_LOOP=asyncio (repeatable)")
    parser.add_argument("--batching", type=json.loads, metavar="JSON",
                        help='the worker\'s models.batching, e.g. \'{"clip": {"max_batch_size": 128}}\'')
    parser.add_argument("--light-rate", type=float, default=2.0,
                        help="light-load requests/s (default 2; capped at 0.25x the measured backlog throughput)")
    parser.add_argument("--light-requests", type=int, help="light-load requests (default 20; 6 with --quick)")
    parser.add_argument("--light-max-s", type=float,
                        help="at most about this long at the light rate, at least one request (default 40; 5 quick)")
    parser.add_argument("--bootstrap", help="use this Kafka broker instead of starting the embedded one")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds to wait for one phase's results (default 900)")
    parser.add_argument("--startup-timeout", type=float, default=300.0,
                        help="seconds for the worker to get ready (default 300)")
    parser.add_argument("--tracing", action="store_true",
                        help="run each stream a second time with tracing on (spans exported over OTLP/HTTP to a "
                        "receiver on loopback) and report traced/untraced")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    parser.add_argument("--profile-worker", type=Path, metavar="DIR",
                        help="record the worker under py-spy during each backlog (from /readyz to the last "
                             "result) into DIR/<workload>.txt (collapsed stacks, one thread each) and "
                             "<workload>.meta.json; summarise with scripts/profile_summary.py. Needs ptrace rights")
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second (default 250)")
    parser.add_argument("--profile-format", choices=("raw", "speedscope"), default="raw",
                        help="raw (collapsed stacks, default; what profile_summary.py reads best) or speedscope")
    parser.add_argument("--profile-nonblocking", action="store_true",
                        help="py-spy --nonblocking: the worker is not paused for each sample (less overhead), but "
                             "a third of the samples fail or come torn on W4, which favours frames that change slowly")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the worker logs even when all went well")
    args = parser.parse_args(argv)
    names = [name.strip().upper() for name in args.workloads.split(",") if name.strip()]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or not names:
        parser.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    args.workloads = list(dict.fromkeys(names))
    cuda = args.device.startswith("cuda")
    if args.partitions is None:
        args.partitions = 8 if cuda else 4
    if args.max_in_flight is None:
        args.max_in_flight = 1024 if cuda else 64
    if args.max_in_flight_image_bytes is None and cuda:
        args.max_in_flight_image_bytes = 4 * 2**30
    for flag in ("requests", "seed_requests", "light_requests", "partitions", "max_in_flight", "image_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.light_rate <= 0:
        parser.error("--light-rate must be positive")
    if args.profile_rate < 1:
        parser.error("--profile-rate must be at least 1")
    if args.profile_worker is not None:
        try:
            WorkerProfiler.executable()
        except RuntimeError as exc:
            parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        report = asyncio.run(bench(args))
    except (RuntimeError, OSError) as exc:  # no CUDA, no broker binary, a port taken
        print(f"bench_stream: error: {exc}", file=sys.stderr)
        return 1
    report["wall_s"] = round(time.monotonic() - started, 1)
    print(render(report))
    print(f"\nwall time {report['wall_s']:.0f}s")
    for name, workload in report["workloads"].items():
        profile = workload["stream"].get("profile")
        if profile and profile.get("path"):
            import profile_summary

            samples, meta = profile_summary.load(Path(profile["path"]), str(Path(__file__).resolve().parent.parent))
            print(f"\n{name}: where the worker's CPU went ({profile['path']}):")
            print(profile_summary.render(profile_summary.summarise(samples, meta), markdown=False))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        log(f"JSON written to {args.json}")
    problems = failures(report)
    for problem in problems:
        log(f"FAILED {problem}")
    if problems or args.keep_workdir:
        log(f"worker logs kept in {report['settings']['workdir']}")
    else:
        shutil.rmtree(report["settings"]["workdir"], ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
