"""Consumers, producers and admin clients built from `kafka.*` settings, started with a diagnosis."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Union

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import errors as kerrors
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient

from imgstream.kafka_clients.diagnose import diagnose
from imgstream.kafka_clients.errors import BrokerUnreachable, KafkaSetupError, explain_runtime_error
from imgstream.kafka_clients.partitioner import KeyPartitioner
from imgstream.kafka_clients.security import connection_args
from imgstream.schemas.config import KafkaConfig

log = logging.getLogger("imgstream.kafka")

# A bare bootstrap string stands for a PLAINTEXT connection with default settings (tests, scripts).
KafkaLike = Union[KafkaConfig, str]
# What a broker without an idempotent producer answers to InitProducerId (the embedded broker: UnknownError).
_NO_IDEMPOTENCE = (kerrors.UnknownError, kerrors.UnsupportedVersionError, kerrors.ClusterAuthorizationFailedError)


def kafka_settings(kafka: KafkaLike) -> KafkaConfig:
    return kafka if isinstance(kafka, KafkaConfig) else KafkaConfig(bootstrap=kafka)


def _common_args(kafka: KafkaConfig, role: str) -> dict[str, Any]:
    return {"bootstrap_servers": kafka.bootstrap, "client_id": f"{kafka.client_id}-{role}",
            "request_timeout_ms": kafka.request_timeout_ms, **connection_args(kafka)}


def producer_args(kafka: KafkaLike, role: str, **overrides: Any) -> dict[str, Any]:
    """AIOKafkaProducer's arguments: security, `kafka.producer.*` and the message size limit."""
    kafka = kafka_settings(kafka)
    tuning = kafka.producer.model_dump()
    tuning["compression_type"] = None if tuning["compression_type"] == "none" else tuning["compression_type"]
    tuning["enable_idempotence"] = tuning["enable_idempotence"] in (True, "auto") and tuning["acks"] == "all"
    return {**_common_args(kafka, role), **tuning, "max_request_size": kafka.max_message_bytes,
            "partitioner": KeyPartitioner(), **overrides}


