"""The end of a training run: a summary table for people, a JSON report for machines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from imgstream.training.pipeline import CollectionOutcome, RunReport

COLUMNS = ("collection", "status", "best", "threshold", "expected P/R", "held out", "score", "new version", "note")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row(outcome: CollectionOutcome, metric: str) -> list[str]:
    best = outcome.best or {}
    held = outcome.holdout
    winner = next((b for b in outcome.bakeoff if b["version"] == best.get("version")), None)
    new = outcome.new_version
    if new is None:
        new_text = "-"
    elif not new["stored"]:
        new_text = "discarded"
    else:
        rank = next((b["rank"] for b in outcome.bakeoff if b["new"]), None)
        new_text = new["version"] + (f" (#{rank} of {len(outcome.bakeoff)})" if rank else "")
        if new["version"] in outcome.pruned:
            new_text += " pruned"
    note = outcome.message
    if outcome.notes:
        note += f" [+{len(outcome.notes)} notes]"
    return [
        str(outcome.collection_id), outcome.status, best.get("version") or best.get("model_file") or "-",
        _fmt(best.get("threshold"), 4),
        f"{_fmt(best.get('expected_precision'), 2)}/{_fmt(best.get('expected_recall'), 2)}" if best else "-",
        f"{held['positives']}+/{held['negatives']}-" if held else "-",
        f"{metric} {winner['score']:.3f}" if winner else "-",
        new_text, note,
    ]


def summary_table(report: RunReport) -> str:
    """One aligned line per collection, then the totals."""
    metric = report.settings["rank_metric"]
    rows = [list(COLUMNS)] + [_row(c, metric) for c in report.collections]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    counts: dict[str, int] = {}
    for c in report.collections:
        counts[c.status] = counts.get(c.status, 0) + 1
    lines.append(f"{len(report.collections)} collections: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)


def notes_text(report: RunReport) -> str:
    """The notes behind the table's `[+N notes]`, one per line."""
    return "\n".join(f"collection {c.collection_id}: {note}" for c in report.collections for note in c.notes)


def write_report(report: RunReport, path: Path, exit_code: int) -> None:
    data: dict[str, Any] = {**report.as_dict(), "exit_code": exit_code}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
