"""Kafka authorization and missing topics, simulated by rewriting requests and responses on their way to Tansu.

Tansu has no ACLs and creates every topic it is asked about; a KafkaFront with an AclPolicy answers
as an Apache Kafka broker with an authorizer (and auto.create.topics.enable=false) would:

  request               refused when                      answer (the rest of the request reaches Tansu)
  --------------------  --------------------------------  ---------------------------------------------------
  Metadata              Describe denied                   error 29, no partitions (left out of "all topics")
                        hidden                            error 3, no partitions (never asked of Tansu, so
                                                          never auto-created; left out of "all topics")
                        v8 include_topic_authorized_operations: topics with a policy entry report the
                        bitfield of allowed operations; the others keep Tansu's INT32_MIN (not reported)
  Produce               Write denied / hidden             error 29 / 3 for those partitions; acks=0: the
                                                          connection is closed, as Kafka does
  Fetch                 Read denied / hidden              error 29 / 3 for those partitions
  ListOffsets           Describe denied / hidden          error 29 / 3 for those partitions
  FindCoordinator,      the group is denied               error 30 (OffsetCommit: on every partition;
  JoinGroup, SyncGroup,                                   OffsetFetch v2+: top level, no partitions, as
  Heartbeat, LeaveGroup,                                  Kafka answers, which aiokafka reads as "nothing
  OffsetCommit, OffsetFetch                               committed"; v0-1: on every partition)
  ApiVersions           -                                 the versions of the APIs above are capped at what
                                                          this module decodes (none of them flexible)

A request that mixes allowed and refused partitions is split: the allowed part goes to Tansu, and
its answer is merged with the refusals (the worker's one produce request per broker carries results
and DLQ records together). A request with nothing left to forward is answered by the front, in order
with the answers Tansu still owes. Not simulated: topic checks on OffsetCommit/OffsetFetch, the
cluster-level checks (IdempotentWrite, Create), transactional ids, DescribeConfigs/CreateTopics of
hidden topics (the admin client still sees Tansu).

What aiokafka 0.14 does against it, measured on loopback (pinned by tests/test_kafka_acl_front.py):
 1. Write denied: the record's future (send_and_wait) raises TopicAuthorizationFailedError(topic) at
    once (one round trip, ~1 ms), errno 29; str() names the topic, not the operation. NOT retried
    (error 29 is not retriable: one Produce request). The producer stays usable; in a request that
    mixes topics only the denied topic's records fail. With acks=0 nothing is raised at all.
 2. Describe denied: send() itself raises TopicAuthorizationFailedError(topic) at once, from its wait
    on metadata; no Produce request is sent. aiokafka.cluster logs ERROR "Topic T is not authorized
    for this client". A consumer subscribed to it: start() raises the same, at once.
 3. Missing topic, never seen before: send() raises UnknownTopicOrPartitionError() (no topic in its
    text; not a KafkaTimeoutError) after request_timeout_ms: 2.03-2.05 s at 2000 ms, 1.02 s at 1000;
    meanwhile Metadata every retry_backoff_ms (100 ms), each logged as ERROR "Topic T not found in
    cluster metadata". A consumer subscribed to it: start() raises the same after the same time.
 4. Topic that disappears while producing (error 3 on Produce): retried (WARNING "Got error produce
    response on topic-partition ..., retrying"), then the record's future raises
    NotLeaderForPartitionError() (no topic in its text) after request_timeout_ms (2.00 s at 2000 ms).
    Meanwhile aiokafka asks for metadata in a tight loop: ~3100 Metadata requests in those 2 s.
 5. Read denied: consumer.start() succeeds (metadata and ListOffsets need Describe only); getmany()
    raises TopicAuthorizationFailedError(topic) at once, on every call; records of the allowed
    partitions of the same fetch still arrive (from another getmany). After each raise aiokafka
    fetches again at once: a caller that keeps calling getmany spins (~3100 refused fetches in 2 s).
 6. Group denied: consumer.start() raises GroupAuthorizationFailedError(group) at once (FindCoordinator),
    errno 30; str() names the group.
 7. Group revoked while consuming: commit() raises GroupAuthorizationFailedError(group) at once, not
    retried (ERROR "OffsetCommit failed for group G - GroupAuthorizationFailedError"); getmany() raises
    it from the next heartbeat on (heartbeat_interval_ms: 0.5 s with FAST_GROUP), then on every call.
 8. kafka_clients.permissions.topic_access (Metadata v8) reads the policy as "reported": read/write per
    the bitfield for a topic with a policy entry, exists=False for a hidden one, (exists, read, write)
    = (True, False, False) and 0 partitions for a Describe-denied one.
 9. An idempotent producer does not start on Tansu, with or without the front (InitProducerId answers
    UnknownError); the ACL tests use enable_idempotence=False, as kafka_clients falls back to.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from aiokafka.protocol import commit, coordination, fetch, group, metadata, offset, produce
from aiokafka.protocol.api import RequestStruct
from aiokafka.protocol.types import (
    Array,
    Boolean,
    Bytes,
    Int16,
    Int32,
    Schema,
    String,
    TaggedFields,
    UnsignedVarInt32,
)

UNKNOWN_TOPIC_OR_PARTITION, TOPIC_AUTHORIZATION_FAILED, GROUP_AUTHORIZATION_FAILED = 3, 29, 30
NOT_REPORTED = -(2**31)
OPERATIONS = ("describe", "read", "write")
# org.apache.kafka.common.acl.AclOperation codes; a topic's authorized operations set bit `code`.
_ACL_CODES = {"read": 3, "write": 4, "create": 5, "delete": 6, "alter": 7, "describe": 8,
              "describe_configs": 10, "alter_configs": 11}

PRODUCE, FETCH, LIST_OFFSETS, METADATA = 0, 1, 2, 3
OFFSET_COMMIT, OFFSET_FETCH, FIND_COORDINATOR, JOIN_GROUP = 8, 9, 10, 11
HEARTBEAT, LEAVE_GROUP, SYNC_GROUP, API_VERSIONS = 12, 13, 14, 18
GROUP_APIS = (OFFSET_COMMIT, OFFSET_FETCH, FIND_COORDINATOR, JOIN_GROUP, HEARTBEAT, LEAVE_GROUP, SYNC_GROUP)
# The highest version of each rewritten API that is decoded here: every one of them non-flexible, and
# at least what aiokafka sends to Tansu (ListOffsets stops at 3: aiokafka's v4-5 schema is wrong).
MAX_VERSIONS = {PRODUCE: 8, FETCH: 11, LIST_OFFSETS: 3, METADATA: 8, OFFSET_COMMIT: 3, OFFSET_FETCH: 3,
                FIND_COORDINATOR: 1, JOIN_GROUP: 5, HEARTBEAT: 1, LEAVE_GROUP: 1, SYNC_GROUP: 3}


class AclPolicy:
    """What one principal may not do: operations denied per topic, groups denied, topics that do not exist.

    Safe to change while clients run (each request reads the policy as it is then).
    """

    def __init__(self, denied: Mapping[str, Iterable[str]] | None = None, denied_groups: Iterable[str] = (),
                 hidden: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._denied: dict[str, frozenset[str]] = {}
        self._groups = frozenset(denied_groups)
        self._hidden = frozenset(hidden)
        for topic, operations in (denied or {}).items():
            self._denied[topic] = _operations(operations)

    def deny(self, topic: str, *operations: str) -> AclPolicy:
        with self._lock:
            self._denied[topic] = self._denied.get(topic, frozenset()) | _operations(operations)
        return self

    def allow(self, topic: str, *operations: str) -> AclPolicy:
        """Allow `operations` again (all three when none are named); the topic keeps its policy entry."""
        with self._lock:
            self._denied[topic] = self._denied.get(topic, frozenset()) - _operations(operations or OPERATIONS)
        return self

    def deny_group(self, group_id: str) -> AclPolicy:
        with self._lock:
            self._groups |= {group_id}
        return self

    def allow_group(self, group_id: str) -> AclPolicy:
        with self._lock:
            self._groups -= {group_id}
        return self

    def hide(self, topic: str) -> AclPolicy:
        with self._lock:
            self._hidden |= {topic}
        return self

    def reveal(self, topic: str) -> AclPolicy:
        with self._lock:
            self._hidden -= {topic}
        return self

    @property
    def denied(self) -> dict[str, frozenset[str]]:
        with self._lock:
            return dict(self._denied)

    @property
    def denied_groups(self) -> frozenset[str]:
        return self._groups

    @property
    def hidden(self) -> frozenset[str]:
        return self._hidden

    def refusal(self, topic: str, operation: str) -> int | None:
        """The error a broker answers `operation` on `topic` with, or None when it is allowed."""
        with self._lock:
            if operation in self._denied.get(topic, ()):
                return TOPIC_AUTHORIZATION_FAILED  # checked first: a denied topic's existence is not disclosed
            return UNKNOWN_TOPIC_OR_PARTITION if topic in self._hidden else None

    def authorized_operations(self, topic: str) -> int | None:
        """Metadata v8's bitfield of what may be done on `topic`; None when the policy says nothing of it."""
        with self._lock:
            if topic not in self._denied and topic not in self._hidden:
                return None
            denied = self._denied.get(topic, frozenset())
        return sum(1 << code for name, code in _ACL_CODES.items() if name not in denied)


