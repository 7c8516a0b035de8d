"""What this principal may do on each topic, asked of the cluster without writing a record.

Kafka 2.3+ reports a topic's authorized operations in Metadata v8 (KIP-430); aiokafka stops at
v5, so the request is declared here. A broker that does not report them is probed instead: a
fetch at the end of partition 0 (needs Read) and a produce to a partition that does not exist
(needs Write, and is refused as unknown before anything could be appended).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as kerrors
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.protocol.types import Array, Boolean, Int16, Int32, Schema, String
from aiokafka.record.default_records import DefaultRecordBatchBuilder

# ACL operation codes (org.apache.kafka.common.acl.AclOperation): bit n of the field is operation n.
READ, WRITE = 3, 4
NOT_REPORTED = -(2**31)
PROBE_PARTITION = 2**31 - 1
# Produce answers meaning "you may write here" (the probe's partition does not exist, or has no leader here).
_WRITABLE = {0, kerrors.UnknownTopicOrPartitionError.errno, kerrors.NotLeaderForPartitionError.errno}


class _MetadataResponseV8(Response):
    API_KEY = 3
    API_VERSION = 8
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("brokers", Array(("node_id", Int32), ("host", String("utf-8")), ("port", Int32),
                          ("rack", String("utf-8")))),
        ("cluster_id", String("utf-8")),
        ("controller_id", Int32),
        ("topics", Array(
            ("error_code", Int16), ("topic", String("utf-8")), ("is_internal", Boolean),
            ("partitions", Array(("error_code", Int16), ("partition", Int32), ("leader", Int32),
                                 ("leader_epoch", Int32), ("replicas", Array(Int32)), ("isr", Array(Int32)),
                                 ("offline_replicas", Array(Int32)))),
            ("topic_authorized_operations", Int32))),
        ("cluster_authorized_operations", Int32),
    )


class _MetadataRequestV8(RequestStruct):
    API_KEY = 3
    API_VERSION = 8
    RESPONSE_TYPE = _MetadataResponseV8
    SCHEMA = Schema(("topics", Array(String("utf-8"))), ("allow_auto_topic_creation", Boolean),
                    ("include_cluster_authorized_operations", Boolean),
                    ("include_topic_authorized_operations", Boolean))


class _AuthorizedOperations(Request[_MetadataRequestV8]):
    API_KEY = 3

    def __init__(self, topics: list[str]) -> None:
        self.topics = topics

    def build(self, request_struct_class: type[_MetadataRequestV8]) -> _MetadataRequestV8:
        return request_struct_class(self.topics, False, False, True)


@dataclass(frozen=True)
class TopicAccess:
    """What the cluster says of one topic: whether it exists, its partitions, and may we read / write."""

    topic: str
    exists: bool
    partitions: int
    read: bool | None  # None: could not be told
    write: bool | None
    how: str  # "reported" (by the broker) or "probed"


async def topic_access(client: AIOKafkaClient, topics: list[str], consumer: AIOKafkaConsumer) -> list[TopicAccess]:
    """Access to each of `topics`; `consumer` is a started group-less consumer used for read probes."""
    node = client.get_random_node()
    try:
        answer = await client.send(node, _AuthorizedOperations(topics))
    except (kerrors.IncompatibleBrokerVersion, NotImplementedError):
        answer = None  # a broker before Kafka 2.1 has no Metadata v8
    # Each topic entry: (error_code, name, is_internal, partitions, authorized operations).
    found = {entry[1]: entry for entry in answer.topics} if answer is not None else {}
    everything = None if answer is not None else await client.fetch_all_metadata()
    out = []
    for topic in topics:
        entry = found.get(topic)
        if entry is not None and entry[0] == kerrors.TopicAuthorizationFailedError.errno:
            out.append(TopicAccess(topic, True, 0, False, False, "reported"))
            continue
        if entry is not None:
            exists, partitions, ops = entry[0] == 0, len(entry[3]), entry[4]
        else:
            known = everything.partitions_for_topic(topic) if everything is not None else None
            exists, partitions, ops = bool(known), len(known or ()), NOT_REPORTED
        if not exists:
            out.append(TopicAccess(topic, False, 0, None, None, "reported"))
            continue
        if ops != NOT_REPORTED:
            out.append(TopicAccess(topic, True, partitions, bool(ops >> READ & 1), bool(ops >> WRITE & 1),
                                   "reported"))
            continue
        out.append(TopicAccess(topic, True, partitions, await _may_read(consumer, topic),
                               await _may_write(client, node, topic), "probed"))
    return out


async def _may_read(consumer: AIOKafkaConsumer, topic: str) -> bool | None:
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    try:
        await consumer.seek_to_end(tp)
        await consumer.getmany(tp, timeout_ms=200)
        return True
    except kerrors.TopicAuthorizationFailedError:
        return False
    except kerrors.KafkaError:
        return None
    finally:
        consumer.unsubscribe()


async def _may_write(client: AIOKafkaClient, node: int, topic: str) -> bool | None:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1024)
    builder.append(0, timestamp=None, key=None, value=b"imgstream check", headers=[])
    # A partition far past the last: Kafka refuses it as unknown, after the Write check, and appends nothing.
    request = ProduceRequest(None, 1, 5000, [(topic, [(PROBE_PARTITION, bytes(builder.build()))])])
    try:
        answer = await client.send(node, request)
    except kerrors.KafkaError:
        return None
    codes = [p[1] for t in answer.topics for p in t[1]]
    if any(code == kerrors.TopicAuthorizationFailedError.errno for code in codes):
        return False
    return True if codes and all(code in _WRITABLE for code in codes) else None
