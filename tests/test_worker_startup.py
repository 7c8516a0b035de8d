"""A worker that cannot start says why and exits non-zero (no traceback for a user to decode)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def _worker(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imgstream", "worker", "--bootstrap", "127.0.0.1:1", *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_require_gpu_without_a_gpu_refuses_to_start():
    proc = _worker("--require-gpu", "--weights", "random")
    assert proc.returncode == 1
    assert "cannot start: models.require_gpu is set but the models would run on the CPU" in proc.stderr


def test_missing_pretrained_weights_fail_with_what_to_do():
    proc = _worker("--weights", "pretrained", IMGSTREAM_MODELS__PRELOAD='["clip"]',
                   IMGSTREAM_MODELS__CLIP_WEIGHTS_PATH="/nonexistent/clip.pt")
    assert proc.returncode == 1
    assert "cannot load the models (weights=pretrained)" in proc.stderr and "--weights random" in proc.stderr


def test_sigterm_while_the_worker_starts_exits_zero():
    # Importing torch and loading the models take seconds; an orchestrator's SIGTERM then must not
    # kill the process mid-import (exit -15) but stop it cleanly.
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "imgstream", "worker", "--bootstrap", "127.0.0.1:1",
                             "--weights", "random"],
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "IMGSTREAM_MODELS__PRELOAD": '["face"]'},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)  # inside the imports
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
