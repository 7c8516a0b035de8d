"""The `imgstream` command line. torch, psycopg and scikit-learn are imported only by the commands that use them."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import sys
from pathlib import Path
from typing import Any, Sequence

import orjson

from imgstream.kafka_clients.errors import BrokerUnreachable, KafkaSetupError
from imgstream.schemas.config import ConfigError, load_config

EXIT_OK, EXIT_RESULT_ERRORS, EXIT_USAGE, EXIT_TIMEOUT, EXIT_KAFKA = 0, 1, 2, 3, 4


def _add_bootstrap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", help="Kafka bootstrap servers host:port (env IMGSTREAM_KAFKA__BOOTSTRAP).")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """CLI flags as a nested config override; unset flags leave env/defaults alone."""
    kafka: dict[str, Any] = {"bootstrap": getattr(args, "bootstrap", None), "group": getattr(args, "group", None)}
    models: dict[str, Any] = {"weights": getattr(args, "weights", None), "device": getattr(args, "device", None)}
    if getattr(args, "require_gpu", False):
        models["require_gpu"] = True
    fetch: dict[str, Any] = {}
    if getattr(args, "allow_private_addresses", False):
        fetch["allow_private_addresses"] = True
    if getattr(args, "blob_root", None):
        fetch["blob_roots"] = args.blob_root
    return {
        "kafka": kafka,
        "models": models,
        "fetch": fetch,
        "http_port": getattr(args, "http_port", None),
        "http_host": getattr(args, "http_host", None),
        "max_in_flight": getattr(args, "max_in_flight", None),
        "max_in_flight_image_bytes": getattr(args, "max_in_flight_image_bytes", None),
        "replay_share": getattr(args, "replay_share", None),
        "log_level": getattr(args, "log_level", None),
    }


def _add_sink_and_search_parsers(sub: Any) -> None:
    from imgstream.schemas.operations import OPERATIONS, TARGETS

    p = sub.add_parser("sink", help="Store the results topic in a database.")
    ssub = p.add_subparsers(dest="sink_command", required=True, metavar="TARGET")
    pv = ssub.add_parser("pgvector", help="Consume results into PostgreSQL with pgvector (upsert by event_id).",
                         description="Embeddings go into emb_<type> tables (vector + HNSW cosine index), other "
                         "results into the JSONB table `results`. Offsets are committed after the database "
                         "commit. Without --dsn the embedded PostgreSQL (pgserver) starts on --data-dir. "
                         "SIGTERM/SIGINT finish the current batch, commit, and exit 0.")
    pv.add_argument("--dsn", help="PostgreSQL URI (env IMGSTREAM_SINK__DSN); default: the embedded server.")
    pv.add_argument("--data-dir", help="Embedded server's data directory (default .imgstream/pgdata).")
    _add_bootstrap(pv)
    pv.add_argument("--group", help="Consumer group (default imgstream-sink).")
    pv.add_argument("--batch-size", type=int, help="Write a batch at this many records (default 500).")
    pv.add_argument("--batch-ms", type=float,
                    help="Write a batch at the latest this many ms after its first record (default 500).")
    pv.add_argument("--http-port", type=int, help="Serve /healthz /readyz /metrics on this port.")
    pv.add_argument("--http-host", help="Address the HTTP port binds to (default 127.0.0.1; 0.0.0.0: every "
                    "interface, e.g. in a container).")
    pv.add_argument("--log-level", help="DEBUG, INFO (default), WARNING.")

    embedding_types = sorted(t for t in OPERATIONS if t.startswith("embed_"))
    p = sub.add_parser("search", help="Find the stored images nearest to an image (pgvector, cosine distance).",
                       description="Embeds IMAGE with the engine and prints the nearest stored embeddings of the "
                       "same type, model and weights, nearest first. Exit codes: 0 results, 1 no results or an "
                       "error, 2 usage.")
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


def _add_train_parser(sub: Any) -> None:
    from typing import get_args

    from imgstream.schemas.config import RankMetric
    from imgstream.schemas.operations import TARGETS

    p = sub.add_parser(
        "train-classifiers", help="Train collection classifiers, bake them off against stored versions, "
        "point best_models.json at the winners.",
        description="Trains one classifier per collection in the labels (rows of collection_id, key, label and "
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgstream",
        description="Streaming image analysis on Kafka: requests in, one result event per task out.",
        epilog="Configuration: flags override IMGSTREAM_* environment variables "
        "(nested with '__', e.g. IMGSTREAM_KAFKA__BOOTSTRAP, IMGSTREAM_MODELS__WEIGHTS).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("broker", help="Run the embedded Kafka-compatible broker (Tansu) on loopback.",
                       description="Run the embedded broker in the foreground; prints its bootstrap address.")
    p.add_argument("--port", type=int, default=None, help="Port to listen on (default: a free port).")

    p = sub.add_parser("topics", help="Manage imgstream's topics.")
    tsub = p.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    tc = tsub.add_parser("create", help="Create the requests, replay, results, DLQ and retry topics (idempotent).",
                         description="Creates each topic that does not exist yet with its partitions, retention.ms, "
                         "compression.type and max.message.bytes (IMGSTREAM_KAFKA__TOPIC_SETTINGS__<TOPIC>__*, "
                         "see docs/DEPLOY.md). Existing topics are left alone; where one differs from its "
                         "settings, the difference is printed.")
    _add_bootstrap(tc)
    tc.add_argument("--partitions", type=int,
                    help="Partitions for every topic (default: per topic, 12 each and 1 for the DLQ).")
    tc.add_argument("--replication", type=int, default=1, help="Replication factor (default 1; 3 in production).")

    p = sub.add_parser("worker", help="Consume requests, run the task engine, publish results.",
                       description="Run a worker of the consumer group until SIGTERM/SIGINT (drains, then exits 0).")
    _add_bootstrap(p)
    p.add_argument("--group", help="Consumer group (default imgstream-workers).")
    p.add_argument("--weights", choices=["pretrained", "random"],
                   help="pretrained: the real weights; random: same architectures, seeded random weights.")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N.")
    p.add_argument("--require-gpu", action="store_true", help="Refuse to start without a GPU.")
    p.add_argument("--http-port", type=int, help="Serve /healthz /readyz /operations /metrics on this port.")
    p.add_argument("--http-host", help="Address the HTTP port binds to (default 127.0.0.1; 0.0.0.0: every "
                   "interface, e.g. in a container).")
    p.add_argument("--max-in-flight", type=int, help="Requests processed at once (default 64).")
    p.add_argument("--max-in-flight-image-bytes", type=int,
                   help="Fetched plus decoded image bytes held in flight (default 512 MiB); at the bound the "
                   "worker pauses its partitions.")
    p.add_argument("--allow-private-addresses", action="store_true",
                   help="Allow image URLs on loopback/private networks (tests, on-premises stores).")
    p.add_argument("--replay-share", type=float, metavar="F",
                   help="0..1: while live requests wait, replayed ones get at most this share of the in-flight "
                   "slots and of each model batch (default 0.2); replay may use everything when live is idle.")
    p.add_argument("--blob-root", action="append", metavar="DIR",
                   help="A directory file:// references may point into (repeatable; env IMGSTREAM_FETCH__BLOB_ROOTS "
                   "as a JSON list). Default: the blob store directory (blobs.dir, .imgstream/blobs); anything "
                   "outside is refused.")
    p.add_argument("--log-level", help="DEBUG, INFO (default), WARNING.")

    sub.add_parser("operations", help="Print the operation registry as JSON.")

    p = sub.add_parser("check", help="Preflight a cluster: login, topics, and read/write access to each.",
                       description="Connects with the kafka.* settings (flags and IMGSTREAM_KAFKA__*) and prints one "
                       "line per check: whether it could connect and authenticate; whether each topic exists with "
                       "the partitions and settings `topics create` would give it; whether this principal may read "
                       "and write it (as the broker reports, else probed without writing a record). Exit codes: "
                       "0 everything holds, 1 something does not, 2 usage, 4 no broker answered.")
    _add_bootstrap(p)

    p = sub.add_parser("submit", help="Submit images (files, folders, URLs) for analysis.",
                       description="Publish one request per image; local files travel as file:// references.")
    p.add_argument("inputs", nargs="+", metavar="PATH_OR_URL",
                   help="Image files, folders (recursive) or http(s) URLs; '-' reads a list from stdin.")
    p.add_argument("--task", action="append", default=[], metavar="TYPE[:TARGET]",
                   help="A task, e.g. detect_bounding_box:prominent_face (repeatable).")
    p.add_argument("--tasks-json", help="Tasks as a JSON list of {operation_id, type, params}.")
    p.add_argument("--metadata-json", help="A JSON object echoed on every result.")
    p.add_argument("--wait", action="store_true", help="Wait for every result and print them.")
    p.add_argument("--json", action="store_true", help="With --wait: one result event per line on stdout.")
    p.add_argument("--timeout", type=float, default=300.0, help="Seconds to wait for results (default 300).")
    p.add_argument("--no-progress", action="store_true", help="No progress display on stderr.")
    p.add_argument("--blob-dir", help="Blob store local files are copied into: a directory or s3://bucket/prefix "
                   "(default .imgstream/blobs; env IMGSTREAM_BLOBS__DIR). Workers must see the same store.")
    p.add_argument("--in-place", action="store_true",
                   help="Reference local files where they are instead of copying them to the blob store.")
    _add_bootstrap(p)

    p = sub.add_parser("caption-folder", help="Write a caption <name>.txt beside every image of a folder.",
                       description="Submits a describe_image request per image, waits, writes <name>.txt beside "
                       "each image. Images that already have one are skipped unless --force.")
    p.add_argument("folder", metavar="DIR", help="Folder of images.")
    p.add_argument("--max-length", type=int, default=50, help="Maximum new tokens per caption (1..512, default 50).")
    p.add_argument("--force", action="store_true", help="Caption images that already have a .txt file.")
    p.add_argument("--recursive", action="store_true", help="Include images in subfolders.")
    p.add_argument("--timeout", type=float, default=1800.0, help="Seconds to wait for captions (default 1800).")
    p.add_argument("--blob-dir", help="Blob store directory (default .imgstream/blobs).")
    p.add_argument("--in-place", action="store_true", help="Reference images where they are (shared volume).")
    p.add_argument("--no-progress", action="store_true", help="No progress display on stderr.")
    _add_bootstrap(p)

    p = sub.add_parser("replay", help="Re-publish selected requests to the replay topic (e.g. after a model change).",
                       description="Reads the requests topic (without committing anything), selects requests by "
                       "time range, offsets and/or request_id prefix, optionally replaces their tasks, and "
                       "publishes them to the replay topic, where workers pick them up. Results of replayed "
                       "requests carry \"replayed\": true and the original event_ids.")
    p.add_argument("--since", type=_parse_time, help="Only requests published at or after this ISO time.")
    p.add_argument("--until", type=_parse_time, help="Only requests published before this ISO time.")
    p.add_argument("--offsets", help="PARTITION:START[-END],... (END exclusive), e.g. 0:100-200,1:0-")
    p.add_argument("--request-id-prefix", help="Only requests whose request_id starts with this.")
    p.add_argument("--limit", type=int, help="Replay at most this many requests.")
    p.add_argument("--task", action="append", default=[], metavar="TYPE[:TARGET]",
                   help="Replace the tasks with these (repeatable), e.g. embed_clip_vit_b_32.")
    p.add_argument("--tasks-json", help="Replace the tasks with this JSON list.")
    p.add_argument("--dry-run", action="store_true", help="Print what would be replayed; publish nothing.")
    p.add_argument("--no-progress", action="store_true", help="No progress lines on stderr.")
    _add_bootstrap(p)
    _add_sink_and_search_parsers(sub)
    _add_train_parser(sub)
    return parser


def _cmd_broker(args: argparse.Namespace) -> int:
    from imgstream.producer.embedded_broker import run_foreground

    return run_foreground(args.port)


def _cmd_topics(args: argparse.Namespace) -> int:
    from imgstream.producer.topics import create_topics, topic_differences, topic_plans

    if args.partitions is not None and args.partitions < 1:
        print("imgstream topics create: --partitions must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    kafka = load_config(_overrides(args)).kafka
    plans = topic_plans(kafka.topics, kafka.topic_settings, partitions=args.partitions,
                        max_message_bytes=kafka.max_message_bytes)

    async def create_and_compare() -> tuple[list[str], dict[str, list[str]]]:
        created = await create_topics(kafka, kafka.topics, args.partitions, args.replication,
                                      max_message_bytes=kafka.max_message_bytes, settings=kafka.topic_settings)
        existing = [plan for plan in plans if plan.name not in created]
        return created, (await topic_differences(kafka, existing) if existing else {})

    created, differences = asyncio.run(create_and_compare())
    for plan in plans:
        settings = ", ".join([f"{plan.partitions} partitions"] + [f"{k}={v}" for k, v in plan.configs.items()])
        if plan.name in created:
            print(f"{plan.name}: created ({settings})")
        elif differences.get(plan.name):
            print(f"{plan.name}: exists, differs from its settings: {'; '.join(differences[plan.name])}")
        else:
            print(f"{plan.name}: exists")
    return EXIT_OK


def _cmd_worker(args: argparse.Namespace) -> int:
    from imgstream.service.signals import EarlyStop

    early = EarlyStop().install()  # importing torch and loading models take seconds
    from imgstream.consumer.command import main as worker_main  # torch is imported only here

    return worker_main(load_config(_overrides(args)), early)


def _cmd_check(args: argparse.Namespace) -> int:
    from imgstream.producer.check import run_check

    report = asyncio.run(run_check(load_config(_overrides(args)).kafka))
    print(report.render())
    return EXIT_OK if report.ok else EXIT_RESULT_ERRORS


def _cmd_operations(_: argparse.Namespace) -> int:
    from imgstream.schemas.operations import describe_operations

    sys.stdout.write(orjson.dumps(describe_operations(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK


def _tasks_from_args(args: argparse.Namespace) -> list[Any]:
    """The tasks of `--task TYPE[:TARGET]` (repeatable) followed by those of `--tasks-json`."""
    from imgstream.producer.submit import parse_task_spec, parse_tasks_json

    tasks = [parse_task_spec(spec) for spec in args.task]
    if args.tasks_json:
        tasks += parse_tasks_json(args.tasks_json)
    return tasks


def _blob_store(args: argparse.Namespace, config: Any) -> Any:
    """The blob store local files go to: --blob-dir, else the configured one (a directory or s3://)."""
    from imgstream.blobs import open_blob_store

    return open_blob_store(args.blob_dir or config.blobs.dir, s3_endpoint_url=config.blobs.s3_endpoint_url,
                           s3_region=config.blobs.s3_region)


def _cmd_submit(args: argparse.Namespace) -> int:
    from imgstream.producer.submit import build_requests, expand_inputs, read_input_list, results_table, submit

    config = load_config(_overrides(args))
    try:
        tasks = _tasks_from_args(args)
        if not tasks:
            raise ValueError("give at least one --task TYPE[:TARGET] or --tasks-json")
        metadata = orjson.loads(args.metadata_json) if args.metadata_json else None
        inputs = [i for item in args.inputs for i in (read_input_list(sys.stdin) if item == "-" else [item])]
        store = None if args.in_place else _blob_store(args, config)
        images = expand_inputs(inputs, store)
        if not images:
            raise ValueError("no images found in the given inputs")
        requests = build_requests(images, tasks, metadata)
    except (ValueError, FileNotFoundError) as exc:
        print(f"imgstream submit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    topics = config.kafka.topics
    results, missing = asyncio.run(submit(config.kafka, topics.requests, topics.results, requests,
                                          wait=args.wait, timeout_s=args.timeout, progress=not args.no_progress))
    if not args.wait:
        for outgoing, image in zip(requests, images):
            print(f"{outgoing.request.request_id}\t{image.source}")
        return EXIT_OK
    if args.json:
        for result in results:
            sys.stdout.write(result.model_dump_json() + "\n")
    else:
        sources = {o.request.request_id: i.source for o, i in zip(requests, images)}
        print(results_table(results, sources))
    if missing:
        print(f"imgstream submit: timed out with {missing} results missing", file=sys.stderr)
        return EXIT_TIMEOUT
    errors = sum(r.status == "error" for r in results)
    if errors:
        print(f"imgstream submit: {errors} of {len(results)} results are errors", file=sys.stderr)
        return EXIT_RESULT_ERRORS
    return EXIT_OK


def _cmd_caption_folder(args: argparse.Namespace) -> int:
    from imgstream.producer.caption_folder import caption_folder

    config = load_config(_overrides(args))
    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"imgstream caption-folder: {folder} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    if not 1 <= args.max_length <= 512:
        print("imgstream caption-folder: --max-length must be 1..512", file=sys.stderr)
        return EXIT_USAGE
    try:
        store = None if args.in_place else _blob_store(args, config)
    except ValueError as exc:
        print(f"imgstream caption-folder: {exc}", file=sys.stderr)
        return EXIT_USAGE
    topics = config.kafka.topics
    report = asyncio.run(caption_folder(config.kafka, topics.requests, topics.results, folder,
                                        store=store, max_length=args.max_length, force=args.force,
                                        recursive=args.recursive, timeout_s=args.timeout,
                                        progress=not args.no_progress))
    print(f"captions written: {report.written}, skipped (existing): {report.skipped}, "
          f"failed: {report.failed}, missing (timeout): {report.missing}")
    if report.missing:
        return EXIT_TIMEOUT
    return EXIT_RESULT_ERRORS if report.failed else EXIT_OK


def _parse_time(text: str):
    from datetime import datetime, timezone

    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _cmd_replay(args: argparse.Namespace) -> int:
    from imgstream.producer.replay import Selection, parse_offsets, replay

    config = load_config(_overrides(args))
    try:
        tasks = _tasks_from_args(args)
        selection = Selection(since=args.since, until=args.until,
                              offsets=parse_offsets(args.offsets) if args.offsets else {},
                              request_id_prefix=args.request_id_prefix, limit=args.limit)
    except ValueError as exc:
        print(f"imgstream replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    topics = config.kafka.topics
    try:
        replayed, report = asyncio.run(replay(config.kafka, topics.requests, topics.replay, selection,
                                              tasks or None, dry_run=args.dry_run, progress=not args.no_progress))
    except ValueError as exc:  # e.g. replacement tasks that break the request rules
        print(f"imgstream replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for request in replayed:
        print(f"{request.request_id}\t{request.replay_of}\t{','.join(t.operation_id for t in request.tasks)}")
    verb = "would publish" if args.dry_run else "published"
    print(f"replay: scanned {report.scanned}, invalid {report.invalid}, selected {report.selected}, "
          f"{verb} {len(replayed) if args.dry_run else report.published} to {topics.replay}", file=sys.stderr)
    return EXIT_OK


def _sink_overrides(args: argparse.Namespace) -> dict[str, Any]:
    sink = {"dsn": args.dsn, "data_dir": args.data_dir, "group": getattr(args, "group", None),
            "batch_max_records": getattr(args, "batch_size", None), "batch_max_ms": getattr(args, "batch_ms", None),
            "http_port": getattr(args, "http_port", None), "http_host": getattr(args, "http_host", None)}
    return {"kafka": {"bootstrap": getattr(args, "bootstrap", None)}, "sink": sink,
            "models": {"weights": getattr(args, "weights", None), "device": getattr(args, "device", None)},
            "log_level": getattr(args, "log_level", None)}


def _cmd_sink(args: argparse.Namespace) -> int:
    from imgstream.sink.pgvector import main as sink_main  # psycopg is imported only here

    config = load_config(_sink_overrides(args))
    return sink_main(config.kafka, config.sink, config.log_level)


def _cmd_search(args: argparse.Namespace) -> int:
    if not Path(args.image).is_file():
        print(f"imgstream search: {args.image}: no such file", file=sys.stderr)
        return EXIT_USAGE
    if args.k < 1:
        print("imgstream search: -k must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    from imgstream.sink.search import run_search  # torch and psycopg are imported only here

    return run_search(load_config(_sink_overrides(args)), args.image, args.type, args.target, args.k, args.json)


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    training = {"c_grid": args.c_grid, "cv_folds": args.cv_folds, "target_precision": args.target_precision,
                "seed": args.seed, "rank_metric": args.metric, "keep_versions": args.keep,
                "holdout_fraction": args.holdout_fraction, "min_holdout_per_class": args.min_holdout,
                "min_examples_per_class": args.min_examples, "prune_grace_s": args.prune_grace}
    return {"training": training, "sink": {"dsn": args.dsn, "data_dir": args.data_dir},
            "models": {"classifiers_dir": args.classifiers_dir, "weights": args.weights, "device": args.device}}


def _cmd_train_classifiers(args: argparse.Namespace) -> int:
    # scikit-learn, and torch when image files need embedding, are imported only here
    from imgstream.training.command import run_command
    from imgstream.training.pipeline import RunInputs

    config = load_config(_train_overrides(args))
    inputs = RunInputs(labels=args.labels, results=args.results,
                       use_database=bool(args.db or args.dsn or args.data_dir), key_field=args.key,
                       collection_ids=args.collection_id, embedding_type=args.embedding_type, region=args.region,
                       progress=not args.no_progress)
    return run_command(config, inputs, args.report, args.log_level)


COMMANDS = {
    "broker": _cmd_broker,
    "topics": _cmd_topics,
    "worker": _cmd_worker,
    "operations": _cmd_operations,
    "check": _cmd_check,
    "submit": _cmd_submit,
    "caption-folder": _cmd_caption_folder,
    "replay": _cmd_replay,
    "sink": _cmd_sink,
    "search": _cmd_search,
    "train-classifiers": _cmd_train_classifiers,
}


def _unknown_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> str:
    """A usage message for flags the command does not know, each with the closest one it does."""
    command = parser
    for dest in ("command", "topics_command", "sink_command"):  # down to the parser that ran
        name = getattr(args, dest, None)
        actions = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if name is None or not actions or name not in actions[0].choices:
            break
        command = actions[0].choices[name]
    known = [flag for action in command._actions for flag in action.option_strings]
    flags = [item for item in extra if item.startswith("-")]
    problems = []
    for item in flags or extra:  # a value after an unknown flag is not worth a line of its own
        flag = item.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.5) if flag.startswith("-") else []
        problems.append(f"unknown {'flag' if flag.startswith('-') else 'argument'} {item}"
                        + (f" (did you mean {close[0]}?)" if close else ""))
    return f"{command.prog}: {'; '.join(problems)}; see {command.prog} --help"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        print(_unknown_flags(parser, args, extra), file=sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:  # a bad flag value or IMGSTREAM_* variable, for any command
        print(f"imgstream {args.command}: bad configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KafkaSetupError as exc:  # the cluster refused a login, certificate, permission or topic
        print(f"imgstream {args.command}: {exc.message}", file=sys.stderr)
        return EXIT_KAFKA
    except BrokerUnreachable as exc:
        print(f"imgstream {args.command}: no Kafka broker answered: {exc}", file=sys.stderr)
        return EXIT_KAFKA
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
