"""The ACL front: a Kafka cluster's authorization and missing topics, as real aiokafka clients meet them.

What aiokafka raises, after how long and whether it retries is pinned here, because the worker and
`imgstream check` decide on it (summarised at the top of tests/kafka_acl.py).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.conn import create_conn
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from aiokafka.protocol.metadata import MetadataRequest

from imgstream.kafka_clients.permissions import topic_access
from tests.kafka_acl import MAX_VERSIONS, NOT_REPORTED, AclPolicy
from tests.kafka_helpers import FAST_GROUP, consume_all
from tests.secure_kafka import Listener, acl_listener_running

# A refusal that aiokafka does not retry arrives within one round trip; this leaves room for a busy CPU.
AT_ONCE_S = 1.0
# For the refusals aiokafka does retry (missing topics): short, so that the tests measure it quickly.
REQUEST_TIMEOUT_MS = 1000


@pytest.fixture(autouse=True)
def _front_raises_nothing(acl_listener: Listener) -> Iterator[None]:
    yield
    assert not [e for e in acl_listener.front.events if e.kind == "error"]


@pytest.fixture
async def topics(acl_listener: Listener) -> AsyncIterator[dict[str, str]]:
    """Four topics of 2 partitions on the ACL listener's broker, by role: ok, other, denied, spare."""
    names = {role: f"acl-{role}-{uuid.uuid4().hex[:8]}" for role in ("ok", "other", "denied", "spare")}
    admin = AIOKafkaAdminClient(bootstrap_servers=acl_listener.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 2, 1) for name in names.values()])
    finally:
        await admin.close()
    yield names


@pytest.fixture
async def producer(acl_listener: Listener) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=acl_listener.bootstrap, acks="all",
                                request_timeout_ms=REQUEST_TIMEOUT_MS)
    await producer.start()
    yield producer
    await producer.stop()


def _denials(listener: Listener, what: str) -> int:
    return sum(e.kind == "denied" and e.detail.startswith(what) for e in listener.front.events)


async def _all_topics(bootstrap: str) -> list[tuple[int, str]]:
    """(error, name) of every topic a Metadata request for all topics lists at `bootstrap` (front or Tansu)."""
    host, _, port = bootstrap.rpartition(":")
    conn = await create_conn(host, int(port))
    try:
        answer = await conn.send(MetadataRequest(None))
    finally:
        conn.close()
    return [(entry[0], entry[1]) for entry in answer.topics]


# --------------------------------------------------------------------------------------------- produce


async def test_produce_to_a_write_denied_topic_fails_at_once_and_is_not_retried(
    acl_listener: Listener, topics: dict[str, str], producer: AIOKafkaProducer
) -> None:
    acl_listener.acl.deny(topics["denied"], "write")

    started = time.monotonic()
    with pytest.raises(TopicAuthorizationFailedError) as raised:
        await producer.send_and_wait(topics["denied"], b"refused")
    assert time.monotonic() - started < AT_ONCE_S
    assert raised.value.errno == 29
    assert topics["denied"] in str(raised.value)  # the topic, not the permission
    assert _denials(acl_listener, f"write {topics['denied']}") == 1  # error 29 is not retriable
    await producer.send_and_wait(topics["ok"], b"fine")  # the producer still works
    assert await consume_all(acl_listener.upstream, topics["denied"], 1, timeout_s=1) == []


async def test_a_produce_request_for_allowed_and_denied_topics_is_split_and_merged(
    acl_listener: Listener, topics: dict[str, str], producer: AIOKafkaProducer
) -> None:
    # One request per broker carries both topics (as the worker's results and DLQ records travel).
    acl_listener.acl.deny(topics["denied"], "write")
    allowed = await producer.send(topics["ok"], b"kept", partition=0)
    refused = await producer.send(topics["denied"], b"refused", partition=0)

    outcomes = await asyncio.gather(allowed, refused, return_exceptions=True)
    assert outcomes[0].topic == topics["ok"]
    assert isinstance(outcomes[1], TopicAuthorizationFailedError)
    assert [r.value for r in await consume_all(acl_listener.upstream, topics["ok"], 1)] == [b"kept"]
    assert await consume_all(acl_listener.upstream, topics["denied"], 1, timeout_s=1) == []