def _operations(operations: Iterable[str]) -> frozenset[str]:
    ops = frozenset(operations)
    unknown = ops - set(OPERATIONS)
    if unknown:
        raise ValueError(f"unknown operations {sorted(unknown)}; expected some of {OPERATIONS}")
    return ops


# ------------------------------------------------------------------------------------------ schemas

_PARTITIONS_V7 = Array(("error_code", Int16), ("partition", Int32), ("leader", Int32), ("leader_epoch", Int32),
                       ("replicas", Array(Int32)), ("isr", Array(Int32)), ("offline_replicas", Array(Int32)))
_TOPIC_V7 = (("error_code", Int16), ("topic", String("utf-8")), ("is_internal", Boolean),
             ("partitions", _PARTITIONS_V7))
_RESPONSE_V5 = metadata.MetadataResponse_v5.SCHEMA
_HEAD_V5 = tuple(zip(_RESPONSE_V5.names[:-1], _RESPONSE_V5.fields[:-1], strict=True))  # all but the topics
# aiokafka stops at Metadata v5; v6 only bumps the version, v7 adds leader_epoch, v8 authorized operations.
_METADATA_NEWER = {
    6: (metadata.MetadataRequest_v5.SCHEMA, _RESPONSE_V5),
    7: (metadata.MetadataRequest_v5.SCHEMA, Schema(*_HEAD_V5, ("topics", Array(*_TOPIC_V7)))),
    8: (Schema(("topics", Array(String("utf-8"))), ("allow_auto_topic_creation", Boolean),
               ("include_cluster_authorized_operations", Boolean),
               ("include_topic_authorized_operations", Boolean)),
        Schema(*_HEAD_V5, ("topics", Array(*_TOPIC_V7, ("topic_authorized_operations", Int32))),
               ("cluster_authorized_operations", Int32))),
}
# Versions aiokafka has no class for, whose layout is an older version's: (api_key, version) -> that version.
_SAME_AS = {(JOIN_GROUP, 3): 2, (JOIN_GROUP, 4): 2, (SYNC_GROUP, 2): 1}


