"""Real `imgstream worker` subprocesses for end-to-end tests, and a reader of their results.

Workers run `python -m producer.cli worker` with random weights on the CPU and only the
models a test needs preloaded; each logs to its own file, which `WorkerProcs.report()`
prints (pytest shows it when the test fails).
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from imgstream.schemas.config import Topics

REPO_ROOT = Path(__file__).resolve().parent.parent
# Cheap work per request: MTCNN (its weights ship with facenet-pytorch) on a small photo.
FACE_TASKS = [
    {"operation_id": "face", "type": "detect_bounding_box",
     "params": {"target": "prominent_face", "face_context": "whole_image"}},
    {"operation_id": "face_loose", "type": "detect_bounding_box",
     "params": {"target": "prominent_face", "face_context": "whole_image", "min_score": 0.5}},
]


def small_photo(path: Path, size: int = 96) -> Path:
    """The astronaut photo (a real face) shrunk to `size` px, saved as JPEG."""
    from tests.engine_helpers import photo

    photo("astronaut").resize((size, size)).save(path, "JPEG", quality=90)
    return path


def request_bytes(request_id: str, image: dict[str, str], tasks: list[dict[str, Any]] = FACE_TASKS) -> bytes:
    return orjson.dumps({"schema_version": 1, "request_id": request_id, "image": image, "tasks": tasks})


class WorkerProc:
    """One worker subprocess and its log file."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path, http_port: int | None) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.http_port = http_port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))

    async def wait_for_log(self, pattern: str, timeout_s: float = 60.0, count: int = 1) -> None:
        """Until `pattern` (a regex) occurs `count` times in the log; fails early if the worker died."""
        deadline = time.monotonic() + timeout_s
        while self.count(pattern) < count:
            if not self.alive():
                raise AssertionError(f"worker {self.name} exited ({self.proc.returncode}) before logging "
                                     f"{pattern!r}; log:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {self.name} did not log {pattern!r} x{count} within {timeout_s}s; "
                                     f"log:\n{self.tail()}")
            await asyncio.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no drain, no commit, no goodbye to the group."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    async def exited(self, timeout_s: float = 60.0) -> int:
        """The exit status of a worker that stops by itself (SIGKILL and an AssertionError past the timeout)."""
        deadline = time.monotonic() + timeout_s
        while self.alive():
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"worker {self.name} did not stop by itself within {timeout_s}s; "
                                     f"log:\n{self.tail()}")
            await asyncio.sleep(0.1)
        return self.proc.returncode

    async def terminate(self, timeout_s: float = 60.0, sig: int = signal.SIGTERM) -> int:
        """Send `sig` and wait for the exit status (SIGKILL and an AssertionError past the timeout)."""
        if self.alive():
            self.proc.send_signal(sig)
        deadline = time.monotonic() + timeout_s
        while self.alive():
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"worker {self.name} did not exit within {timeout_s}s of "
                                     f"{signal.Signals(sig).name}; log:\n{self.tail()}")
            await asyncio.sleep(0.1)
        return self.proc.returncode

    def get(self, path: str, timeout_s: float = 5.0, accept: str | None = None) -> tuple[int, bytes, dict[str, str]]:
        """GET http://127.0.0.1:<http_port><path>: (status, body, headers); status 0 if nothing answers."""
        assert self.http_port is not None
        url = f"http://127.0.0.1:{self.http_port}{path}"
        headers = {"Accept": accept} if accept else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, b"", {}

    def tail(self, max_chars: int = 6000) -> str:
        return self.log()[-max_chars:]


