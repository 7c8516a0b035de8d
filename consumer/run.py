"""`imgstream worker`: load the models, serve the HTTP port, run the worker until SIGTERM."""

from __future__ import annotations

import gc
import logging

from imgstream.analysis.engine import Engine
from imgstream.consumer.metrics import WorkerMetrics
from imgstream.consumer.worker import Worker
from imgstream.kafka_clients import KafkaSetupError, check_login
from imgstream.schemas.config import WorkerConfig
from imgstream.service import loops
from imgstream.service.health import build_app, start_server
from imgstream.service.logs import setup_logging
from imgstream.service.loops import LoopUnavailable, loop_factory
from imgstream.service.signals import EarlyStop
from imgstream.service.tracing import NO_TRACING, Tracing, start_tracing

log = logging.getLogger("imgstream.worker")


EXIT_STARTUP_FAILED = 1


async def run_worker(config: WorkerConfig, early: EarlyStop | None = None, tracing: Tracing = NO_TRACING) -> int:
    try:
        engine = Engine(config.models)
    except RuntimeError as exc:  # device selection: no GPU where one is required, bad device name
        log.error("cannot start: %s", exc)
        return EXIT_STARTUP_FAILED
    metrics = WorkerMetrics()
    worker = Worker(config, engine, metrics, tracing)
    worker.install_signal_handlers()
    for name in early.signals if early else ():  # stop signals that came while the process started
        worker.request_stop(name)
    runner = None
    if config.http_port is not None:
        app = build_app(metrics, lambda: {"models_loaded": engine.ready, "broker_reachable": worker.broker_reachable})
        runner = await start_server(app, config.http_port, config.http_host)
    try:
        # Before the models load (that can take minutes): a refused login or certificate ends the start now.
        try:
            await check_login(config.kafka)
        except KafkaSetupError as exc:
            log.error("cannot start: %s", exc.message)
            return EXIT_STARTUP_FAILED
        log.info("loading models %s (weights=%s, device=%s)", config.models.preload, config.models.weights,
                 engine.device)
        try:
            await engine.start()
        except Exception as exc:  # noqa: BLE001 - any load failure: say what to do, exit non-zero
            log.error("cannot load the models (weights=%s): %s. Machines without the pretrained weights can run "
                      "--weights random; local copies go in models.clip_weights_path, models.dino_model, "
                      "models.caption_model, models.person_weights_path.", config.models.weights, exc)
            return EXIT_STARTUP_FAILED
        if worker.stopping.is_set():
            return 0
        # What startup made (modules, models: some 220,000 objects) lives as long as the worker: frozen,
        # out of the collector's sight, a full collection walks only what requests made. Unfrozen, each
        # of W4's full collections took 0.1 s of the event loop (a pause; 6% of its CPU over 10,000 requests).
        gc.collect()
        gc.freeze()
        await worker.run()
    finally:
        await engine.close()
        if runner is not None:
            await runner.cleanup()
    # The cluster refused a login, certificate, permission or topic: the log says what to change.
    return EXIT_STARTUP_FAILED if worker.failure is not None else 0


def main(config: WorkerConfig, early: EarlyStop | None = None) -> int:
    setup_logging(config.log_level, config.log_format)
    try:
        loop_factory(config.event_loop)  # event_loop=uvloop without uvloop: say so before loading anything
    except LoopUnavailable as exc:
        log.error("cannot start: %s", exc)
        return EXIT_STARTUP_FAILED
    tracing = start_tracing(config.tracing, "imgstream-worker")
    try:
        return loops.run(run_worker(config, early, tracing), config.event_loop)
    finally:
        tracing.shutdown()  # exports the spans still buffered