async def test_revoking_write_while_producing_fails_the_next_record(
    acl_listener: Listener, topics: dict[str, str], producer: AIOKafkaProducer
) -> None:
    await producer.send_and_wait(topics["ok"], b"before")
    acl_listener.acl.deny(topics["ok"], "write")
    with pytest.raises(TopicAuthorizationFailedError):
        await producer.send_and_wait(topics["ok"], b"while revoked")
    acl_listener.acl.allow(topics["ok"], "write")
    await producer.send_and_wait(topics["ok"], b"after")

    values = [r.value for r in await consume_all(acl_listener.upstream, topics["ok"], 2)]
    assert sorted(values) == [b"after", b"before"]


async def test_produce_with_acks_0_to_a_denied_topic_closes_the_connection(
    acl_listener: Listener, topics: dict[str, str]
) -> None:
    # Kafka cannot answer acks=0, so it closes the connection; aiokafka sees no error at all.
    acl_listener.acl.deny(topics["denied"], "write")
    producer = AIOKafkaProducer(bootstrap_servers=acl_listener.bootstrap, acks=0)
    await producer.start()
    try:
        await producer.send_and_wait(topics["denied"], b"lost")
    finally:
        await producer.stop()
    async with asyncio.timeout(5):  # the front may read the request after send_and_wait returned
        while not _denials(acl_listener, f"write {topics['denied']} with acks=0"):
            await asyncio.sleep(0.05)
    assert await consume_all(acl_listener.upstream, topics["denied"], 1, timeout_s=1) == []


async def test_a_describe_denied_topic_fails_in_metadata_before_any_record_is_sent(
    acl_listener: Listener, topics: dict[str, str], producer: AIOKafkaProducer
) -> None:
    acl_listener.acl.deny(topics["denied"], "describe")

    started = time.monotonic()
    with pytest.raises(TopicAuthorizationFailedError) as raised:
        await producer.send(topics["denied"], b"refused")  # send() itself: it waits on metadata
    assert time.monotonic() - started < AT_ONCE_S
    assert topics["denied"] in str(raised.value)
    assert _denials(acl_listener, f"write {topics['denied']}") == 0
    assert topics["denied"] not in {name for _, name in await _all_topics(acl_listener.bootstrap)}


# ----------------------------------------------------------------------------------------- missing topics


async def test_producing_to_a_missing_topic_fails_after_request_timeout_and_never_creates_it(
    acl_listener: Listener, producer: AIOKafkaProducer
) -> None:
    missing = f"acl-missing-{uuid.uuid4().hex[:8]}"
    acl_listener.acl.hide(missing)

    started = time.monotonic()
    with pytest.raises(UnknownTopicOrPartitionError) as raised:  # from send(): not a KafkaTimeoutError
        await producer.send(missing, b"nowhere")
    waited = time.monotonic() - started
    assert missing not in str(raised.value)  # the caller must name the topic
    # aiokafka asks for metadata again every retry_backoff_ms (100 ms) until request_timeout_ms.
    assert REQUEST_TIMEOUT_MS / 1000 <= waited < REQUEST_TIMEOUT_MS / 1000 + AT_ONCE_S
    assert _denials(acl_listener, f"describe {missing}: error 3") >= 5
    assert missing not in {name for _, name in await _all_topics(acl_listener.bootstrap)}
    assert missing not in {name for _, name in await _all_topics(acl_listener.upstream)}  # Tansu never made it


async def test_a_topic_that_disappears_while_producing_fails_the_record_after_request_timeout(
    acl_listener: Listener, topics: dict[str, str], producer: AIOKafkaProducer
) -> None:
    await producer.send_and_wait(topics["ok"], b"before")
    acl_listener.acl.hide(topics["ok"])

    started = time.monotonic()
    # The produce answer (error 3) is retriable; once metadata lists no leader, the batch expires.
    with pytest.raises(NotLeaderForPartitionError) as raised:
        await producer.send_and_wait(topics["ok"], b"after", partition=0)
    waited = time.monotonic() - started
    assert topics["ok"] not in str(raised.value)
    assert REQUEST_TIMEOUT_MS / 1000 <= waited < REQUEST_TIMEOUT_MS / 1000 + AT_ONCE_S
    assert _denials(acl_listener, f"write {topics['ok']}: error 3") >= 1


