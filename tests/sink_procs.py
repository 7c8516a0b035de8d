"""A real `imgstream sink pgvector` subprocess for end-to-end tests, logging to a file (a pipe could fill
and stall it during a long test), with its HTTP port."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson

from imgstream.schemas.config import Topics
from tests.worker_procs import REPO_ROOT, WorkerProc


def start_sink(broker: str, topics: Topics, dsn: str, log_dir: Path, *, http_port: int | None = None,
               group: str | None = None, env: dict[str, str] | None = None) -> WorkerProc:
    """`imgstream sink pgvector --dsn DSN` on the results topic, in a fresh group unless `group` is given."""
    log_path = log_dir / f"sink-{uuid.uuid4().hex[:6]}.log"
    command = [sys.executable, "-m", "imgstream", "sink", "pgvector", "--dsn", dsn, "--bootstrap", broker,
               "--group", group or f"sink-{uuid.uuid4().hex[:8]}", "--batch-size", "100", "--batch-ms", "100"]
    if http_port is not None:
        command += ["--http-port", str(http_port)]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMGSTREAM_")}
    environ.update({"PYTHONUNBUFFERED": "1", "IMGSTREAM_KAFKA__TOPICS__RESULTS": topics.results,
                    "IMGSTREAM_KAFKA__SESSION_TIMEOUT_MS": "3000", **(env or {})})
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=environ, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
    return WorkerProc("sink", proc, log_path, http_port)


async def until_ready(sink: WorkerProc, want: int = 200, timeout_s: float = 60.0) -> dict:
    """Poll /readyz until it answers `want`; returns its body."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body, _ = sink.get("/readyz")
        if status == want:
            return orjson.loads(body)
        assert sink.alive(), f"the sink exited ({sink.proc.returncode}); log:\n{sink.tail()}"
        assert time.monotonic() < deadline, f"/readyz still {status} {body!r}; log:\n{sink.tail()}"
        await asyncio.sleep(0.3)
