"""The built wheel claims one import name, `imgstream`, and its light install runs a crawler's commands
without torch, whatever `schemas.py` or `producer.py` lie beside the caller."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info/ beside the sources it builds.
    source = tmp_path_factory.mktemp("source") / "imgstream"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", ".imgstream", "__pycache__", "build", "*.egg-info", ".pytest_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(out), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("imgstream-*.whl")
    return path


def test_the_wheel_installs_one_top_level_name(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert archive.read(top_level).decode().split() == ["imgstream"]
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"imgstream"}, tops
    for room in ("schemas", "blobs", "kafka_clients", "service", "analysis", "producer", "consumer", "sink",
                 "training"):
        assert f"imgstream/{room}/__init__.py" in names
    assert "imgstream/schemas/json/result_event.schema.json" in names


@pytest.mark.slow
def test_the_light_install_runs_submit_beside_a_schemas_and_a_producer_of_its_own(wheel: Path, tmp_path: Path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # The light install: the wheel with its base dependencies, no extras.
    installed = subprocess.run([python, "-m", "pip", "install", "--quiet", str(wheel)], env=pip_env,
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    crawler = tmp_path / "crawler"
    crawler.mkdir()
    for shadow in ("schemas.py", "producer.py", "consumer.py", "analysis.py"):
        (crawler / shadow).write_text("raise SystemExit('a module of the crawler was imported instead of ours')\n")
    env = pip_env | {"HF_HUB_OFFLINE": "1"}
    helped = subprocess.run([str(venv / "bin" / "imgstream"), "submit", "--help"], cwd=crawler, env=env,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "--task" in helped.stdout and "--wait" in helped.stdout
    probe = ("import sys, importlib.util, imgstream.cli, imgstream.producer.submit, imgstream.schemas.events; "
             "imgstream.cli.parse_args(['submit', 'a.jpg', '--task', 'embed_clip_vit_b_32']); "
             "print(importlib.util.find_spec('torch') is None, 'torch' in sys.modules, "
             "imgstream.schemas.events.__file__.startswith(sys.prefix))")
    run = subprocess.run([python, "-c", probe], cwd=crawler, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["True", "False", "True"], run.stdout
