"""The command line's face of the configuration: shared flags, exit codes, and flags as config overrides."""

from __future__ import annotations

import argparse
from typing import Any, Callable, NamedTuple

EXIT_OK, EXIT_RESULT_ERRORS, EXIT_USAGE, EXIT_TIMEOUT, EXIT_KAFKA = 0, 1, 2, 3, 4


class Command(NamedTuple):
    """One `imgstream COMMAND`: its arguments and what runs it (an exit code)."""

    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_bootstrap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", help="Kafka bootstrap servers host:port (env IMGSTREAM_KAFKA__BOOTSTRAP).")


def add_http(p: argparse.ArgumentParser, paths: str) -> None:
    p.add_argument("--http-port", type=int, help=f"Serve {paths} on this port.")
    p.add_argument("--http-host", help="Address the HTTP port binds to (default 127.0.0.1; 0.0.0.0: every "
                   "interface, e.g. in a container).")


def add_log_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=["text", "json"],
                   help="text (default): readable lines; json: one JSON object per line, for a log pipeline.")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
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
        "processes": getattr(args, "processes", None),
        "log_level": getattr(args, "log_level", None),
        "log_format": getattr(args, "log_format", None),
    }
