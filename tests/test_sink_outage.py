"""The sink outlasts its database: a real `imgstream sink pgvector` process, a PostgreSQL of its own that
the test stops for a minute under a stream of results, and the sink's HTTP port watched throughout."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from imgstream.sink.embedded_pg import EmbeddedPostgres, start_embedded_postgres
from imgstream.sink.pgvector import PgVectorSink
from imgstream.producer.embedded_broker import find_free_port
from imgstream.schemas.codec import encode
from tests.kafka_helpers import produce
from tests.sink_procs import start_sink, until_ready
from tests.test_observability import parse_prometheus, sample
from tests.test_sink import CLIP_TABLE, committed_total, embedding_result, query, records, sink_configs

OUTAGE_S = 60.0


class OwnPostgres:
    """A pgserver PostgreSQL that only this test uses, so it can be stopped and started again at will
    (the session's `pg` server is shared, and pgserver stops a server when its last user exits)."""

    def __init__(self, parent: Path) -> None:
        self.embedded: EmbeddedPostgres = start_embedded_postgres(parent / "data")

    @property
    def uri(self) -> str:
        return self.embedded.uri

    def stop(self) -> None:
        from pgserver._commands import pg_ctl

        # fast: every connection is cut at once, as in a crash or a failover
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.embedded.data_dir, user=self.embedded.server.system_user)

    def start(self) -> None:
        self.embedded.server.ensure_postgres_running()  # same data directory, same socket, same URI


@pytest.fixture
def own_pg() -> Iterator[OwnPostgres]:
    parent = Path(tempfile.mkdtemp(prefix="imgstream-pg-"))  # not under pytest's basetemp: see the `pg` fixture
    server = OwnPostgres(parent)
    yield server
    server.start()  # running again whatever the test did, so pgserver's own cleanup stops it cleanly
    server.embedded.stop()
    shutil.rmtree(parent, ignore_errors=True)


