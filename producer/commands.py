"""The commands a crawler or an operator runs without the worker: broker, topics, check, operations, submit,
caption-folder, replay. Nothing here imports torch."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from imgstream.schemas.config import WorkerConfig, load_config
from imgstream.schemas.flags import (
    EXIT_OK,
    EXIT_RESULT_ERRORS,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    Command,
    add_bootstrap,
    overrides,
)


def _configure_broker(p: argparse.ArgumentParser) -> None:
    p.description = "Run the embedded broker in the foreground; prints its bootstrap address."
    p.add_argument("--port", type=int, default=None, help="Port to listen on (default: a free port).")


def _broker(args: argparse.Namespace) -> int:
    from imgstream.producer.embedded_broker import run_foreground

    return run_foreground(args.port)


def _configure_topics(p: argparse.ArgumentParser) -> None:
    tsub = p.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    tc = tsub.add_parser("create", help="Create the requests, replay, results, DLQ and retry topics (idempotent).",
                         description="Creates each topic that does not exist yet with its partitions, retention.ms, "
                         "compression.type and max.message.bytes (IMGSTREAM_KAFKA__TOPIC_SETTINGS__<TOPIC>__*, "
                         "see docs/DEPLOY.md). Existing topics are left alone; where one differs from its "
                         "settings, the difference is printed.")
    add_bootstrap(tc)
    tc.add_argument("--partitions", type=int,
                    help="Partitions for every topic (default: per topic, 12 each and 1 for the DLQ).")
    tc.add_argument("--replication", type=int, default=1, help="Replication factor (default 1; 3 in production).")


def _topics(args: argparse.Namespace) -> int:
    from imgstream.producer.topics import create_topics, topic_differences, topic_plans

    if args.partitions is not None and args.partitions < 1:
        print("imgstream topics create: --partitions must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    kafka = load_config(overrides(args)).kafka
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


def _configure_check(p: argparse.ArgumentParser) -> None:
    p.description = ("Connects with the kafka.* settings (flags and IMGSTREAM_KAFKA__*) and prints one line per "
                     "check: whether it could connect and authenticate; whether each topic exists with the "
                     "partitions and settings `topics create` would give it; whether this principal may read and "
                     "write it (as the broker reports, else probed without writing a record). Exit codes: 0 "
                     "everything holds, 1 something does not, 2 usage, 4 no broker answered.")
    add_bootstrap(p)


def _check(args: argparse.Namespace) -> int:
    from imgstream.producer.check import run_check

    report = asyncio.run(run_check(load_config(overrides(args)).kafka))
    print(report.render())
    return EXIT_OK if report.ok else EXIT_RESULT_ERRORS


def _operations(_: argparse.Namespace) -> int:
    from imgstream.schemas.operations import describe_operations

    sys.stdout.write(orjson.dumps(describe_operations(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return EXIT_OK


def _configure_submit(p: argparse.ArgumentParser) -> None:
    p.description = "Publish one request per image; local files travel as file:// references."
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
    add_bootstrap(p)


def _tasks_from_args(args: argparse.Namespace) -> list[Any]:
    """The tasks of `--task TYPE[:TARGET]` (repeatable) followed by those of `--tasks-json`."""
    from imgstream.producer.submit import parse_task_spec, parse_tasks_json

    tasks = [parse_task_spec(spec) for spec in args.task]
    if args.tasks_json:
        tasks += parse_tasks_json(args.tasks_json)
    return tasks


def _blob_store(args: argparse.Namespace, config: WorkerConfig) -> Any:
    """The blob store local files go to: --blob-dir, else the configured one (a directory or s3://)."""
    from imgstream.blobs import open_blob_store

    return open_blob_store(args.blob_dir or config.blobs.dir, s3_endpoint_url=config.blobs.s3_endpoint_url,
                           s3_region=config.blobs.s3_region)


def _submit(args: argparse.Namespace) -> int:
    from imgstream.producer.submit import build_requests, expand_inputs, read_input_list, results_table, submit
    from imgstream.service.tracing import start_tracing

    config = load_config(overrides(args))
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
    tracing = start_tracing(config.tracing, "imgstream-submit")
    try:
        results, missing = asyncio.run(submit(config.kafka, topics.requests, topics.results, requests, wait=args.wait,
                                              timeout_s=args.timeout, progress=not args.no_progress, tracing=tracing))
    finally:
        tracing.shutdown()
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


def _configure_caption_folder(p: argparse.ArgumentParser) -> None:
    p.description = ("Submits a describe_image request per image, waits, writes <name>.txt beside each image. "
                     "Images that already have one are skipped unless --force.")
    p.add_argument("folder", metavar="DIR", help="Folder of images.")
    p.add_argument("--max-length", type=int, default=50, help="Maximum new tokens per caption (1..512, default 50).")
    p.add_argument("--force", action="store_true", help="Caption images that already have a .txt file.")
    p.add_argument("--recursive", action="store_true", help="Include images in subfolders.")
    p.add_argument("--timeout", type=float, default=1800.0, help="Seconds to wait for captions (default 1800).")
    p.add_argument("--blob-dir", help="Blob store directory (default .imgstream/blobs).")
    p.add_argument("--in-place", action="store_true", help="Reference images where they are (shared volume).")
    p.add_argument("--no-progress", action="store_true", help="No progress display on stderr.")
    add_bootstrap(p)


def _caption_folder(args: argparse.Namespace) -> int:
    from imgstream.producer.caption_folder import caption_folder

    config = load_config(overrides(args))
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


def _parse_time(text: str) -> Any:
    from datetime import datetime, timezone

    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _configure_replay(p: argparse.ArgumentParser) -> None:
    p.description = ("Reads the requests topic (without committing anything), selects requests by time range, "
                     "offsets and/or request_id prefix, optionally replaces their tasks, and publishes them to the "
                     "replay topic, where workers pick them up. Results of replayed requests carry "
                     "\"replayed\": true and the original event_ids.")
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
    add_bootstrap(p)


def _replay(args: argparse.Namespace) -> int:
    from imgstream.producer.replay import Selection, parse_offsets, replay

    config = load_config(overrides(args))
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


def _no_arguments(_: argparse.ArgumentParser) -> None:
    pass


COMMANDS = {
    "broker": Command(_configure_broker, _broker),
    "topics": Command(_configure_topics, _topics),
    "check": Command(_configure_check, _check),
    "operations": Command(_no_arguments, _operations),
    "submit": Command(_configure_submit, _submit),
    "caption-folder": Command(_configure_caption_folder, _caption_folder),
    "replay": Command(_configure_replay, _replay),
}
