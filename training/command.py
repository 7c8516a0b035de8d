"""`imgstream train-classifiers`: its flags; running it trains, prints the summary, writes the report and
chooses the exit code. scikit-learn, and torch when image files need embedding, load only when it runs."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, get_args

from imgstream.schemas.config import RankMetric, WorkerConfig, load_config
from imgstream.schemas.flags import Command, add_log_format
from imgstream.schemas.operations import TARGETS

EXIT_OK, EXIT_COLLECTION_FAILED, EXIT_USAGE = 0, 1, 2
PROG = "imgstream train-classifiers"


def _configure(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Trains one classifier per collection in the labels (rows of collection_id, key, label and "
        "optionally image), with embeddings from result events (--results), the sink's database (--dsn/--db) "
        "and/or the engine for image files that have none. Every model is stored as a version with its "
        "training keys, settings and metrics; all versions of a collection are scored on a held-out set "
        "none of them trained on, the best --keep are kept and best_models.json points at the winner. "
        "Exit codes: 0 every collection promoted or kept, 1 some collection skipped or failed, 2 usage.")
    data = p.add_argument_group("data")
    data.add_argument("--labels", type=Path, action="append", default=[], required=True, metavar="FILE",
                      help="Labels: .csv, .jsonl or .parquet with columns collection_id, key, label "
                      "(1/0/true/false), optional image (a path, relative to the file). Repeatable.")
    data.add_argument("--results", type=Path, action="append", default=[], metavar="FILE",
                      help="Result events, one JSON per line (imgstream submit --wait --json). Repeatable.")
    data.add_argument("--db", action="store_true",
                      help="Read embeddings from the sink's PostgreSQL tables (implied by --dsn or --data-dir).")
    data.add_argument("--dsn", help="PostgreSQL URI of the sink's database (env IMGSTREAM_SINK__DSN).")
    data.add_argument("--data-dir", metavar="DIR",
                      help="The embedded database's data directory (default .imgstream/pgdata).")
    data.add_argument("--key", default="request_id",
                      help="What the labels' key matches: request_id (default) or metadata.<field>.")
    data.add_argument("--collection-id", type=int, action="append", default=[], metavar="N",
                      help="Train only these collections (repeatable); a labels file without a collection_id "
                      "column belongs to the single one given.")
    model = p.add_argument_group("model")
    model.add_argument("--embedding-type", default="embed_clip_vit_b_32", metavar="TYPE",
                       help="Features: an embedding operation (default embed_clip_vit_b_32), or a+b "
                       "concatenated in that order.")
    model.add_argument("--region", default="whole_image", choices=list(TARGETS),
                       help="Image region the embeddings are of (default whole_image).")
    model.add_argument("--c-grid", type=_float_list, metavar="C,C,...",
                       help="Regularisation strengths for cross-validation (default 0.01,0.1,1,10).")
    model.add_argument("--cv-folds", type=int, metavar="N", help="Stratified folds (default 5).")
    model.add_argument("--target-precision", type=float, metavar="P",
                       help="Threshold reaching this out-of-fold precision (highest recall); default: max F1.")
    model.add_argument("--seed", type=int, metavar="N",
                       help="Seed of the folds, the held-out draw and the solver (default 42).")
    bake = p.add_argument_group("bake-off and versions")
    bake.add_argument("--metric", choices=list(get_args(RankMetric)),
                      help="Held-out metric that ranks versions (default average_precision).")
    bake.add_argument("--keep", type=int, metavar="N", help="Versions kept per collection (default 10).")
    bake.add_argument("--holdout-fraction", type=float, metavar="F",
                      help="Share of each class held out, 0..0.5 (default 0.2).")
    bake.add_argument("--min-holdout", type=int, metavar="N",
                      help="Held-out positives and negatives needed for a bake-off (default 5).")
    bake.add_argument("--min-examples", type=int, metavar="N",
                      help="Positives and negatives with embeddings needed to train (default 5).")
    bake.add_argument("--prune-grace", type=float, metavar="S",
                      help="Seconds a pruned version's model file stays readable (default 3600).")
    out = p.add_argument_group("output")
    out.add_argument("--classifiers-dir", "--out", dest="classifiers_dir", metavar="DIR",
                     help="Classifier folder with best_models.json (env IMGSTREAM_MODELS__CLASSIFIERS_DIR; "
                     "default trained_classifiers).")
    out.add_argument("--report", type=Path, metavar="PATH", help="Write the run's JSON report here.")
    out.add_argument("--no-progress", action="store_true", help="No progress bar on stderr.")
    out.add_argument("--log-level", default="WARNING", metavar="LEVEL", help="DEBUG, INFO, WARNING (default).")
    add_log_format(out)
    engine = p.add_argument_group("engine (for image files without embeddings)")
    engine.add_argument("--weights", choices=["pretrained", "random"], help="Embedding model weights.")
    engine.add_argument("--device", help="auto (default), cpu, cuda or cuda:N.")


def _float_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return values


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    training = {"c_grid": args.c_grid, "cv_folds": args.cv_folds, "target_precision": args.target_precision,
                "seed": args.seed, "rank_metric": args.metric, "keep_versions": args.keep,
                "holdout_fraction": args.holdout_fraction, "min_holdout_per_class": args.min_holdout,
                "min_examples_per_class": args.min_examples, "prune_grace_s": args.prune_grace}
    return {"training": training, "sink": {"dsn": args.dsn, "data_dir": args.data_dir},
            "models": {"classifiers_dir": args.classifiers_dir, "weights": args.weights, "device": args.device},
            "log_format": args.log_format}


def _run(args: argparse.Namespace) -> int:
    from imgstream.training.pipeline import RunInputs

    config = load_config(_overrides(args))
    inputs = RunInputs(labels=args.labels, results=args.results,
                       use_database=bool(args.db or args.dsn or args.data_dir), key_field=args.key,
                       collection_ids=args.collection_id, embedding_type=args.embedding_type, region=args.region,
                       progress=not args.no_progress)
    return run_command(config, inputs, args.report, args.log_level)


def run_command(config: WorkerConfig, inputs: Any, report_path: Path | None = None, log_level: str = "WARNING") -> int:
    """0 when every collection was promoted or kept, 1 when one was skipped or failed, 2 for usage errors."""
    from imgstream.training.pipeline import UsageError, run_training
    from imgstream.training.registry import RegistryLocked
    from imgstream.training.report import notes_text, summary_table, write_report

    if config.log_format == "json":
        from imgstream.service.logs import setup_logging

        setup_logging(log_level, "json")
    else:
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


COMMANDS = {"train-classifiers": Command(_configure, _run)}