class ResultStream:
    """Produces results s-0, s-1, ... at a steady rate, and now and then one already sent (a worker's
    redelivery after a crash: the same event_id again)."""

    def __init__(self, bootstrap: str, topic: str, per_second: int = 20) -> None:
        self.bootstrap, self.topic, self.per_second = bootstrap, topic, per_second
        self.sent: set[str] = set()  # distinct event_ids
        self.records = 0  # records produced, duplicates included
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> ResultStream:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            step, made = 0, 0
            while not self._stop.is_set():
                events = [embedding_result(made + i, prefix="s") for i in range(self.per_second // 4)]
                made += len(events)
                if step % 10 == 9:
                    events.append(embedding_result(step, prefix="s"))  # sent before
                await asyncio.gather(*[await producer.send(self.topic, encode(e), key=e.request_id.encode())
                                       for e in events])
                self.sent.update(e.event_id for e in events)
                self.records += len(events)
                step += 1
                try:
                    await asyncio.wait_for(self._stop.wait(), 0.25)
                except asyncio.TimeoutError:
                    pass
        finally:
            await producer.stop()


def _stored(dsn: str) -> tuple[int, int]:
    """(rows, distinct event_ids) in the CLIP table; (-1, -1) while the database is unreachable."""
    try:
        ((rows, distinct),) = query(dsn, f"SELECT count(*), count(DISTINCT event_id) FROM {CLIP_TABLE}")
        return rows, distinct
    except Exception:  # noqa: BLE001 - the table may not exist yet, or the database may be down
        return -1, -1


def _metrics(sink) -> dict:
    status, body, _ = sink.get("/metrics")
    assert status == 200, sink.tail()
    return parse_prometheus(body.decode())


@pytest.mark.slow
async def test_the_sink_outlasts_a_minute_without_its_database_and_writes_every_row_once(broker, topics, own_pg,
                                                                                          tmp_path):
    port, group = find_free_port(), f"sink-{uuid.uuid4().hex[:8]}"
    # A short max.poll.interval: a sink that stopped polling while it waits would be thrown out of its
    # group (and log a second assignment) long before the database is back.
    sink = start_sink(broker, topics, own_pg.uri, tmp_path, http_port=port, group=group,
                      env={"IMGSTREAM_SINK__DB_BACKOFF_MAX_S": "2", "IMGSTREAM_KAFKA__MAX_POLL_INTERVAL_MS": "15000"})
    try:
        async with ResultStream(broker, topics.results) as stream:
            assert await until_ready(sink) == {"ready": True, "checks": {"database_reachable": True,
                                                                           "broker_reachable": True}}
            deadline = time.monotonic() + 60
            while _stored(own_pg.uri)[0] < 50:
                assert sink.alive() and time.monotonic() < deadline, sink.tail()
                await asyncio.sleep(0.2)

            own_pg.stop()
            stopped_at = time.monotonic()
            down = await until_ready(sink, want=503, timeout_s=30)
            assert down["checks"] == {"database_reachable": False, "broker_reachable": True}
            while time.monotonic() - stopped_at < OUTAGE_S:
                assert sink.alive(), f"the sink exited while the database was down; log:\n{sink.tail()}"
                await asyncio.sleep(1.0)
            during = _metrics(sink)
            assert sample(during, "imgstream_sink_db_up") == 0
            assert sample(during, "imgstream_sink_records_waiting") > 0
            assert sample(during, "imgstream_sink_partitions_paused") == 4
            own_pg.start()

            await until_ready(sink, timeout_s=60)
            await asyncio.sleep(3)  # results keep coming after the database is back
        expected = set(stream.sent)
        deadline = time.monotonic() + 90
        while _stored(own_pg.uri)[1] < len(expected):
            assert sink.alive() and time.monotonic() < deadline, f"{_stored(own_pg.uri)} of {len(expected)}"
            await asyncio.sleep(0.5)

        rows, distinct = _stored(own_pg.uri)
        assert rows == distinct == len(expected)  # nothing missing, nothing twice
        assert {r[0] for r in query(own_pg.uri, f"SELECT event_id FROM {CLIP_TABLE}")} == expected
        deadline = time.monotonic() + 30
        while await committed_total(broker, group, topics.results) < stream.records:
            assert time.monotonic() < deadline, "offsets were not committed up to the end"
            await asyncio.sleep(0.5)

        after = _metrics(sink)
        assert sample(after, "imgstream_sink_db_up") == 1
        assert sample(after, "imgstream_sink_db_errors_total", operation="write") >= 1
        assert sample(after, "imgstream_sink_db_retries_total") >= 5  # backoff capped at 2 s over a minute
        assert sample(after, "imgstream_sink_rows_written_total", table=CLIP_TABLE) >= len(expected)
        assert sample(after, "imgstream_sink_partitions_paused") == 0
        log = sink.log()
        assert log.count("database unreachable") == 1 and log.count("database reachable again") == 1, log[-4000:]
        assert log.count("assigned [") == 1, "the sink left its group while it waited"
        assert sink.alive()
        assert await sink.terminate(timeout_s=30) == 0, sink.tail()
    finally:
        sink.kill()


async def test_with_a_give_up_deadline_the_sink_exits_1_once_the_database_stays_away(broker, topics, tmp_path):
    nowhere = f"postgresql://imgstream@127.0.0.1:{find_free_port()}/imgstream"  # nothing listens there
    sink = start_sink(broker, topics, nowhere, tmp_path, http_port=find_free_port(),
                      env={"IMGSTREAM_SINK__DB_GIVE_UP_S": "5", "IMGSTREAM_SINK__DB_BACKOFF_MAX_S": "1"})
    try:
        body = await until_ready(sink, want=503, timeout_s=4.5)
        assert body["checks"] == {"database_reachable": False, "broker_reachable": False}
        status, _, _ = sink.get("/healthz")
        assert status == 200  # alive, not ready
        deadline = time.monotonic() + 30
        while sink.alive():
            assert time.monotonic() < deadline, f"the sink did not give up; log:\n{sink.tail()}"
            await asyncio.sleep(0.2)
        assert sink.proc.returncode == 1, sink.tail()
        log = sink.log()
        assert "giving up" in log and "imgstream.sink.db_give_up_s" in log, log[-3000:]
        assert log.count("database unreachable") == 1, log[-3000:]  # each retry after the first at DEBUG only
    finally:
        sink.kill()


async def test_a_rebalance_while_the_database_is_down_neither_waits_for_it_nor_loses_rows(broker, topics, own_pg):
    kafka, config = sink_configs(broker, topics, own_pg.uri, batch_max_records=50, batch_max_ms=100,
                                 db_backoff_max_s=1.0)
    first = [embedding_result(i, prefix="a") for i in range(200)]
    await produce(broker, topics.results, records(first))
    a, b = PgVectorSink(kafka, config, own_pg.uri), PgVectorSink(kafka, config, own_pg.uri)
    running_a = asyncio.create_task(a.run())
    await _until(lambda: a.consumer is not None and len(a.consumer.assignment()) == 4, "a owns every partition")
    running_b = asyncio.create_task(b.run())
    await _until(lambda: b.consumer is not None and b.consumer.assignment() and len(a.consumer.assignment()) < 4,
                 "b got partitions")
    await _until(lambda: _stored(own_pg.uri)[1] == len(first), "the first results are written")

    own_pg.stop()
    second = [embedding_result(i, prefix="b") for i in range(200)]
    await produce(broker, topics.results, records(second))
    await _until(lambda: not a.database_reachable and not b.database_reachable, "both sinks saw the outage")
    b.request_stop("test: a member leaves during the outage")
    await asyncio.wait_for(running_b, 20)  # leaves without writing or committing what waits
    # a takes b's partitions over: its revoke lets go of what it could not write instead of waiting
    await _until(lambda: len(a.consumer.assignment()) == 4, "a owns every partition again", timeout_s=30)
    assert not running_a.done()

    own_pg.start()
    await _until(lambda: _stored(own_pg.uri)[1] == len(first) + len(second), "every result is written",
                 timeout_s=60)
    rows, distinct = _stored(own_pg.uri)
    assert rows == distinct == len(first) + len(second)
    a.request_stop("test finished")
    await asyncio.wait_for(running_a, 30)
    assert a.metrics.value("imgstream_sink_db_errors_total", operation="write") >= 1


async def _until(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.1)