def _schemas() -> dict[tuple[int, int], tuple[Schema, Schema]]:
    found: dict[tuple[int, int], tuple[Schema, Schema]] = {}
    for module in (produce, fetch, offset, metadata, commit, group, coordination):
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, RequestStruct) and obj.__module__ == module.__name__:
                found[obj.API_KEY, obj.API_VERSION] = (obj.SCHEMA, obj.RESPONSE_TYPE.SCHEMA)
    found.update({(METADATA, version): pair for version, pair in _METADATA_NEWER.items()})
    found.update({key: found[key[0], older] for key, older in _SAME_AS.items()})
    return found


SCHEMAS = _schemas()


def _decode(schema: Schema, data: bytes) -> dict[str, Any]:
    return dict(zip(schema.names, schema.decode(BytesIO(data)), strict=True))


def _encode(schema: Schema, values: Mapping[str, Any]) -> bytes:
    return schema.encode([values[name] for name in schema.names])


def _field(schema: Schema, name: str) -> Any:
    return schema.fields[schema.names.index(name)]


def _default(name: str, kind: Any) -> Any:
    """What a broker puts in a field it has nothing for: -1, "", b"", [], False; no throttle, no error."""
    if name in ("throttle_time_ms", "error_code", "session_id"):
        return 0
    if name == "error_message":
        return None
    if isinstance(kind, Array):
        return []
    if isinstance(kind, String):
        return ""
    if kind is Bytes:
        return b""
    if kind is Boolean:
        return False
    return -1


def _blank(schema: Schema, **values: Any) -> dict[str, Any]:
    """Every field of `schema`: `values` by name, defaults elsewhere."""
    return {name: values[name] if name in values else _default(name, kind)
            for name, kind in zip(schema.names, schema.fields, strict=True)}


def _entry(schema: Schema, **values: Any) -> tuple[Any, ...]:
    """One array entry of `schema`, as _blank fills it."""
    return tuple(_blank(schema, **values).values())


