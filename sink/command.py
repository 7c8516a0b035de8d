"""`imgstream sink pgvector` and `imgstream search`: their flags; psycopg and torch load only when they run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from imgstream.schemas.config import load_config
from imgstream.schemas.flags import EXIT_USAGE, Command, add_bootstrap, add_http, add_log_format
from imgstream.schemas.operations import OPERATIONS, TARGETS


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    sink = {"dsn": args.dsn, "data_dir": args.data_dir, "group": getattr(args, "group", None),
            "batch_max_records": getattr(args, "batch_size", None), "batch_max_ms": getattr(args, "batch_ms", None),
            "http_port": getattr(args, "http_port", None), "http_host": getattr(args, "http_host", None)}
    return {"kafka": {"bootstrap": getattr(args, "bootstrap", None)}, "sink": sink,
            "models": {"weights": getattr(args, "weights", None), "device": getattr(args, "device", None)},
            "log_level": getattr(args, "log_level", None), "log_format": getattr(args, "log_format", None)}


def _configure_sink(p: argparse.ArgumentParser) -> None:
    ssub = p.add_subparsers(dest="sink_command", required=True, metavar="TARGET")
    pv = ssub.add_parser("pgvector", help="Consume results into PostgreSQL with pgvector (upsert by event_id).",
                         description="Embeddings go into emb_<type> tables (vector + HNSW cosine index), other "
                         "results into the JSONB table `results`. Offsets are committed after the database "
                         "commit. Without --dsn the embedded PostgreSQL (pgserver) starts on --data-dir. "
                         "SIGTERM/SIGINT finish the current batch, commit, and exit 0.")
    pv.add_argument("--dsn", help="PostgreSQL URI (env IMGSTREAM_SINK__DSN); default: the embedded server.")
    pv.add_argument("--data-dir", help="Embedded server's data directory (default .imgstream/pgdata).")
    add_bootstrap(pv)
    pv.add_argument("--group", help="Consumer group (default imgstream-sink).")
    pv.add_argument("--batch-size", type=int, help="Write a batch at this many records (default 500).")
    pv.add_argument("--batch-ms", type=float,
                    help="Write a batch at the latest this many ms after its first record (default 500).")
    add_http(pv, "/healthz /readyz /metrics")
    pv.add_argument("--log-level", help="DEBUG, INFO (default), WARNING.")
    add_log_format(pv)


def _sink(args: argparse.Namespace) -> int:
    from imgstream.sink.run import main  # psycopg is imported only here

    config = load_config(_overrides(args))
    return main(config)


def _configure_search(p: argparse.ArgumentParser) -> None:
    p.description = ("Embeds IMAGE with the engine and prints the nearest stored embeddings of the same type, "
                     "model and weights, nearest first. Exit codes: 0 results, 1 no results or an error, 2 usage.")
    embedding_types = sorted(t for t in OPERATIONS if t.startswith("embed_"))
    p.add_argument("image", metavar="IMAGE", help="Image file to search with.")
    p.add_argument("--type", required=True, choices=embedding_types, help="Embedding operation.")
    p.add_argument("--target", choices=list(TARGETS), default="whole_image",
                   help="Image region to embed (default whole_image).")
    p.add_argument("-k", type=int, default=10, help="How many matches (default 10).")
    p.add_argument("--dsn", help="PostgreSQL URI (env IMGSTREAM_SINK__DSN); default: the embedded server.")
    p.add_argument("--data-dir", help="Embedded server's data directory (default .imgstream/pgdata).")
    p.add_argument("--weights", choices=["pretrained", "random"],
                   help="Weights of the query model; only vectors from the same weights are compared.")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N.")
    p.add_argument("--json", action="store_true", help="One JSON object per match on stdout.")


def _search(args: argparse.Namespace) -> int:
    if not Path(args.image).is_file():
        print(f"imgstream search: {args.image}: no such file", file=sys.stderr)
        return EXIT_USAGE
    if args.k < 1:
        print("imgstream search: -k must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    from imgstream.sink.search import run_search  # torch and psycopg are imported only here

    return run_search(load_config(_overrides(args)), args.image, args.type, args.target, args.k, args.json)


COMMANDS = {"sink": Command(_configure_sink, _sink), "search": Command(_configure_search, _search)}
