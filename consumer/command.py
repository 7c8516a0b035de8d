"""`imgstream worker`: its flags; the worker itself (and torch) load only when it runs."""

from __future__ import annotations

import argparse

from imgstream.schemas.config import load_config
from imgstream.schemas.flags import Command, add_bootstrap, add_http, add_log_format, overrides


def _configure(p: argparse.ArgumentParser) -> None:
    p.description = "Run a worker of the consumer group until SIGTERM/SIGINT (drains, then exits 0)."
    add_bootstrap(p)
    p.add_argument("--group", help="Consumer group (default imgstream-workers).")
    p.add_argument("--weights", choices=["pretrained", "random"],
                   help="pretrained: the real weights; random: same architectures, seeded random weights.")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N.")
    p.add_argument("--require-gpu", action="store_true", help="Refuse to start without a GPU.")
    add_http(p, "/healthz /readyz /operations /metrics")
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
    p.add_argument("--processes", type=int, metavar="N",
                   help="Worker processes in the group on this host, each with its own event loop and HTTP port "
                   "(--http-port + i); default 1. For hosts where one process cannot feed the devices.")
    p.add_argument("--log-level", help="DEBUG, INFO (default), WARNING.")
    add_log_format(p)


def _run(args: argparse.Namespace) -> int:
    from imgstream.service.signals import EarlyStop

    early = EarlyStop().install()  # importing torch and loading models take seconds
    config = load_config(overrides(args))
    if config.processes > 1:  # a supervisor of worker processes: it imports no torch itself
        from imgstream.consumer.processes import supervise
        from imgstream.service.logs import setup_logging

        setup_logging(config.log_level, config.log_format)
        return supervise(config, early.signals)
    from imgstream.consumer.run import main  # torch is imported only here

    return main(config, early)


COMMANDS = {"worker": Command(_configure, _run)}