# ------------------------------------------------------------------------------------------ frames


@dataclass(frozen=True)
class Forward:
    """Send `frame` to the broker; pass its answer through `rewrite` (None: unchanged)."""

    frame: bytes
    rewrite: Callable[[bytes], bytes] | None = None
    answered: bool = True  # False for a Produce with acks=0, which gets no answer


@dataclass(frozen=True)
class Answer:
    """Answer the client with `frame` (a response frame without its size) instead of asking the broker."""

    frame: bytes


@dataclass(frozen=True)
class Close:
    """Close the connection; kind and reason go into the front's events."""

    kind: str
    reason: str


Step = Forward | Answer | Close


@dataclass(frozen=True)
class _Request:
    api_key: int
    version: int
    correlation_id: int
    header: bytes  # up to the body, kept as the client sent it
    body: bytes

    @property
    def schemas(self) -> tuple[Schema, Schema]:
        return SCHEMAS[self.api_key, self.version]

    def values(self) -> dict[str, Any]:
        return _decode(self.schemas[0], self.body)

    def with_body(self, values: Mapping[str, Any]) -> bytes:
        return self.header + _encode(self.schemas[0], values)

    def answer(self, values: Mapping[str, Any]) -> Answer:
        return Answer(self.correlation_id.to_bytes(4, "big", signed=True) + _encode(self.schemas[1], values))


def _parse(frame: bytes) -> _Request:
    api_key, version, correlation_id, client_id_size = struct.unpack_from(">hhih", frame)
    end = 10 + max(client_id_size, 0)  # the v1 request header: every version rewritten here uses it
    return _Request(api_key, version, correlation_id, frame[:end], frame[end:])


def _response_body(frame: bytes) -> tuple[bytes, bytes]:
    """(correlation id, body): every response rewritten here has the v0 response header."""
    return frame[:4], frame[4:]


