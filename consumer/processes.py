"""`imgstream worker --processes N`: N worker processes of one group on this host, each with its own event
loop, for when one process's loop cannot feed the host's devices (docs/DEPLOY.md "More than one process").

The supervisor starts the workers (spawned: each imports torch and loads its models itself), hands each
its own HTTP port (`http_port + i`) and client id, passes stop signals on, and waits: every worker
drains and commits on its own. A worker that exits while the others run stops them all, and the
supervisor exits with its status, so an orchestrator restarts the whole set, as it would one worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time

from imgstream.schemas.config import WorkerConfig
from imgstream.service.signals import STOP_SIGNALS

log = logging.getLogger("imgstream.worker")

POLL_S = 0.2
# After the first stop signal the workers drain (drain_timeout_s); past that, and a margin, they are killed.
KILL_MARGIN_S = 15.0


def child_config(config: WorkerConfig, index: int) -> WorkerConfig:
    """Worker `index`'s settings: one process, its own HTTP port and client id."""
    port = config.http_port + index if config.http_port is not None else None
    kafka = config.kafka.model_copy(update={"client_id": f"{config.kafka.client_id}-{index}"})
    return config.model_copy(update={"processes": 1, "http_port": port, "kafka": kafka})


def _child(config: WorkerConfig, processes: int) -> None:
    """A worker process's entry: the settings as the supervisor resolved them, and the host's CPU cores shared."""
    from imgstream.service.signals import EarlyStop

    early = EarlyStop().install()  # a stop while torch imports and the models load: exit cleanly
    import torch

    from imgstream.consumer.run import main

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
    raise SystemExit(main(config, early))


def supervise(config: WorkerConfig, stop_signals: list[str] | None = None) -> int:
    """Run `config.processes` workers until a stop signal (or one exits); the worst exit status of them."""
    context = multiprocessing.get_context("spawn")
    workers = []
    for index in range(config.processes):
        process = context.Process(target=_child, args=(child_config(config, index), config.processes),
                                  name=f"imgstream-worker-{index}")
        process.start()
        workers.append(process)
    ports = (f"; HTTP ports {config.http_port}-{config.http_port + config.processes - 1}"
             if config.http_port is not None else "")
    log.info("started %d worker processes (pids %s)%s", len(workers), ", ".join(str(w.pid) for w in workers), ports)
    stopping_since: list[float] = []

    def forward(signum: int, _frame: object) -> None:
        if not stopping_since:
            stopping_since.append(time.monotonic())
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    for name in stop_signals or ():  # signals that came while the supervisor started
        forward(signal.Signals[name], None)
    try:
        while any(w.is_alive() for w in workers):
            first_gone = next((w for w in workers if not w.is_alive()), None)
            if first_gone is not None and not stopping_since:
                log.warning("worker process %s exited with %s; stopping the others", first_gone.pid,
                            first_gone.exitcode)
                forward(signal.SIGTERM, None)
            if stopping_since and time.monotonic() - stopping_since[0] > config.drain_timeout_s + KILL_MARGIN_S:
                for worker in workers:
                    if worker.is_alive():
                        worker.kill()
            time.sleep(POLL_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [w.exitcode or 0 for w in workers]
    log.info("worker processes stopped (exit statuses %s)", ", ".join(str(c) for c in codes))
    return max((c if c > 0 else 1 for c in codes if c != 0), default=0)