class WorkerProcs:
    """Starts workers for one test; `stop_all()` kills what is left, `report()` prints the logs."""

    def __init__(self, log_dir: Path, bootstrap: str, topics: Topics, group: str) -> None:
        self.log_dir = log_dir
        self.bootstrap = bootstrap
        self.topics = topics
        self.group = group
        self.started: list[WorkerProc] = []

    def env(self, preload: Iterable[str], extra: dict[str, str] | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSTREAM_")}
        t = self.topics
        env.update({
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "IMGSTREAM_KAFKA__BOOTSTRAP": self.bootstrap,
            "IMGSTREAM_KAFKA__GROUP": self.group,
            "IMGSTREAM_KAFKA__SESSION_TIMEOUT_MS": "3000",
            "IMGSTREAM_KAFKA__TOPICS__REQUESTS": t.requests,
            "IMGSTREAM_KAFKA__TOPICS__REPLAY": t.replay,
            "IMGSTREAM_KAFKA__TOPICS__RESULTS": t.results,
            "IMGSTREAM_KAFKA__TOPICS__DLQ": t.dlq,
            "IMGSTREAM_KAFKA__TOPICS__RETRY": t.retry,
            "IMGSTREAM_MODELS__WEIGHTS": "random",
            "IMGSTREAM_MODELS__DEVICE": "cpu",
            "IMGSTREAM_MODELS__PRELOAD": orjson.dumps(list(preload)).decode(),
            "IMGSTREAM_BLOBS__DIR": str(self.log_dir / "blobs"),
            # Tests write their images under their tmp_path, which is also log_dir.
            "IMGSTREAM_FETCH__BLOB_ROOTS": orjson.dumps([str(self.log_dir)]).decode(),
            "IMGSTREAM_DRAIN_TIMEOUT_S": "20",
            "IMGSTREAM_LOG_LEVEL": "DEBUG",  # a line per request, which tests wait for
            # Most tests send one image many times to make load; shared work would make it vanish.
            # Tests of reuse turn it back on.
            "IMGSTREAM_MODELS__REUSE": "false",
        })
        env.update(extra or {})
        return env

    def start(self, name: str | None = None, *, preload: Iterable[str] = ("face",), http_port: int | None = None,
              env: dict[str, str] | None = None, args: Iterable[str] = ()) -> WorkerProc:
        name = name or f"w{len(self.started) + 1}"
        log_path = self.log_dir / f"worker-{name}.log"
        command = [sys.executable, "-m", "imgstream", "worker", *args]
        if http_port is not None:
            command += ["--http-port", str(http_port)]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(command, cwd=REPO_ROOT, env=self.env(preload, env), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)
        worker = WorkerProc(name, proc, log_path, http_port)
        self.started.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            worker.kill()

    def report(self) -> None:
        for worker in self.started:
            print(f"===== worker {worker.name} (pid {worker.pid}, exit {worker.proc.returncode}): {worker.log_path}")
            print(worker.tail(20000))


class ResultReader:
    """Reads a results topic from the start in the background, counting (request_id, operation_id)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.counts: Counter[tuple[str, str]] = Counter()
        self.records: list[dict[str, Any]] = []
        self.keep_records = False
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> ResultReader:
        consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, group_id=None,
                                    auto_offset_reset="earliest")
        await consumer.start()
        self._task = asyncio.create_task(self._read(consumer))
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait([self._task])

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while True:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        result = orjson.loads(record.value)
                        self.counts[(result["request_id"], result["operation_id"])] += 1
                        if self.keep_records:
                            self.records.append(result)
        finally:
            await consumer.stop()

    @property
    def distinct(self) -> int:
        return len(self.counts)

    @property
    def duplicates(self) -> int:
        return sum(self.counts.values()) - len(self.counts)

    async def wait_for(self, distinct: int, timeout_s: float, workers: Iterable[WorkerProc] = ()) -> None:
        """Until `distinct` different (request_id, operation_id) were read; fails if all `workers` died."""
        workers = list(workers)
        deadline = time.monotonic() + timeout_s
        while self.distinct < distinct:
            if workers and not any(w.alive() for w in workers):
                raise AssertionError(f"every worker exited with {self.distinct}/{distinct} results read")
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.distinct}/{distinct} distinct results within {timeout_s}s")
            await asyncio.sleep(0.1)

    def missing(self, expected: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        return set(expected) - set(self.counts)


async def produce_paced(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]],
                        per_second: float | None = None, max_request_size: int = 1_048_576) -> None:
    """Produce (key, value) messages, `per_second` at a time each second (all at once if None)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                max_request_size=max_request_size)
    await producer.start()
    try:
        step = max(1, int(per_second)) if per_second else len(messages)
        for start in range(0, len(messages), step):
            chunk = messages[start:start + step]
            await asyncio.gather(*[await producer.send(topic, value, key=key) for key, value in chunk])
            if per_second and start + step < len(messages):
                await asyncio.sleep(1.0)
    finally:
        await producer.stop()


def jpeg_bytes(size: int = 96) -> bytes:
    from tests.engine_helpers import photo

    buffer = io.BytesIO()
    photo("astronaut").resize((size, size)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def workers(broker: str, topics: Topics, tmp_path: Path) -> Iterator[WorkerProcs]:
    """Worker subprocesses on the session broker and this test's topics, in a fresh group."""
    procs = WorkerProcs(tmp_path, broker, topics, f"g-{uuid.uuid4().hex[:8]}")
    yield procs
    procs.stop_all()
    procs.report()  # captured: pytest shows it only when the test failed


class RequestStream:
    """Produces face requests `prefix-0, prefix-1, ...` at a steady rate until stopped."""

    def __init__(self, bootstrap: str, topic: str, prefix: str, image: dict[str, str], per_second: float) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.prefix = prefix
        self.image = image
        self.per_second = per_second
        self.produced = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> RequestStream:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop producing; returns once every request produced so far is acknowledged."""
        self._stop.set()
        assert self._task is not None
        await self._task

    @property
    def expected(self) -> set[tuple[str, str]]:
        return {(f"{self.prefix}-{i}", t["operation_id"]) for i in range(self.produced) for t in FACE_TASKS}

    async def _run(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            step = 1.0 / self.per_second
            while not self._stop.is_set():
                request_id = f"{self.prefix}-{self.produced}"
                await producer.send_and_wait(self.topic, request_bytes(request_id, self.image),
                                             key=request_id.encode())
                self.produced += 1
                try:
                    await asyncio.wait_for(self._stop.wait(), step)
                except asyncio.TimeoutError:
                    pass
        finally:
            await producer.stop()
