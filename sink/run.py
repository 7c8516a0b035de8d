"""`imgstream sink pgvector`: check the login, start the embedded database if there is no DSN, serve the
HTTP port, then sink until a signal."""

from __future__ import annotations

import asyncio
import logging

from imgstream.kafka_clients import check_login
from imgstream.schemas.config import KafkaConfig, SinkConfig, WorkerConfig
from imgstream.service.logs import setup_logging
from imgstream.service.tracing import NO_TRACING, Tracing, start_tracing
from imgstream.sink.database import DatabaseGaveUp
from imgstream.sink.pgvector import PgVectorSink

log = logging.getLogger("imgstream.sink")

EXIT_DATABASE_GONE = 1


async def run_sink(kafka: KafkaConfig, sink: SinkConfig, tracing: Tracing = NO_TRACING) -> int:
    await check_login(kafka)  # a refused login or certificate ends the start now, before the database waits
    dsn = sink.database_uri()
    if dsn is None:
        from imgstream.sink.embedded_pg import start_embedded_postgres

        embedded = await asyncio.to_thread(start_embedded_postgres, sink.data_dir)
        dsn = embedded.uri
        print(f"embedded PostgreSQL with pgvector\n  data dir: {embedded.data_dir}\n  dsn: {dsn}", flush=True)
    sink_loop = PgVectorSink(kafka, sink, dsn, tracing=tracing)
    sink_loop.install_signal_handlers()
    runner = None
    if sink.http_port is not None:
        from imgstream.service.health import build_app, start_server

        runner = await start_server(build_app(sink_loop.metrics, sink_loop.ready, operations=False),
                                    sink.http_port, sink.http_host)
    try:
        await sink_loop.run()
    except DatabaseGaveUp as exc:
        log.error("giving up: %s", exc)
        return EXIT_DATABASE_GONE
    finally:
        if runner is not None:
            await runner.cleanup()
    return 0


def main(config: WorkerConfig) -> int:
    setup_logging(config.log_level, config.log_format)
    tracing = start_tracing(config.tracing, "imgstream-sink")
    try:
        return asyncio.run(run_sink(config.kafka, config.sink, tracing))
    finally:
        tracing.shutdown()