def consumer_args(kafka: KafkaLike, role: str, group_id: str | None, **overrides: Any) -> dict[str, Any]:
    """AIOKafkaConsumer's arguments: security, `kafka.consumer.*`, and the group's timeouts when in a group."""
    kafka = kafka_settings(kafka)
    args = {**_common_args(kafka, role), **kafka.consumer.model_dump(), "group_id": group_id,
            "enable_auto_commit": False, "fetch_max_wait_ms": kafka.fetch_max_wait_ms}
    if group_id is None:
        return {**args, **overrides}
    args.update(session_timeout_ms=kafka.session_timeout_ms, max_poll_interval_ms=kafka.max_poll_interval_ms,
                heartbeat_interval_ms=max(1000, kafka.session_timeout_ms // 3))
    args.update(overrides)
    # A JoinGroup is answered only when the group has rebalanced: its request must outwait that.
    rebalance_ms = args.get("rebalance_timeout_ms") or args["session_timeout_ms"]
    args["request_timeout_ms"] = max(args["request_timeout_ms"], rebalance_ms + 5000)
    return args


async def _started(client: Any, kafka: KafkaConfig, what: str, passthrough: tuple[type[Exception], ...] = (),
                   permission: str = "Read") -> Any:
    """`client` started, or closed and the reason raised: KafkaSetupError (change a setting) or
    BrokerUnreachable (retry); `passthrough` errors are raised as they are. `what` is what the
    client is for, for a refused permission's message ("read imgstream.requests as group g")."""
    start = getattr(client, "start", None) or client.bootstrap  # AIOKafkaClient only bootstraps
    try:
        await start()
        return client
    except BaseException as exc:
        await _close_quietly(client)
        if isinstance(exc, (KafkaSetupError, *passthrough)) or not isinstance(exc, Exception):
            raise
        refused = explain_runtime_error(exc, what, permission)  # the broker answered, and said no
        raise (refused or await diagnose(kafka, exc)) from exc


async def open_producer(kafka: KafkaLike, role: str = "producer", **overrides: Any) -> AIOKafkaProducer:
    """A started producer. With `enable_idempotence: auto`, a broker that cannot do it gets a plain one."""
    kafka = kafka_settings(kafka)
    args = producer_args(kafka, role, **overrides)
    probing = args["enable_idempotence"] and kafka.producer.enable_idempotence == "auto"
    sender_log = logging.getLogger("aiokafka.producer.sender")
    if probing:  # a refusal is expected here and said below (INFO), not as aiokafka's ERROR line
        sender_log.addFilter(_quiet_init_producer_id)
    try:
        return await _started(AIOKafkaProducer(**args), kafka, "produce",
                              _NO_IDEMPOTENCE if args["enable_idempotence"] else (), permission="Write")
    except _NO_IDEMPOTENCE as exc:
        if kafka.producer.enable_idempotence != "auto":
            raise KafkaSetupError("configuration", f"the broker refused an idempotent producer "
                                  f"({type(exc).__name__}): set kafka.producer.enable_idempotence to auto or "
                                  "false, or grant the principal IdempotentWrite") from None
        log.info("the broker refused an idempotent producer (%s); producing without idempotence "
                 "(kafka.producer.enable_idempotence)", type(exc).__name__)
        return await _started(AIOKafkaProducer(**{**args, "enable_idempotence": False}), kafka, "produce",
                              permission="Write")
    finally:
        if probing:
            sender_log.removeFilter(_quiet_init_producer_id)


def _quiet_init_producer_id(record: logging.LogRecord) -> bool:
    """Drops aiokafka's "Unexpected error during InitProducerIdRequest" while open_producer probes whether
    the broker takes an idempotent producer (enable_idempotence: auto)."""
    return not record.getMessage().startswith("Unexpected error during InitProducerIdRequest")


async def open_consumer(kafka: KafkaLike, *topics: str, role: str = "consumer", group_id: str | None = None,
                        listener: ConsumerRebalanceListener | None = None, **overrides: Any) -> AIOKafkaConsumer:
    """A started consumer; subscribed to `topics` (with `listener`) when any are given."""
    kafka = kafka_settings(kafka)
    consumer = AIOKafkaConsumer(**consumer_args(kafka, role, group_id, **overrides))
    if topics:
        consumer.subscribe(list(topics), listener=listener)
    what = f"read {', '.join(topics) or 'topics'}" + (f" as group {group_id}" if group_id else "")
    return await _started(consumer, kafka, what)


async def open_client(kafka: KafkaLike, role: str = "client") -> AIOKafkaClient:
    """aiokafka's low-level client (requests the high-level clients do not make), bootstrapped."""
    kafka = kafka_settings(kafka)
    return await _started(AIOKafkaClient(**_common_args(kafka, role)), kafka, "read the cluster's metadata")


async def open_admin(kafka: KafkaLike, role: str = "admin", **overrides: Any) -> AIOKafkaAdminClient:
    kafka = kafka_settings(kafka)
    return await _started(AIOKafkaAdminClient(**{**_common_args(kafka, role), **overrides}), kafka,
                          "use the cluster's admin API")


async def check_login(kafka: KafkaLike) -> None:
    """Connect once and leave: raises KafkaSetupError when the cluster refuses these settings. A broker
    that does not answer passes (long-running commands wait for it)."""
    try:
        admin = await open_admin(kafka, role="preflight")
    except BrokerUnreachable as exc:
        log.warning("broker %s unreachable (%s); the login is checked when it answers",
                    kafka_settings(kafka).bootstrap, exc)
        return
    await _close_quietly(admin)


async def _close_quietly(client: Any) -> None:
    close = getattr(client, "stop", None) or client.close
    try:
        await asyncio.wait_for(close(), 5.0)
    except Exception:  # noqa: BLE001 - closing a client that never started may fail in many ways
        pass