async def test_a_consumer_of_a_missing_topic_fails_to_start_after_request_timeout(acl_listener: Listener) -> None:
    missing = f"acl-missing-{uuid.uuid4().hex[:8]}"
    acl_listener.acl.hide(missing)
    consumer = AIOKafkaConsumer(missing, bootstrap_servers=acl_listener.bootstrap, group_id=None,
                                request_timeout_ms=REQUEST_TIMEOUT_MS)
    started = time.monotonic()
    try:
        with pytest.raises(UnknownTopicOrPartitionError):
            await consumer.start()
    finally:
        await consumer.stop()
    assert REQUEST_TIMEOUT_MS / 1000 <= time.monotonic() - started < REQUEST_TIMEOUT_MS / 1000 + AT_ONCE_S


# --------------------------------------------------------------------------------------------- consume


async def test_consuming_a_read_denied_topic_raises_from_every_getmany(
    acl_listener: Listener, topics: dict[str, str], producer: AIOKafkaProducer
) -> None:
    await producer.send_and_wait(topics["denied"], b"unreadable")
    acl_listener.acl.deny(topics["denied"], "read")
    consumer = AIOKafkaConsumer(topics["denied"], bootstrap_servers=acl_listener.bootstrap, group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()  # metadata and offsets need Describe only
    try:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(TopicAuthorizationFailedError) as raised:
                await consumer.getmany(timeout_ms=2000)
            assert time.monotonic() - started < AT_ONCE_S
            assert topics["denied"] in str(raised.value)
    finally:
        await consumer.stop()


async def test_list_offsets_of_a_describe_denied_partition_is_refused(
    acl_listener: Listener, topics: dict[str, str]
) -> None:
    partition = TopicPartition(topics["denied"], 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=acl_listener.bootstrap, group_id=None)
    await consumer.start()
    try:
        consumer.assign([partition])
        await consumer.end_offsets([partition])  # metadata known before the ACL changes
        acl_listener.acl.deny(topics["denied"], "describe")
        with pytest.raises(TopicAuthorizationFailedError, match=topics["denied"]):
            await consumer.end_offsets([partition])
    finally:
        await consumer.stop()


async def test_a_fetch_of_allowed_and_denied_topics_is_split_and_merged(
    acl_listener: Listener, topics: dict[str, str], producer: AIOKafkaProducer
) -> None:
    await producer.send_and_wait(topics["ok"], b"readable", partition=0)
    await producer.send_and_wait(topics["denied"], b"unreadable", partition=0)
    acl_listener.acl.deny(topics["denied"], "read")
    consumer = AIOKafkaConsumer(topics["ok"], topics["denied"], bootstrap_servers=acl_listener.bootstrap,
                                group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    values: list[bytes] = []
    refusals = 0
    try:
        async with asyncio.timeout(10):
            while not values or not refusals:  # one fetch request carries both topics
                try:
                    batches = await consumer.getmany(timeout_ms=200)
                except TopicAuthorizationFailedError:
                    refusals += 1
                    continue
                values += [r.value for batch in batches.values() for r in batch]
    finally:
        await consumer.stop()
    assert values == [b"readable"]
    assert refusals >= 1


async def test_a_denied_group_fails_the_consumer_start(acl_listener: Listener, topics: dict[str, str]) -> None:
    group = f"acl-group-{uuid.uuid4().hex[:8]}"
    acl_listener.acl.deny_group(group)
    consumer = AIOKafkaConsumer(topics["ok"], bootstrap_servers=acl_listener.bootstrap, group_id=group,
                                enable_auto_commit=False, **FAST_GROUP)
    started = time.monotonic()
    try:
        with pytest.raises(GroupAuthorizationFailedError) as raised:
            await consumer.start()  # FindCoordinator, answered with error 30
    finally:
        await consumer.stop()
    assert time.monotonic() - started < AT_ONCE_S
    assert raised.value.errno == 30
    assert group in str(raised.value)


async def test_revoking_the_group_while_consuming_fails_commit_and_getmany(
    acl_listener: Listener, topics: dict[str, str], producer: AIOKafkaProducer
) -> None:
    await producer.send_and_wait(topics["ok"], b"one")
    group = f"acl-group-{uuid.uuid4().hex[:8]}"
    consumer = AIOKafkaConsumer(topics["ok"], bootstrap_servers=acl_listener.bootstrap, group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest", **FAST_GROUP)
    await consumer.start()
    try:
        async with asyncio.timeout(15):
            while not await consumer.getmany(timeout_ms=200):
                pass
        acl_listener.acl.deny_group(group)

        started = time.monotonic()
        with pytest.raises(GroupAuthorizationFailedError, match=group):
            await consumer.commit()  # OffsetCommit: error 30 on every partition, not retried
        assert time.monotonic() - started < AT_ONCE_S
        # The next heartbeat (heartbeat_interval_ms) is refused too; getmany raises from then on.
        async with asyncio.timeout(5):
            with pytest.raises(GroupAuthorizationFailedError, match=group):
                while True:
                    await consumer.getmany(timeout_ms=200)
    finally:
        await consumer.stop()


# ---------------------------------------------------------------------------------- imgstream check's view


async def test_metadata_v8_reports_what_the_policy_allows(acl_listener: Listener, topics: dict[str, str]) -> None:
    acl = acl_listener.acl
    acl.allow(topics["ok"])  # a policy entry that denies nothing: reported as allowed
    acl.deny(topics["denied"], "write")
    acl.deny(topics["other"], "read", "write")
    missing = f"acl-missing-{uuid.uuid4().hex[:8]}"
    acl.hide(missing)
    hidden_by_describe = topics["spare"]
    acl.deny(hidden_by_describe, "describe")
    client = AIOKafkaClient(bootstrap_servers=acl_listener.bootstrap)
    await client.bootstrap()
    consumer = AIOKafkaConsumer(bootstrap_servers=acl_listener.bootstrap, group_id=None)
    await consumer.start()
    try:
        found = await topic_access(client, [topics["ok"], topics["denied"], topics["other"], missing,
                                            hidden_by_describe], consumer)
    finally:
        await consumer.stop()
        await client.close()
    by_topic = {a.topic: (a.exists, a.partitions, a.read, a.write, a.how) for a in found}
    assert by_topic == {
        topics["ok"]: (True, 2, True, True, "reported"),
        topics["denied"]: (True, 2, True, False, "reported"),
        topics["other"]: (True, 2, False, False, "reported"),
        missing: (False, 0, None, None, "reported"),
        hidden_by_describe: (True, 0, False, False, "reported"),  # error 29: Kafka does not say whether it exists
    }


async def test_a_topic_without_a_policy_entry_is_not_reported(acl_listener: Listener, topics: dict[str, str]) -> None:
    # Tansu answers INT32_MIN ("not reported"), so topic_access probes; this pins that the front leaves it.
    host, _, port = acl_listener.bootstrap.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        name = topics["ok"].encode()
        body = struct.pack(">ih", 1, len(name)) + name + b"\x00\x00\x01"  # no auto-create, no cluster ops, topic ops
        answer = _request(sock, 3, 8, body)
    assert answer[-8:-4] == struct.pack(">i", NOT_REPORTED)  # the topic's (the cluster's follows)


# ------------------------------------------------------------------------------------------ the protocol


def _request(sock: socket.socket, api_key: int, version: int, body: bytes, correlation_id: int = 7) -> bytes:
    _send(sock, api_key, version, body, correlation_id)
    frame = _receive(sock)
    assert struct.unpack_from(">i", frame)[0] == correlation_id
    return frame[4:]


def _send(sock: socket.socket, api_key: int, version: int, body: bytes, correlation_id: int,
          flexible: bool = False) -> None:
    header = struct.pack(">hhih", api_key, version, correlation_id, 3) + b"raw" + (b"\0" if flexible else b"")
    sock.sendall(struct.pack(">i", len(header) + len(body)) + header + body)


def _receive(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    (size,) = struct.unpack(">i", exactly(4))
    return exactly(size)


def _api_versions(body: bytes, flexible: bool) -> dict[int, tuple[int, int]]:
    error, pos = struct.unpack_from(">h", body)[0], 2
    assert error == 0
    if flexible:
        count, pos = body[pos] - 1, pos + 1  # fewer than 127 APIs: a one-byte varint
    else:
        count, pos = struct.unpack_from(">i", body, pos)[0], pos + 4
    versions = {}
    for _ in range(count):
        key, low, high = struct.unpack_from(">hhh", body, pos)
        versions[key] = (low, high)
        pos += 7 if flexible else 6  # flexible entries end in an empty tagged-field section
    return versions


@pytest.mark.parametrize("version", [0, 3])
def test_api_versions_are_capped_at_what_the_front_checks(acl_listener: Listener, version: int) -> None:
    host, _, port = acl_listener.bootstrap.rpartition(":")
    flexible = version >= 3
    body = b"\x04raw\x041.0\x00" if flexible else b""  # v3: client software name and version
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        _send(sock, 18, version, body, 7, flexible=flexible)
        fronted = _api_versions(_receive(sock)[4:], flexible)
    upstream_host, _, upstream_port = acl_listener.upstream.rpartition(":")
    with socket.create_connection((upstream_host, int(upstream_port)), timeout=5) as sock:
        _send(sock, 18, version, body, 7, flexible=flexible)
        tansu = _api_versions(_receive(sock)[4:], flexible)

    assert fronted.keys() == tansu.keys()
    for key, (low, high) in tansu.items():
        assert fronted[key] == (low, min(high, MAX_VERSIONS.get(key, high))), key
    assert fronted[3] == (0, 8)  # Metadata v8 (imgstream check) but none of the flexible versions


def test_a_version_the_front_cannot_check_closes_the_connection(acl_listener: Listener) -> None:
    host, _, port = acl_listener.bootstrap.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        _send(sock, 3, 9, b"\x01\x00\x00\x00\x00", 7, flexible=True)  # Metadata v9: flexible
        with pytest.raises(ConnectionError):
            _receive(sock)
    errors = [e for e in acl_listener.front.events if e.kind == "error"]
    assert len(errors) == 1
    assert "api_key=3 v9" in errors[0].detail
    acl_listener.front.events.clear()  # expected here: keep the autouse check for the other tests


def test_answers_from_the_front_wait_for_the_broker_s_earlier_answers(
    acl_listener: Listener, topics: dict[str, str]
) -> None:
    # A Metadata request goes to Tansu, the denied Produce after it is answered by the front at once;
    # the client must still get them in order (aiokafka closes the connection on a correlation mismatch).
    acl_listener.acl.deny(topics["denied"], "write")
    name = topics["denied"].encode()
    produce = (struct.pack(">hhi", -1, -1, 1000) + struct.pack(">ih", 1, len(name)) + name
               + struct.pack(">iii", 1, 0, 0))  # v3: no transactional id, acks=all, one partition, empty records
    host, _, port = acl_listener.bootstrap.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        for correlation_id in range(1, 21, 2):
            _send(sock, 3, 1, struct.pack(">i", -1), correlation_id)  # all topics
            _send(sock, 0, 3, produce, correlation_id + 1)
        answers = [_receive(sock) for _ in range(20)]
    assert [struct.unpack_from(">i", a)[0] for a in answers] == list(range(1, 21))
    refused = answers[1][4:]
    (count,) = struct.unpack_from(">i", refused)
    assert count == 1
    assert struct.unpack_from(">ih", refused, 4 + 2 + len(name) + 4) == (0, 29)  # partition 0: error 29


def test_the_policy_knows_only_describe_read_and_write() -> None:
    with pytest.raises(ValueError, match="unknown operations"):
        AclPolicy(denied={"t": {"delete"}})
    with pytest.raises(ValueError, match="unknown operations"):
        AclPolicy().deny("t", "Write")


async def test_acl_behind_sasl() -> None:
    # The policy applies after login, and ApiVersions is capped on the SASL path as well.
    users = {"alice": "alice-secret"}
    with acl_listener_running(AclPolicy(denied={"sasl-denied": {"write"}}), mechanisms=("PLAIN",),
                              users=users) as listener:
        assert listener.security_protocol == "SASL_PLAINTEXT"
        producer = AIOKafkaProducer(bootstrap_servers=listener.bootstrap, security_protocol="SASL_PLAINTEXT",
                                    sasl_mechanism="PLAIN", sasl_plain_username="alice",
                                    sasl_plain_password="alice-secret", acks="all")
        await producer.start()
        try:
            await producer.send_and_wait("sasl-allowed", b"fine")
            with pytest.raises(TopicAuthorizationFailedError):
                await producer.send_and_wait("sasl-denied", b"refused")
        finally:
            await producer.stop()
        host, _, port = listener.bootstrap.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            _send(sock, 18, 0, b"", 7)  # before login
            versions = _api_versions(_receive(sock)[4:], flexible=False)
    assert versions[1][1] == MAX_VERSIONS[1]  # Fetch: Tansu offers more
    kinds = {e.kind for e in listener.front.events}  # and "refused": the raw socket closed before login
    assert {"authenticated", "denied"} <= kinds
    assert "error" not in kinds
