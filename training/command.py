"""`imgstream train-classifiers`: run the pipeline, print the summary, write the report, choose the exit code."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from imgstream.schemas.config import WorkerConfig
from imgstream.training.pipeline import RunInputs, UsageError, run_training
from imgstream.training.registry import RegistryLocked
from imgstream.training.report import notes_text, summary_table, write_report

EXIT_OK, EXIT_COLLECTION_FAILED, EXIT_USAGE = 0, 1, 2
PROG = "imgstream train-classifiers"


def run_command(config: WorkerConfig, inputs: RunInputs, report_path: Path | None = None,
                log_level: str = "WARNING") -> int:
    """0 when every collection was promoted or kept, 1 when one was skipped or failed, 2 for usage errors."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = run_training(config, inputs)
    except (UsageError, RegistryLocked) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    exit_code = EXIT_OK if report.ok else EXIT_COLLECTION_FAILED
    print(summary_table(report))
    notes = notes_text(report)
    if notes:
        print(notes)
    if report_path is not None:
        write_report(report, report_path, exit_code)
    bad = [c for c in report.collections if c.status not in ("promoted", "kept")]
    for c in bad:
        print(f"{PROG}: collection {c.collection_id} {c.status}: {c.message}", file=sys.stderr)
    return exit_code
