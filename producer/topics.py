"""Creating imgstream's topics and waiting for a broker to answer."""

from __future__ import annotations

import asyncio
import time

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    InvalidConfigurationError,
    KafkaError,
    PolicyViolationError,
    TopicAlreadyExistsError,
    for_code,
)

from schemas.config import Topics

# Error codes meaning "the broker refused a topic config": retry without configs.
_CONFIG_REJECTED = {InvalidConfigurationError.errno, PolicyViolationError.errno}


class BrokerUnavailableError(RuntimeError):
    """No Kafka broker answered at the bootstrap address in time."""


def topic_names(topics: Topics) -> list[str]:
    """The distinct topic names in `topics`, in field order."""
    return list(dict.fromkeys(topics.model_dump().values()))


async def wait_for_broker(bootstrap: str, timeout_s: float = 30.0) -> None:
    """Retry with backoff until the broker at `bootstrap` answers a metadata request."""
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    last_error: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            # start() bootstraps the client, which is a Metadata request to the broker.
            await asyncio.wait_for(admin.start(), timeout=max(remaining, 0.1))
            return
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            last_error = exc
        finally:
            await admin.close()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerUnavailableError(
                f"no Kafka broker answered at {bootstrap} within {timeout_s:.0f}s (last error: {last_error!r})"
            )
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, 2.0)


async def create_topics(
    bootstrap: str,
    topics: Topics,
    partitions: int = 4,
    replication: int = 1,
    *,
    max_message_bytes: int | None = None,
) -> list[str]:
    """Create the topics that do not exist yet and return their names; existing ones are left alone.

    `max_message_bytes` sets the topic's `max.message.bytes` where the broker accepts it.
    """
    configs = {"max.message.bytes": str(max_message_bytes)} if max_message_bytes is not None else {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="imgstream-admin")
    await admin.start()
    try:
        names = topic_names(topics)
        errors = await _create(admin, names, partitions, replication, configs)
        rejected = [name for name, code in errors.items() if code in _CONFIG_REJECTED]
        if rejected:
            # The topic config is an optimisation (Apache Kafka's limit); the topic matters more.
            errors.update(await _create(admin, rejected, partitions, replication, {}))
        failed = {name: code for name, code in errors.items() if code not in (0, TopicAlreadyExistsError.errno)}
        if failed:
            detail = ", ".join(f"{name}: {for_code(code).__name__}" for name, code in failed.items())
            raise KafkaError(f"could not create topics ({detail})")
        return [name for name in names if errors.get(name) == 0]
    finally:
        await admin.close()


async def _create(
    admin: AIOKafkaAdminClient, names: list[str], partitions: int, replication: int, configs: dict[str, str]
) -> dict[str, int]:
    """Send one CreateTopics request; the error code for each topic (0 = created)."""
    new = [NewTopic(name, partitions, replication, topic_configs=configs) for name in names]
    response = await admin.create_topics(new)
    # Each entry is (topic, error_code[, error_message]) depending on the protocol version.
    return {entry[0]: entry[1] for entry in response.topic_errors}
