"""What the benchmark scripts share: machine facts, real photos, a worker subprocess and its /metrics.

bench_engine.py, bench_memory.py and bench_stream.py import it from this folder; it imports
torch and PIL only inside the functions that need them.
"""

from __future__ import annotations

import io
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from imgstream.producer.embedded_broker import find_free_port  # noqa: E402
from imgstream.schemas.config import Topics  # noqa: E402

# Real photos that ship inside scikit-image (no download): the five bench_engine has always used,
# then more of them for a mix of sizes and content (gray ones are converted to RGB).
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket")
MORE_PHOTOS = ("hubble_deep_field", "immunohistochemistry", "retina", "moon", "coins")


def progress_logger(name: str) -> Callable[[str], None]:
    """A function that prints `[name HH:MM:SS] message` lines on stderr."""

    def progress(message: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return progress


# -- the machine ----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: Any) -> dict[str, Any]:
    """CPU model and cores, memory, Python, torch (version, threads) and the card's name on CUDA."""
    import torch

    device = torch.device(device)
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_start": load_average(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def cpu_seconds(pid: int | None, children: bool = False) -> float | None:
    """User plus system CPU seconds of one process, all its threads (None if it is gone); with `children`,
    plus those of its live child processes (`imgstream worker --processes N`: the workers)."""
    if pid is None:
        return None
    try:
        process = psutil.Process(pid)
        times = [process.cpu_times()]
        for child in process.children(recursive=True) if children else ():
            try:
                times.append(child.cpu_times())
            except psutil.Error:
                continue
    except psutil.Error:
        return None
    return sum(t.user + t.system for t in times)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, every process), for telling noise apart."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def embedded_broker_pid() -> int | None:
    """The pid of the embedded broker this process started (its Tansu subprocess), if any."""
    from imgstream.producer.embedded_broker import broker_binary

    binary = broker_binary()
    for child in psutil.Process().children():
        try:
            command = child.cmdline()
        except psutil.Error:
            continue
        if command[:2] == [binary, "broker"]:
            return child.pid
    return None


# -- real photos ----------------------------------------------------------------------------


def photo(name: str) -> Any:
    """One scikit-image photo at its own size, as an RGB PIL image."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def load_photos(names: Iterable[str] = PHOTOS) -> list[Any]:
    """The named photos (default: the five bench_engine uses), as RGB PIL images."""
    return [photo(name) for name in names]


def fit_longest(image: Any, size: int) -> Any:
    """`image` resized so its longest side is `size` px, aspect kept."""
    from PIL import Image

    width, height = image.size
    scale = size / max(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)


def jpeg_bytes(image: Any, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# -- a worker subprocess --------------------------------------------------------------------


def unique_jpeg(jpeg: bytes, tag: bytes) -> bytes:
    """`jpeg` with a comment (COM) segment holding `tag` right after SOI: new bytes and sha256, same pixels."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI marker)")
    if len(tag) > 0xFFFF - 2:
        raise ValueError("a JPEG comment holds at most 65533 bytes")
    # The segment length counts its own two bytes, not the marker.
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(tag) + 2) + tag + jpeg[2:]


def fresh_topics(prefix: str = "bench") -> Topics:
    """Uniquely named topics (nothing is created here: see producer.topics.create_topics)."""
    u = uuid.uuid4().hex[:8]
    return Topics(requests=f"{prefix}-{u}.requests", replay=f"{prefix}-{u}.replay",
                  results=f"{prefix}-{u}.results", dlq=f"{prefix}-{u}.dlq", retry=f"{prefix}-{u}.retry")


