"""The rooms import one way only (DESIGN "Rooms"): schemas <- analysis <- consumer <- training;
schemas, blobs, kafka_clients <- producer; kafka_clients <- consumer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("schemas", "blobs", "kafka_clients", "analysis", "consumer", "producer", "training")
# The project rooms each room may import at module level.
ALLOWED = {
    "schemas": {"schemas"},
    "blobs": {"blobs"},
    # The one place that builds Kafka clients: below everything that talks to Kafka.
    "kafka_clients": {"kafka_clients", "schemas"},
    "analysis": {"analysis", "schemas"},
    "consumer": {"consumer", "analysis", "schemas", "blobs", "kafka_clients"},
    "producer": {"producer", "schemas", "blobs", "kafka_clients"},
    # Classifier training reads the sink's tables and embeds images through the engine.
    "training": {"training", "analysis", "consumer", "schemas", "blobs"},
}
# The CLI is the one place that dispatches to every room: `worker`, `sink` and `search` import
# the consumer inside their handlers, so a crawler's light install never loads it.
LAZY_DISPATCH = {ROOT / "producer" / "cli.py"}


def _imports(tree: ast.AST, module_level_only: bool) -> list[tuple[int, str]]:
    nodes = tree.body if module_level_only else list(ast.walk(tree))  # type: ignore[attr-defined]
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


@pytest.mark.parametrize("room", ROOMS)
def test_room_imports_only_the_rooms_below_it(room):
    offences = []
    for path in sorted((ROOT / room).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for lineno, top in _imports(tree, module_level_only=path in LAZY_DISPATCH):
            if top in ROOMS and top not in ALLOWED[room]:
                offences.append(f"{path.relative_to(ROOT)}:{lineno} imports {top}")
    assert not offences, "imports against the layering:\n" + "\n".join(offences)
