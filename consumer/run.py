"""`imgstream worker`: load the models, serve the HTTP port, run the worker until SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from analysis.engine import Engine
from consumer.health import build_app, start_server
from consumer.logs import setup_logging
from consumer.metrics import WorkerMetrics
from consumer.worker import Worker
from schemas.config import WorkerConfig

log = logging.getLogger("imgstream.worker")


async def run_worker(config: WorkerConfig) -> int:
    engine = Engine(config.models)
    metrics = WorkerMetrics()
    worker = Worker(config, engine, metrics)
    worker.install_signal_handlers()
    runner = None
    if config.http_port is not None:
        app = build_app(metrics, lambda: {"models_loaded": engine.ready, "broker_reachable": worker.broker_reachable})
        runner = await start_server(app, config.http_port)
    try:
        log.info("loading models %s (weights=%s, device=%s)", config.models.preload, config.models.weights,
                 engine.device)
        await engine.start()
        if worker.stopping.is_set():
            return 0
        await worker.run()
    finally:
        await engine.close()
        if runner is not None:
            await runner.cleanup()
    return 0


def main(config: WorkerConfig) -> int:
    setup_logging(config.log_level)
    return asyncio.run(run_worker(config))
