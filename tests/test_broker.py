"""The embedded broker and topic set-up, exercised against a real Tansu process."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.protocol.metadata import MetadataRequest

from imgstream.producer.embedded_broker import HOST, EmbeddedBroker, EmbeddedBrokerError, find_free_port, probe_metadata
from imgstream.producer.topics import BrokerUnavailableError, create_topics, topic_names, wait_for_broker
from imgstream.schemas.config import Topics
from tests.kafka_helpers import FAST_GROUP, consume_all, produce, unique_topics

REPO_ROOT = Path(__file__).resolve().parent.parent


def _messages(count: int) -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
    return [
        (f"key-{i % 10}".encode(), f"value-{i}".encode(), [("request_id", f"r{i}".encode()), ("attempt", b"1")])
        for i in range(count)
    ]


async def test_records_keep_keys_headers_and_key_partitioning(broker: str, topics: Topics) -> None:
    await produce(broker, topics.requests, _messages(40))

    records = await consume_all(broker, topics.requests, expected_count=40)

    assert len(records) == 40
    by_value = {r.value: r for r in records}
    for i in range(40):
        record = by_value[f"value-{i}".encode()]
        assert record.key == f"key-{i % 10}".encode()
        assert list(record.headers) == [("request_id", f"r{i}".encode()), ("attempt", b"1")]
    partitions_of_key: dict[bytes | None, set[int]] = defaultdict(set)
    for record in records:
        partitions_of_key[record.key].add(record.partition)
    assert all(len(parts) == 1 for parts in partitions_of_key.values())
    assert len({r.partition for r in records}) > 1


async def _group_consumer(broker: str, topic: str, group: str) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=broker,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **FAST_GROUP,
    )
    await consumer.start()
    return consumer


async def _read(consumer: AIOKafkaConsumer, count: int, timeout_s: float = 15.0) -> list:
    records: list = []
    async with asyncio.timeout(timeout_s):
        while len(records) < count:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    return records


async def test_group_member_resumes_after_committed_offsets(broker: str, topics: Topics) -> None:
    await produce(broker, topics.requests, _messages(20))
    group = f"g-{topics.requests}"

    first = await _group_consumer(broker, topics.requests, group)
    try:
        fetched = await _read(first, 20)
        # Only the first 10 are "processed"; the others were fetched but must be redelivered.
        processed = fetched[:10]
        offsets: dict[TopicPartition, int] = {}
        for record in processed:
            offsets[TopicPartition(record.topic, record.partition)] = record.offset + 1
        await first.commit(offsets)
        for tp, offset in offsets.items():
            assert await first.committed(tp) == offset
    finally:
        await first.stop()

    # Slow on Tansu (about 7 s): `first` could not leave generation 0, see FAST_GROUP.
    second = await _group_consumer(broker, topics.requests, group)
    try:
        resumed = await _read(second, 10)
        extra = await second.getmany(timeout_ms=500)
    finally:
        await second.stop()

    def ids(records: list) -> set[tuple[int, int]]:
        return {(r.partition, r.offset) for r in records}

    assert not any(extra.values())
    assert ids(resumed) == ids(fetched) - ids(processed)
    assert ids(processed) | ids(resumed) == ids(fetched)


async def test_create_topics_is_idempotent(broker: str) -> None:
    names = unique_topics("idem")

    created = await create_topics(broker, names, partitions=4, max_message_bytes=1_000_000)
    again = await create_topics(broker, names, partitions=4, max_message_bytes=1_000_000)

    assert created == topic_names(names)
    assert again == []
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        described = await admin.describe_topics(topic_names(names))
    finally:
        await admin.close()
    assert {t["topic"]: len(t["partitions"]) for t in described} == dict.fromkeys(topic_names(names), 4)


async def test_wait_for_broker(broker: str) -> None:
    await wait_for_broker(broker, timeout_s=5)
    with pytest.raises(BrokerUnavailableError, match="no Kafka broker answered"):
        await wait_for_broker(f"{HOST}:{find_free_port()}", timeout_s=0.5)


def test_start_on_a_taken_port_fails_with_the_broker_log() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = EmbeddedBroker(port)
        with pytest.raises(EmbeddedBrokerError, match=f"{port}.*exited") as info:
            broker.start(timeout_s=10)
    assert "Address in use" in str(info.value)
    broker.stop()


async def test_run_foreground_prints_bootstrap_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from producer.embedded_broker import run_foreground; sys.exit(run_foreground())",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()  # type: ignore[union-attr]
        assert line.startswith("bootstrap: ")
        host, port = line.split()[1].rsplit(":", 1)
        assert probe_metadata(host, int(port))

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert not probe_metadata(host, int(port))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_advertised_address_is_what_metadata_lists() -> None:
    # A proxy (the TLS and SASL fronts of tests/secure_kafka.py) takes this port; clients must come back to it.
    advertised_port = find_free_port()
    with EmbeddedBroker(advertised=f"{HOST}:{advertised_port}") as embedded:
        assert embedded.advertised == f"{HOST}:{advertised_port}"
        # One connection to the real listener: a client would follow the metadata to the empty port.
        conn = await create_conn(HOST, embedded.port)
        try:
            metadata = await conn.send(MetadataRequest([]))
        finally:
            await conn.close()  # wait for the socket to close: Tansu's SIGTERM waits for open connections
    assert [(host, port) for _, host, port, *_ in metadata.brokers] == [(HOST, advertised_port)]


def test_advertised_address_must_be_host_and_port() -> None:
    with pytest.raises(ValueError, match="expected host:port"):
        EmbeddedBroker(advertised="tcp://127.0.0.1")
