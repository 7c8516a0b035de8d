"""The suite checks what it says: no assertion hides a condition in its failure message."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _reads_as_a_condition(message: ast.expr | None) -> bool:
    """A message that is a test: `a and b`, `x in y`, `not x`, `all(...)`, `any(...)`, `isinstance(...)`."""
    if isinstance(message, (ast.BoolOp, ast.Compare)):
        return True
    if isinstance(message, ast.UnaryOp) and isinstance(message.op, ast.Not):
        return True
    return (isinstance(message, ast.Call) and isinstance(message.func, ast.Name)
            and message.func.id in {"all", "any", "isinstance", "callable", "hasattr"})


def test_no_assertion_message_is_a_condition():
    # `assert code == 0, err and "x" in err` checks only `code == 0`: the rest is the message.
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assert) and _reads_as_a_condition(node.msg):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:100]}")
    assert not found, "conditions written as assertion messages:\n" + "\n".join(found)


def test_the_guard_knows_the_shapes_of_hidden_conditions():
    for source in ('assert ok, err and "x" in err', "assert ok, n == 3", "assert ok, not done",
                   "assert ok, all(rows)", "assert ok, isinstance(x, int)"):
        assert _reads_as_a_condition(ast.parse(source).body[0].msg), source
    for source in ("assert ok, err", 'assert ok, f"{n} rows"', "assert ok, (a, b)", "assert ok"):
        assert not _reads_as_a_condition(ast.parse(source).body[0].msg), source