def worker_env(
    *,
    bootstrap: str,
    topics: Topics,
    group: str,
    device: str,
    preload: list[str],
    blob_dir: Path,
    max_in_flight: int,
    max_in_flight_image_bytes: int | None = None,
    blob_roots: list[str] | None = None,
    allow_private_addresses: bool = False,
    batching: dict[str, Any] | None = None,
    session_timeout_ms: int | None = None,
) -> dict[str, str]:
    """This process's environment without its IMGSTREAM_* variables, plus a worker configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSTREAM_")}
    env.update({
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "IMGSTREAM_KAFKA__BOOTSTRAP": bootstrap,
        "IMGSTREAM_KAFKA__GROUP": group,
        "IMGSTREAM_KAFKA__TOPICS__REQUESTS": topics.requests,
        "IMGSTREAM_KAFKA__TOPICS__REPLAY": topics.replay,
        "IMGSTREAM_KAFKA__TOPICS__RESULTS": topics.results,
        "IMGSTREAM_KAFKA__TOPICS__DLQ": topics.dlq,
        "IMGSTREAM_KAFKA__TOPICS__RETRY": topics.retry,
        "IMGSTREAM_MODELS__WEIGHTS": "random",
        "IMGSTREAM_MODELS__DEVICE": device,
        "IMGSTREAM_MODELS__PRELOAD": json.dumps(preload),
        "IMGSTREAM_BLOBS__DIR": str(blob_dir),
        "IMGSTREAM_MAX_IN_FLIGHT": str(max_in_flight),
    })
    if session_timeout_ms is not None:
        env["IMGSTREAM_KAFKA__SESSION_TIMEOUT_MS"] = str(session_timeout_ms)
    if max_in_flight_image_bytes is not None:
        env["IMGSTREAM_MAX_IN_FLIGHT_IMAGE_BYTES"] = str(max_in_flight_image_bytes)
    if blob_roots is not None:
        env["IMGSTREAM_FETCH__BLOB_ROOTS"] = json.dumps(blob_roots)
    if allow_private_addresses:
        env["IMGSTREAM_FETCH__ALLOW_PRIVATE_ADDRESSES"] = "true"
    if batching is not None:
        env["IMGSTREAM_MODELS__BATCHING"] = json.dumps(batching)
    return env


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive TCP ports that were free on `host` a moment ago (a worker with
    --processes N serves port P + i)."""
    for _ in range(100):
        base = find_free_port(host)
        if base + count > 65536:
            continue
        sockets = []
        try:
            for port in range(base + 1, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports on {host}")


class WorkerFailed(RuntimeError):
    """The worker subprocess exited or did not become ready."""


class WorkerProcess:
    """`python -m imgstream worker --http-port P [--processes N]` with its own log file (worker i of N serves
    port P + i)."""

    def __init__(self, env: dict[str, str], http_port: int, log_path: Path, processes: int = 1) -> None:
        self.env = env
        self.http_port = http_port
        self.log_path = log_path
        self.processes = processes
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_ports(self) -> list[int]:
        return [self.http_port + i for i in range(self.processes)]

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> WorkerProcess:
        command = [sys.executable, "-m", "imgstream", "worker", "--http-port", str(self.http_port)]
        if self.processes > 1:
            command += ["--processes", str(self.processes)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def exited(self) -> int | None:
        """None while it runs, else its exit status."""
        return None if self.proc is None else self.proc.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def ready(self) -> bool:
        """/readyz answers 200 (models loaded, broker reachable), on every worker process's port."""
        for port in self.http_ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    if response.status != 200:
                        return False
            except OSError:
                return False
        return True

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Block until /readyz is 200 and the log says its partitions are assigned; the seconds it took."""
        started = time.monotonic()
        while not (self.ready() and "partitions assigned" in self.log_text()):
            code = self.exited()
            if code is not None:
                raise WorkerFailed(f"the worker exited with status {code} while starting; log ends:\n"
                                   f"{self.log_tail()}")
            if time.monotonic() - started > timeout_s:
                raise WorkerFailed(f"the worker was not ready within {timeout_s:.0f}s; log ends:\n{self.log_tail()}")
            time.sleep(0.1)
        return time.monotonic() - started

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (the worker drains and commits), SIGKILL after `timeout_s`; its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- the worker's /metrics ------------------------------------------------------------------


class MetricsSnapshot:
    """One scrape of a Prometheus endpoint: sample name + labels -> value."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)

    def value(self, name: str, **labels: str) -> float | None:
        """The sample with exactly these labels (None when absent)."""
        return self.samples.get((name, frozenset(labels.items())))

    def total(self, name: str) -> float:
        """The sum over every label set of one sample name (0 when absent)."""
        return sum(v for (n, _), v in self.samples.items() if n == name)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """{label value: sum of samples} of one sample name."""
        out: dict[str, float] = {}
        for (n, labels), v in self.samples.items():
            if n == name:
                key = dict(labels).get(label, "")
                out[key] = out.get(key, 0.0) + v
        return out


def scrape_metrics(port: int, timeout_s: float = 2.0) -> MetricsSnapshot | None:
    """The worker's /metrics on 127.0.0.1:port, parsed (None if it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError:
        return None
    return MetricsSnapshot(text)
