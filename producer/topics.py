"""Creating imgstream's topics and waiting for a broker to answer."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    InvalidConfigurationError,
    KafkaError,
    PolicyViolationError,
    TopicAlreadyExistsError,
    for_code,
)

from imgstream.kafka_clients import BrokerUnreachable, KafkaLike, kafka_settings, open_admin
from imgstream.schemas.config import Topics, TopicSettingsByTopic

log = logging.getLogger("imgstream.topics")

# Error codes meaning "the broker refused a topic config": retry without configs.
_CONFIG_REJECTED = {InvalidConfigurationError.errno, PolicyViolationError.errno}


class BrokerUnavailableError(RuntimeError):
    """No Kafka broker answered at the bootstrap address in time."""


@dataclass(frozen=True)
class TopicPlan:
    """One topic as `create_topics` makes it: its name, partitions and topic configs."""

    name: str
    partitions: int
    configs: dict[str, str]


def topic_names(topics: Topics) -> list[str]:
    """The distinct topic names in `topics`, in field order."""
    return list(dict.fromkeys(topics.model_dump().values()))


def topic_plans(
    topics: Topics,
    settings: TopicSettingsByTopic | None = None,
    *,
    partitions: int | None = None,
    max_message_bytes: int | None = None,
) -> list[TopicPlan]:
    """The plan of each distinct topic: `settings` per topic (defaults: `TopicSettingsByTopic()`).

    `partitions` overrides every topic's partitions; `max_message_bytes` is the limit of the
    topics whose settings leave it unset (none when both are unset).
    """
    settings = settings or TopicSettingsByTopic()
    plans: dict[str, TopicPlan] = {}
    for role, name in topics.model_dump().items():
        if name in plans:  # two roles on one topic: the first role's settings make it
            continue
        own = getattr(settings, role)
        configs = {"retention.ms": str(own.retention_ms), "compression.type": own.compression_type}
        limit = own.max_message_bytes if own.max_message_bytes is not None else max_message_bytes
        if limit is not None:
            configs["max.message.bytes"] = str(limit)
        plans[name] = TopicPlan(name, partitions or own.partitions, configs)
    return list(plans.values())


async def wait_for_broker(kafka: KafkaLike, timeout_s: float = 30.0) -> None:
    """Retry with backoff until the broker answers a metadata request.

    A refused login or certificate (KafkaSetupError) is raised at once: waiting cannot fix it.
    """
    kafka = kafka_settings(kafka)
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    last_error: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        try:
            # start() bootstraps the client, which is a Metadata request to the broker.
            admin = await asyncio.wait_for(open_admin(kafka, request_timeout_ms=5000), timeout=max(remaining, 0.1))
            await admin.close()
            return
        except (BrokerUnreachable, asyncio.TimeoutError) as exc:
            last_error = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerUnavailableError(
                f"no Kafka broker answered at {kafka.bootstrap} within {timeout_s:.0f}s (last error: {last_error})"
            )
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, 2.0)


async def create_topics(
    kafka: KafkaLike,
    topics: Topics,
    partitions: int | None = None,
    replication: int = 1,
    *,
    max_message_bytes: int | None = None,
    settings: TopicSettingsByTopic | None = None,
) -> list[str]:
    """Create the topics that do not exist yet and return their names; existing ones are left alone.

    Each topic gets its `settings` (see `topic_plans`); a broker that refuses a topic config
    gets the topic without configs, and a warning says so.
    """
    plans = topic_plans(topics, settings, partitions=partitions, max_message_bytes=max_message_bytes)
    admin = await open_admin(kafka)
    try:
        errors = await _create(admin, plans, replication)
        rejected = [plan for plan in plans if errors.get(plan.name) in _CONFIG_REJECTED]
        if rejected:
            # The topic matters more than its configs (a broker policy may forbid some of them).
            log.warning("the broker refused the topic configs of %s; created without them",
                        ", ".join(plan.name for plan in rejected))
            bare = [TopicPlan(plan.name, plan.partitions, {}) for plan in rejected]
            errors.update(await _create(admin, bare, replication))
        failed = {name: code for name, code in errors.items() if code not in (0, TopicAlreadyExistsError.errno)}
        if failed:
            detail = ", ".join(f"{name}: {for_code(code).__name__}" for name, code in failed.items())
            raise KafkaError(f"could not create topics ({detail})")
        return [plan.name for plan in plans if errors.get(plan.name) == 0]
    finally:
        await admin.close()


async def topic_differences(kafka: KafkaLike, plans: list[TopicPlan]) -> dict[str, list[str]]:
    """For each planned topic, how the topic on the broker differs from its plan (empty: it matches)."""
    admin = await open_admin(kafka)
    try:
        described = await admin.describe_topics([plan.name for plan in plans])
        partitions = {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}
        resources = [ConfigResource(ConfigResourceType.TOPIC, plan.name, None) for plan in plans]
        actual: dict[str, dict[str, str | None]] = {}
        for response in await admin.describe_configs(resources):
            for error_code, _, _, name, entries in response.resources:
                if error_code == 0:
                    actual[name] = {entry[0]: entry[1] for entry in entries}
    finally:
        await admin.close()
    differences: dict[str, list[str]] = {}
    for plan in plans:
        found = []
        if partitions.get(plan.name, plan.partitions) != plan.partitions:
            found.append(f"partitions {partitions[plan.name]} (settings: {plan.partitions})")
        configs = actual.get(plan.name, {})
        for key, wanted in plan.configs.items():
            if key in configs and configs[key] != wanted:
                found.append(f"{key}={configs[key]} (settings: {wanted})")
        differences[plan.name] = found
    return differences


async def _create(admin: AIOKafkaAdminClient, plans: list[TopicPlan], replication: int) -> dict[str, int]:
    """Send one CreateTopics request; the error code for each topic (0 = created)."""
    new = [NewTopic(plan.name, plan.partitions, replication, topic_configs=plan.configs) for plan in plans]
    response = await admin.create_topics(new)
    # Each entry is (topic, error_code[, error_message]) depending on the protocol version.
    return {entry[0]: entry[1] for entry in response.topic_errors}
