"""What the cluster refuses for good stops the worker cleanly; `imgstream check` reports it.

A real worker subprocess behind the ACL front of tests/kafka_acl.py, which answers as a Kafka
cluster with an authorizer and without auto-created topics would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from imgstream.producer.topics import create_topics
from tests.kafka_helpers import consume_all, produce, unique_topics
from tests.worker_procs import WorkerProcs, request_bytes, small_photo

REPO = Path(__file__).resolve().parent.parent


async def committed(bootstrap: str, group: str, topic: str) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return await consumer.committed(TopicPartition(topic, 0))
    finally:
        await consumer.stop()


@pytest.fixture
async def setup(acl_listener, tmp_path):
    topics = unique_topics("acl")
    await create_topics(acl_listener.bootstrap, topics, partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    procs = WorkerProcs(tmp_path, acl_listener.bootstrap, topics, group)
    image = {"blob": small_photo(tmp_path / "a.jpg").as_uri()}
    yield acl_listener, topics, group, procs, image
    procs.stop_all()
    procs.report()


async def requests(bootstrap: str, topic: str, prefix: str, image: dict[str, str], n: int) -> None:
    await produce(bootstrap, topic, [(f"{prefix}-{i}".encode(), request_bytes(f"{prefix}-{i}", image), [])
                                     for i in range(n)])


async def test_a_publish_refused_for_permission_stops_the_worker_committing_nothing_past_it(setup):
    listener, topics, group, procs, image = setup
    worker = procs.start(env={"IMGSTREAM_KAFKA__REQUEST_TIMEOUT_MS": "3000"})
    await worker.wait_for_log(r"connected to .* as group", timeout_s=120)
    await requests(listener.bootstrap, topics.requests, "before", image, 3)
    await worker.wait_for_log(r"request before-2: 2 results", timeout_s=120)

    listener.acl.deny(topics.results, "write")
    await requests(listener.bootstrap, topics.requests, "after", image, 2)
    code = await worker.exited(timeout_s=90)
    assert code == 1, worker.tail()
    log = worker.log()
    assert f"not authorized to write to {topics.results}" in log and "needs Write" in log, worker.tail()
    # The three answered requests are committed; the refused one (offset 3) and what follows are not.
    assert await committed(listener.upstream, group, topics.requests) == 3
    results = await consume_all(listener.upstream, topics.results, 100, timeout_s=3)
    assert len(results) == 6


async def test_a_missing_results_topic_stops_the_worker_naming_it(setup):
    listener, topics, group, procs, image = setup
    listener.acl.hide(topics.results)
    worker = procs.start(env={"IMGSTREAM_KAFKA__REQUEST_TIMEOUT_MS": "2000"})
    await worker.wait_for_log(r"connected to .* as group", timeout_s=120)
    await requests(listener.bootstrap, topics.requests, "r", image, 1)
    code = await worker.exited(timeout_s=90)
    assert code == 1, worker.tail()
    assert f"topic {topics.results} does not exist" in worker.log(), worker.tail()
    assert await committed(listener.upstream, group, topics.requests) in (None, 0)


async def test_a_read_refused_while_running_stops_the_worker(setup):
    listener, topics, group, procs, image = setup
    worker = procs.start()
    await worker.wait_for_log(r"connected to .* as group", timeout_s=120)
    await worker.wait_for_log(r"partitions assigned", timeout_s=60)
    listener.acl.deny(topics.requests, "read")
    code = await worker.exited(timeout_s=60)
    assert code == 1, worker.tail()
    assert f"not authorized to read {topics.requests}" in worker.log(), worker.tail()


async def test_a_refused_group_ends_the_start_within_30s(setup):
    listener, topics, group, procs, image = setup
    listener.acl.deny_group(group)
    started = time.monotonic()
    worker = procs.start(preload=())
    code = await worker.exited(timeout_s=60)
    assert code == 1, worker.tail()
    assert time.monotonic() - started < 30
    assert "GroupAuthorizationFailed" in worker.log() and "kafka.group" in worker.log(), worker.tail()


async def test_check_says_what_the_broker_reports(setup):
    listener, topics, _, _, _ = setup
    listener.acl.deny(topics.results, "write")
    listener.acl.allow(topics.requests)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSTREAM_")} | {
        "IMGSTREAM_KAFKA__BOOTSTRAP": listener.bootstrap, "IMGSTREAM_KAFKA__TOPICS__REQUESTS": topics.requests,
        "IMGSTREAM_KAFKA__TOPICS__REPLAY": topics.replay, "IMGSTREAM_KAFKA__TOPICS__RESULTS": topics.results,
        "IMGSTREAM_KAFKA__TOPICS__DLQ": topics.dlq, "IMGSTREAM_KAFKA__TOPICS__RETRY": topics.retry}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "imgstream", "check", cwd=REPO, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 1, text + err.decode()
    assert f"FAIL  topic {topics.results}: write NOT allowed (grant the ACL) (reported by the broker)" in text, text
    assert f"ok    topic {topics.results}: read allowed (reported by the broker)" in text, text
    assert f"ok    topic {topics.requests}: write allowed (reported by the broker)" in text, text
    assert f"ok    topic {topics.dlq}: write allowed (probed)" in text, text
    # The setup made one partition each: check compares them with what `topics create` would make.
    assert text.count("differs from its settings: partitions 1 (settings: 12)") == 4, text
    assert f"ok    topic {topics.dlq}: 1 partitions, settings as planned" in text, text


async def test_a_broker_without_idempotence_gets_a_plain_producer_and_one_info_line(broker, caplog):
    """enable_idempotence auto (the default) on a broker that refuses InitProducerId (the embedded one):
    the producer works without it, and the log says so once at INFO, without aiokafka's ERROR line."""
    from imgstream.kafka_clients import open_producer
    from imgstream.schemas.config import KafkaConfig

    caplog.set_level(logging.INFO)
    producer = await open_producer(KafkaConfig(bootstrap=broker))
    try:
        await producer.send_and_wait(f"idem-{uuid.uuid4().hex[:8]}", b"x")
    finally:
        await producer.stop()
    said = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert [s for s in said if "refused an idempotent producer" in s[2]] == [
        ("imgstream.kafka", logging.INFO, ("the broker refused an idempotent producer (UnknownError); producing "
                                           "without idempotence (kafka.producer.enable_idempotence)"))], said
    assert not [s for s in said if s[1] >= logging.ERROR], said
    assert not logging.getLogger("aiokafka.producer.sender").filters  # the probe's filter is gone again
