"""The rooms import one way only (DESIGN "Rooms"), every module imports the package by its one name
(`imgstream.<room>`), and no room grows a file past what one reader takes in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("schemas", "blobs", "kafka_clients", "service", "analysis", "producer", "consumer", "sink", "training")
# The rooms each room may import (its own included). The floor plan, bottom up:
#   schemas; blobs and kafka_clients and service (low rooms, schemas only); analysis (the engine);
#   producer (what a crawler needs); consumer (the worker); sink (the vector-DB side); training.
ALLOWED = {
    "schemas": {"schemas"},
    "blobs": {"blobs"},
    # The one place that builds Kafka clients: below everything that talks to Kafka.
    "kafka_clients": {"kafka_clients", "schemas"},
    # What every long-running command shares: logging, signals, progress, retry, HTTP health and metrics.
    "service": {"service", "schemas"},
    "analysis": {"analysis", "schemas"},
    "producer": {"producer", "schemas", "blobs", "kafka_clients", "service"},
    "consumer": {"consumer", "analysis", "schemas", "blobs", "kafka_clients", "service"},
    # `search` embeds its query image with the engine (imported when a search runs).
    "sink": {"sink", "schemas", "kafka_clients", "service", "analysis"},
    # Training embeds images through the engine, reads the sink's tables, and reads file:// blobs inside the
    # worker's roots with the worker's own reader.
    "training": {"training", "analysis", "sink", "consumer", "schemas", "blobs", "service"},
}
MAX_LINES = 350
# Rooms whose modules a reader takes one at a time (the worker's and the sink's rooms, the dispatcher).
SMALL_FILE_ROOMS = ("consumer", "sink", "service", "kafka_clients", "producer", "imgstream")


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import, at any depth (lazy imports count too)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _python_files() -> list[Path]:
    skip = {".venv", ".git", "imgstream"}  # imgstream/<room> are links to the rooms themselves
    files = [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts[:1])]
    return files + sorted((ROOT / "imgstream").glob("*.py"))


@pytest.mark.parametrize("room", ROOMS)
def test_room_imports_only_the_rooms_below_it(room):
    offences = []
    for path in sorted((ROOT / room).rglob("*.py")):
        for lineno, module in _imports(ast.parse(path.read_text(), str(path))):
            parts = module.split(".")
            if parts[0] == "imgstream" and len(parts) > 1 and parts[1] in ROOMS and parts[1] not in ALLOWED[room]:
                offences.append(f"{path.relative_to(ROOT)}:{lineno} imports {module}")
    assert not offences, "imports against the layering:\n" + "\n".join(offences)


def test_every_module_imports_the_package_by_its_one_name():
    offences = []
    for path in _python_files():
        for lineno, module in _imports(ast.parse(path.read_text(), str(path))):
            if module.split(".")[0] in ROOMS:
                offences.append(f"{path.relative_to(ROOT)}:{lineno} imports {module} (use imgstream.{module})")
    assert not offences, "\n".join(offences)


def test_every_room_is_linked_under_the_package_and_installed_by_pyproject():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for room in ROOMS:
        link = ROOT / "imgstream" / room
        assert link.is_symlink() and link.resolve() == (ROOT / room).resolve(), f"imgstream/{room} -> ../{room}"
        assert pyproject["package-dir"][f"imgstream.{room}"] == room
        assert f"imgstream.{room}" in pyproject["packages"]


@pytest.mark.parametrize("room", SMALL_FILE_ROOMS)
def test_no_module_of_the_room_is_over_350_lines(room):
    folder = ROOT / room
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted(folder.glob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, "split these into modules that each own one thing:\n" + "\n".join(long)
