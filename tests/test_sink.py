"""`imgstream sink pgvector` against the real broker and a real PostgreSQL with pgvector."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from imgstream.schemas.codec import encode
from imgstream.schemas.config import KafkaConfig, SinkConfig, Topics
from imgstream.schemas.events import ImageInfo, ModelInfo, ResultEvent, make_event_id
from imgstream.sink.pgvector import PgVectorSink
from imgstream.sink.rows import RESULTS_TABLE, embedding_table
from tests.kafka_helpers import produce

REPO = Path(__file__).resolve().parents[1]
CLIP = "embed_clip_vit_b_32"
CLIP_TABLE = embedding_table(CLIP)
DINO_TABLE = embedding_table("embed_dino_v2")


# -- building results ------------------------------------------------------------------------

def vector(seed: int, dim: int = 512) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(-1, 1) for _ in range(dim)]


def embedding_result(i: int, *, prefix: str = "req", type_: str = CLIP, dim: int = 512, seed: int | None = None,
                     metadata: dict | None = None, replayed: bool = False) -> ResultEvent:
    request_id = f"{prefix}-{i}"
    operation_id = "clip" if type_ == CLIP else "dino"
    return ResultEvent(
        event_id=make_event_id(request_id, operation_id), request_id=request_id, operation_id=operation_id,
        type=type_, status="success", data=vector(i if seed is None else seed, dim), region="whole_image",
        image=ImageInfo(url=f"https://example.org/{i}.jpg", width=640, height=480, sha256=f"{i:064x}"),
        model=ModelInfo(name="ViT-B-32-quickgelu" if type_ == CLIP else "facebook/dinov2-base",
                        weights="random", dim=dim),
        metadata={"photo_id": i} if metadata is None else metadata, replayed=replayed,
    )


def other_result(request_id: str, operation_id: str, type_: str, status: str, data=None, **fields) -> ResultEvent:
    return ResultEvent(event_id=make_event_id(request_id, operation_id), request_id=request_id,
                       operation_id=operation_id, type=type_, status=status, data=data,
                       image=ImageInfo(blob="file:///shared/a.jpg"), metadata={"source": "test"}, **fields)


def records(events: list[ResultEvent]) -> list[tuple[bytes, bytes, list]]:
    return [(e.request_id.encode(), encode(e), []) for e in events]


# -- the database and the sink -----------------------------------------------------------------

@pytest.fixture
def db(pg: str):
    """A fresh database (on the session's server) for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield psycopg.conninfo.make_conninfo(pg, dbname=name)
    with psycopg.connect(pg, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def query(dsn: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def count(dsn: str, table: str) -> int:
    try:
        return query(dsn, f"SELECT count(*) FROM {table}")[0][0]
    except psycopg.errors.UndefinedTable:
        return 0


def sink_configs(broker: str, topics: Topics, dsn: str, group: str | None = None, **sink) -> tuple:
    kafka = KafkaConfig(bootstrap=broker, topics=topics, session_timeout_ms=3000)
    sink.setdefault("batch_max_records", 100)
    sink.setdefault("batch_max_ms", 100)
    return kafka, SinkConfig(dsn=dsn, group=group or f"sink-{uuid.uuid4().hex[:8]}", **sink)


async def sink_until(kafka: KafkaConfig, sink: SinkConfig, done, timeout_s: float = 30.0) -> PgVectorSink:
    """Run a sink in-process until `done(sink)` holds, then stop it the way SIGTERM does."""
    runner = PgVectorSink(kafka, sink, sink.database_uri())
    task = asyncio.create_task(runner.run())
    deadline = time.monotonic() + timeout_s
    while not done(runner) and time.monotonic() < deadline and not task.done():
        await asyncio.sleep(0.05)
    runner.request_stop("test")
    await asyncio.wait_for(task, 30)
    assert done(runner), f"sink did not get there in {timeout_s}s: {runner.stats}"
    return runner


def read_all(n: int):
    return lambda sink: sink.stats.records >= n


async def committed_total(broker: str, group: str, topic: str, partitions: int = 4) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return sum([await consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions)])
    finally:
        await consumer.stop()


# -- scenarios ----------------------------------------------------------------------------------

async def test_every_embedding_is_stored_once_with_its_dimension_and_metadata(broker, topics, db):
    clip = [embedding_result(i) for i in range(300)]
    dino = [embedding_result(i, prefix="dino", type_="embed_dino_v2", dim=768) for i in range(20)]
    await produce(broker, topics.results, records(clip + dino))
    kafka, sink = sink_configs(broker, topics, db)
    runner = await sink_until(kafka, sink, read_all(320))

    assert runner.stats.rows == 320 and runner.stats.batches >= 4  # batches of at most 100
    assert count(db, CLIP_TABLE) == 300 and count(db, DINO_TABLE) == 20 and count(db, RESULTS_TABLE) == 0
    assert query(db, f"SELECT DISTINCT vector_dims(embedding) FROM {CLIP_TABLE}") == [(512,)]
    assert query(db, f"SELECT DISTINCT vector_dims(embedding) FROM {DINO_TABLE}") == [(768,)]
    (row,) = query(db, f"SELECT request_id, operation_id, type, status, region, image_url, image_width, "
                       f"image_height, image_sha256, model_name, model_weights, model_dim, metadata, replayed, "
                       f"completed_at, embedding::text FROM {CLIP_TABLE} WHERE event_id = %s", ("req-7/clip",))
    assert row[:14] == ("req-7", "clip", CLIP, "success", "whole_image", "https://example.org/7.jpg", 640, 480,
                        f"{7:064x}", "ViT-B-32-quickgelu", "random", 512, {"photo_id": 7}, False)
    assert row[14] == clip[7].completed_at
    stored = [float(x) for x in row[15].strip("[]").split(",")]
    assert stored == pytest.approx(clip[7].data, rel=1e-6)  # vector is float4
    indexes = {name for (name,) in query(db, "SELECT indexdef FROM pg_indexes WHERE tablename = %s",
                                         (CLIP_TABLE,))}
    assert any("hnsw" in d and "vector_cosine_ops" in d for d in indexes)
    assert await committed_total(broker, sink.group, topics.results) == 320


async def test_a_replay_replaces_rows_instead_of_adding_them(broker, topics, db):
    first = [embedding_result(i) for i in range(60)]
    failed = other_result("req-60", "clip", CLIP, "error", error_code="image_fetch_failed", error_message="timeout")
    await produce(broker, topics.results, records(first + [failed]))
    kafka, sink = sink_configs(broker, topics, db)
    await sink_until(kafka, sink, read_all(61))
    assert (count(db, CLIP_TABLE), count(db, RESULTS_TABLE)) == (60, 1)

    # Same event_ids, new data: a replay (and a redelivery of part of it) after a model change.
    replay = [embedding_result(i, seed=1000 + i, metadata={"photo_id": i, "v": 2}, replayed=True)
              for i in range(61)]
    await produce(broker, topics.results, records(replay + replay[:10]))
    # A new group reads everything again: originals, replays and redeliveries (a fresh member of the
    # first group would wait out Tansu's session timeout for the old one; the kill test covers that).
    _, again = sink_configs(broker, topics, db)
    await sink_until(kafka, again, read_all(61 + 71))

    assert (count(db, CLIP_TABLE), count(db, RESULTS_TABLE)) == (61, 0)  # the error became an embedding
    rows = query(db, f"SELECT event_id, metadata, replayed, embedding::text FROM {CLIP_TABLE} ORDER BY event_id")
    assert len({r[0] for r in rows}) == 61
    for event_id, metadata, replayed, text in rows:
        i = int(event_id.split("/")[0].split("-")[1])
        assert metadata == {"photo_id": i, "v": 2} and replayed is True
        assert float(text.strip("[]").split(",")[0]) == pytest.approx(vector(1000 + i)[0], rel=1e-6)


async def test_rows_say_whether_the_vector_is_normalised_also_in_tables_an_older_sink_made(broker, topics, db):
    from imgstream.sink.pgstore import _COMMON_DDL

    # The CLIP table as a sink from before the flag created it, with one row in it.
    old_ddl = _COMMON_DDL.replace("normalized boolean,", "")
    assert "normalized" not in old_ddl
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(f"CREATE TABLE {CLIP_TABLE} ({old_ddl}, embedding vector(512) NOT NULL)")
        conn.execute(f"INSERT INTO {CLIP_TABLE} (event_id, request_id, operation_id, type, status, embedding) "
                     "VALUES ('old/clip', 'old', 'clip', %s, 'success', %s::vector)", (CLIP, str(vector(1))))
    raw, unit, unknown = embedding_result(1), embedding_result(2), embedding_result(3)
    raw.normalized, unit.normalized = False, True  # `unknown`: a result from before the flag
    box = other_result("r1", "face_box", "detect_bounding_box", "success", [1, 2, 3, 4])
    await produce(broker, topics.results, records([raw, unit, unknown, box]))
    kafka, sink = sink_configs(broker, topics, db)
    await sink_until(kafka, sink, read_all(4))

    rows = dict(query(db, f"SELECT event_id, normalized FROM {CLIP_TABLE}"))
    assert rows == {"old/clip": None, "req-1/clip": False, "req-2/clip": True, "req-3/clip": None}
    assert query(db, f"SELECT normalized FROM {RESULTS_TABLE}") == [(None,)]


async def test_non_embedding_results_land_in_the_jsonb_table(broker, topics, db):
    events = [
        other_result("r1", "face_box", "detect_bounding_box", "success", [170, 40, 290, 200],
                     region="prominent_face", model=ModelInfo(name="mtcnn", weights="facenet-pytorch")),
        other_result("r1", "nobody", "detect_bounding_box", "success", None, region="prominent_person"),
        other_result("r1", "caption", "describe_image", "success", "a man in a space suit",
                     region="prominent_person", cropped_image_bbox=[10, 20, 300, 400]),
        other_result("r1", "in_coll", "classify", "success",
                     {"is_in_collection": True, "probability": 0.93, "threshold": 0.5}),
        other_result("r1", "face_clip", CLIP, "skipped", error_code="no_face_found",
                     error_message="No prominent face found for operation 'face_clip'."),
        other_result("r2", "clip", CLIP, "error", error_code="image_fetch_failed", error_message="HTTP 404"),
    ]
    await produce(broker, topics.results, records(events))
    kafka, sink = sink_configs(broker, topics, db)
    await sink_until(kafka, sink, read_all(len(events)))

    assert count(db, CLIP_TABLE) == 0
    rows = {r[0]: r[1:] for r in query(db, f"SELECT event_id, type, status, data, region, bbox, error_code, "
                                           f"image_blob, metadata FROM {RESULTS_TABLE}")}
    assert len(rows) == len(events)
    assert rows["r1/face_box"][:3] == ("detect_bounding_box", "success", [170, 40, 290, 200])
    assert rows["r1/nobody"][2] is None
    assert rows["r1/caption"][2:5] == ("a man in a space suit", "prominent_person", [10, 20, 300, 400])
    assert rows["r1/in_coll"][2]["probability"] == 0.93
    assert rows["r1/face_clip"][1] == "skipped" and rows["r1/face_clip"][5] == "no_face_found"
    assert rows["r2/clip"][1::4] == ("error", "image_fetch_failed")
    assert all(r[6] == "file:///shared/a.jpg" and r[7] == {"source": "test"} for r in rows.values())


async def test_malformed_records_are_counted_and_skipped_and_never_stall_the_sink(broker, topics, db):
    good = [embedding_result(i) for i in range(20)]
    nan = embedding_result(100, dim=511)  # NaN makes it 512 values again
    bad_values = [
        b"{this is not json",
        b"[1, 2, 3]",
        b'{"event_id": "x"}',
        b"\xff\xfe\x00binary",
    ]
    wrong_dim = embedding_result(101, dim=300)
    words = embedding_result(102).model_copy(update={"data": ["a", "b"]})
    nul_text = embedding_result(103, metadata={"note": "nul \u0000 inside"})  # PostgreSQL refuses \u0000
    long_id = embedding_result(104, prefix="x" * 3000)  # longer than any btree key
    messages = records(good[:10])
    messages += [(b"bad", value, []) for value in bad_values] + [(b"tombstone", None, [])]
    messages += [(b"nan", encode(nan).replace(b'"data":[', b'"data":[NaN,', 1), [])]
    messages += records([wrong_dim, words, nul_text, long_id]) + records(good[10:])
    await produce(broker, topics.results, messages)
    kafka, sink = sink_configs(broker, topics, db, batch_max_records=500)
    runner = await sink_until(kafka, sink, read_all(len(messages)))

    assert count(db, CLIP_TABLE) == 20
    assert runner.stats.malformed == 5 and runner.stats.rejected == 5
    assert await committed_total(broker, sink.group, topics.results) == len(messages)


def _sink_process(broker: str, topics: Topics, group: str, dsn: str) -> subprocess.Popen:
    env = {**os.environ, "IMGSTREAM_KAFKA__TOPICS__RESULTS": topics.results,
           "IMGSTREAM_KAFKA__SESSION_TIMEOUT_MS": "3000"}
    return subprocess.Popen(
        [sys.executable, "-m", "imgstream", "sink", "pgvector", "--dsn", dsn, "--bootstrap", broker,
         "--group", group, "--batch-size", "50", "--batch-ms", "50"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


async def _wait_for_rows(dsn: str, at_least: int, proc: subprocess.Popen, timeout_s: float = 45.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = count(dsn, CLIP_TABLE)
        if n >= at_least:
            return n
        assert proc.poll() is None, proc.communicate()
        await asyncio.sleep(0.02)
    raise AssertionError(f"only {count(dsn, CLIP_TABLE)} rows of {at_least} after {timeout_s}s")


async def test_a_sink_killed_mid_stream_loses_and_duplicates_nothing(broker, topics, db):
    events = [embedding_result(i) for i in range(600)]
    duplicates = events[:60]  # a worker's redelivery after a crash: same event_ids again
    await produce(broker, topics.results, records(events + duplicates))
    group = f"sink-{uuid.uuid4().hex[:8]}"

    first = _sink_process(broker, topics, group, db)
    await _wait_for_rows(db, 100, first)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=10)
    at_kill = count(db, CLIP_TABLE)
    assert at_kill < len(events), "the sink finished before it was killed: nothing was tested"

    second = _sink_process(broker, topics, group, db)
    await _wait_for_rows(db, len(events), second, timeout_s=60)
    await asyncio.sleep(0.5)  # let it take the trailing duplicates, if any, too
    second.send_signal(signal.SIGTERM)
    _, stderr = second.communicate(timeout=30)
    assert second.returncode == 0, stderr[-3000:]

    assert count(db, CLIP_TABLE) == len({e.event_id for e in events}) == len(events)
    assert query(db, f"SELECT count(DISTINCT event_id) FROM {CLIP_TABLE}") == [(len(events),)]
    assert "batch" in stderr and "lag" in stderr
    assert await committed_total(broker, group, topics.results) == len(events) + len(duplicates)


@pytest.fixture
def data_dir():
    """A data directory outside pytest's basetemp (see the `pg` fixture for why)."""
    parent = tempfile.mkdtemp(prefix="imgstream-pg-")
    yield Path(parent) / "pgdata"
    shutil.rmtree(parent, ignore_errors=True)


async def test_without_a_dsn_the_embedded_database_starts_and_says_where(broker, topics, data_dir):
    await produce(broker, topics.results, records([embedding_result(i) for i in range(5)]))
    env = {**os.environ, "IMGSTREAM_KAFKA__TOPICS__RESULTS": topics.results,
           "IMGSTREAM_KAFKA__SESSION_TIMEOUT_MS": "3000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgstream", "sink", "pgvector", "--data-dir", str(data_dir),
         "--bootstrap", broker, "--batch-ms", "50"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("embedded PostgreSQL")
        assert lines[1].split(": ", 1)[1].strip() == str(data_dir.resolve())
        dsn = lines[2].split(": ", 1)[1].strip()
        deadline = time.monotonic() + 30
        while count(dsn, CLIP_TABLE) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert count(dsn, CLIP_TABLE) == 5
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-3000:]
    assert (data_dir / "PG_VERSION").exists()


async def test_records_read_while_a_revoke_writes_the_batch_are_written_with_the_next_one(broker, topics, db):
    """A rebalance's revoke writes the batch being read (`release`) while the sink waits for records: what
    that wait returns belongs to the new batch. Taken into the old one, it was neither written nor kept,
    and the next batch's commit went past it (a rebalance test lost 50 rows this way)."""
    kafka, config = sink_configs(broker, topics, db, batch_max_records=100_000, batch_max_ms=600_000)
    events = [embedding_result(i) for i in range(250)]
    sink = PgVectorSink(kafka, config, db)
    running = asyncio.create_task(sink.run())
    try:
        await produce(broker, topics.results, records(events[:50]))
        deadline = time.monotonic() + 30
        while sink.batch.records < 50:  # read and held: the batch is neither full nor due
            assert time.monotonic() < deadline and not running.done(), sink.stats
            await asyncio.sleep(0.05)
        for start in range(50, 250, 40):  # each time: the revoke's write, and records arriving meanwhile
            arriving = records(events[start:start + 40])
            await asyncio.gather(sink.release(set()), produce(broker, topics.results, arriving))
            await asyncio.sleep(0.3)
    finally:
        sink.request_stop("test")
        await asyncio.wait_for(running, 30)
    assert count(db, CLIP_TABLE) == len(events)