class AclSession:
    """One client connection's requests, checked against the policy: each becomes a Forward, Answer or Close."""

    def __init__(self, policy: AclPolicy, note: Callable[[str, str], None]) -> None:
        self._policy = policy
        self._note = note  # (kind, detail) for the front's events: "denied" for each refusal

    def request(self, frame: bytes) -> Step:
        if len(frame) < 10:
            return Forward(frame)
        request = _parse(frame)
        if request.api_key == API_VERSIONS:
            return Forward(frame, _cap_api_versions(request.version))
        if request.api_key not in MAX_VERSIONS:
            return Forward(frame)
        if (request.api_key, request.version) not in SCHEMAS or request.version > MAX_VERSIONS[request.api_key]:
            return Close("error", f"api_key={request.api_key} v{request.version}: a version the ACL front "
                                  "cannot check (ApiVersions caps it); the client ignored the cap")
        if request.api_key == METADATA:
            return self._metadata(request)
        if request.api_key in GROUP_APIS:
            return self._group(request)
        operation = {PRODUCE: "write", FETCH: "read", LIST_OFFSETS: "describe"}[request.api_key]
        return self._partitions(request, operation)

    def _metadata(self, request: _Request) -> Step:
        values = request.values()
        named = values["topics"]
        all_topics = named is None or (request.version == 0 and not named)
        refused: list[tuple[str, int]] = []
        if not all_topics:
            for topic in named:
                code = self._policy.refusal(topic, "describe")
                if code is not None:
                    refused.append((topic, code))
                    self._note("denied", f"describe {topic}: error {code}")
            values["topics"] = [topic for topic in named if self._policy.refusal(topic, "describe") is None]
        asked = None if all_topics else set(values["topics"])
        report = bool(values.get("include_topic_authorized_operations"))
        schema = request.schemas[1]
        topic_schema = _field(schema, "topics").array_of

        def rewrite(frame: bytes) -> bytes:
            correlation, body = _response_body(frame)
            answer = _decode(schema, body)
            name_at = topic_schema.names.index("topic")
            entries = [entry for entry in answer["topics"]  # "all topics" lists neither hidden nor denied ones
                       if self._policy.refusal(entry[name_at], "describe") is None
                       and (asked is None or entry[name_at] in asked)]
            entries += [_entry(topic_schema, error_code=code, topic=topic, topic_authorized_operations=NOT_REPORTED)
                        for topic, code in refused]
            if report and "topic_authorized_operations" in topic_schema.names:
                entries = [self._with_operations(topic_schema, entry) for entry in entries]
            answer["topics"] = entries
            return correlation + _encode(schema, answer)

        return Forward(request.with_body(values), rewrite)

    def _with_operations(self, topic_schema: Schema, entry: tuple[Any, ...]) -> tuple[Any, ...]:
        """The entry, reporting the policy's operations where it has an entry (and Describe is allowed)."""
        values = dict(zip(topic_schema.names, entry, strict=True))
        operations = self._policy.authorized_operations(values["topic"])
        if operations is not None and values["error_code"] != TOPIC_AUTHORIZATION_FAILED:
            values["topic_authorized_operations"] = operations
        return tuple(values.values())

    def _partitions(self, request: _Request, operation: str) -> Step:
        """Produce, Fetch, ListOffsets: refuse per partition, forward the rest and merge the answers."""
        values = request.values()
        refused: list[tuple[str, list[int], int]] = []
        kept = []
        for topic, partitions in values["topics"]:
            code = self._policy.refusal(topic, operation)
            if code is None:
                kept.append((topic, partitions))
            else:
                refused.append((topic, [p[0] for p in partitions], code))
                self._note("denied", f"{operation} {topic}: error {code}")
        unanswered = request.api_key == PRODUCE and values["required_acks"] == 0
        if not refused:
            return Forward(request.header + request.body, answered=not unanswered)
        if unanswered:
            # Kafka cannot answer acks=0, so it closes the connection to tell the producer.
            return Close("denied", f"write {refused[0][0]} with acks=0: connection closed")
        schema = request.schemas[1]
        topics_schema = _field(schema, "topics").array_of
        partition_schema = _field(topics_schema, "partitions").array_of
        refusals = [(topic, [_entry(partition_schema, partition=p, error_code=code) for p in partitions])
                    for topic, partitions, code in refused]
        if not kept:
            return request.answer(_blank(schema, topics=refusals))
        values["topics"] = kept

        def rewrite(frame: bytes) -> bytes:
            correlation, body = _response_body(frame)
            answer = _decode(schema, body)
            answer["topics"] = [*answer["topics"], *refusals]
            return correlation + _encode(schema, answer)

        return Forward(request.with_body(values), rewrite)

    def _group(self, request: _Request) -> Step:
        values = request.values()
        group_id = values[request.schemas[0].names[0]]  # every group request starts with the group id
        if request.api_key == FIND_COORDINATOR and values.get("coordinator_type", 0) != 0:
            return Forward(request.header + request.body)  # a transaction coordinator
        if group_id not in self._policy.denied_groups:
            return Forward(request.header + request.body)
        self._note("denied", f"group {group_id}: error {GROUP_AUTHORIZATION_FAILED}")
        schema = request.schemas[1]
        answer = _blank(schema, error_code=GROUP_AUTHORIZATION_FAILED)
        if request.api_key == FIND_COORDINATOR and "error_message" in answer:
            answer["error_message"] = "Group authorization failed."
        per_partition = request.api_key == OFFSET_COMMIT or (request.api_key == OFFSET_FETCH and request.version < 2)
        if per_partition:
            partition_schema = _field(_field(schema, "topics").array_of, "partitions").array_of
            answer["topics"] = [
                (topic, [_entry(partition_schema, partition=p if isinstance(p, int) else p[0],
                                error_code=GROUP_AUTHORIZATION_FAILED) for p in partitions])
                for topic, partitions in values["topics"] or []]
        return request.answer(answer)


# ------------------------------------------------------------------------------------------ ApiVersions


def _cap_api_versions(version: int) -> Callable[[bytes], bytes]:
    """Lower the broker's max version of each rewritten API to what this module decodes."""

    def rewrite(frame: bytes) -> bytes:
        correlation, body = _response_body(frame)  # ApiVersions answers with the v0 header at every version
        if int.from_bytes(body[:2], "big") != 0:
            return frame  # an error answer (e.g. UNSUPPORTED_VERSION) is in the v0 layout
        patched = bytearray(body)
        data = BytesIO(body)
        data.seek(2)
        flexible = version >= 3
        count = UnsignedVarInt32.decode(data) - 1 if flexible else Int32.decode(data)
        for _ in range(count):
            at = data.tell()
            api_key, _, max_version = Int16.decode(data), Int16.decode(data), Int16.decode(data)
            if api_key in MAX_VERSIONS and max_version > MAX_VERSIONS[api_key]:
                patched[at + 4:at + 6] = Int16.encode(MAX_VERSIONS[api_key])
            if flexible:
                TaggedFields.decode(data)
        return correlation + bytes(patched)

    return rewrite
