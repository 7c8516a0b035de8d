"""The suite checks what it says: no assertion hides a condition in its failure message."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_assertion_message_is_a_condition():
    # `assert code == 0, err and "x" in err` checks only `code == 0`: the rest is the message.
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assert) and isinstance(node.msg, (ast.BoolOp, ast.Compare)):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:100]}")
    assert not found, "conditions written as assertion messages:\n" + "\n".join(found)
