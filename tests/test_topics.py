"""`imgstream topics create` against the real broker: per-topic partitions and configs, idempotent."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from imgstream.producer.topics import create_topics, topic_differences, topic_names, topic_plans
from imgstream.schemas.config import DAY_MS, KafkaConfig, TopicSettingsByTopic, load_config
from tests.kafka_helpers import unique_topics

CONFIG_KEYS = ("retention.ms", "compression.type", "max.message.bytes")


async def describe(bootstrap: str, names: list[str]) -> dict[str, tuple[int, dict[str, str]]]:
    """Each topic's partition count and the configs imgstream sets, as the broker reports them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topics = await admin.describe_topics(names)
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    finally:
        await admin.close()
    configs = {resource[3]: {entry[0]: entry[1] for entry in resource[4] if entry[0] in CONFIG_KEYS}
               for response in responses for resource in response.resources}
    return {t["topic"]: (len(t["partitions"]), configs[t["topic"]]) for t in topics}


async def test_each_topic_gets_its_own_partitions_retention_limit_and_compression(broker: str) -> None:
    names = unique_topics("plan")
    settings = TopicSettingsByTopic.model_validate({"results": {"retention_ms": 2 * DAY_MS, "partitions": 6}})

    created = await create_topics(broker, names, max_message_bytes=1_000_000, settings=settings)

    assert created == topic_names(names)
    assert await describe(broker, created) == {
        names.requests: (12, {"retention.ms": str(7 * DAY_MS), "compression.type": "producer",
                              "max.message.bytes": "1000000"}),
        names.replay: (12, {"retention.ms": str(3 * DAY_MS), "compression.type": "producer",
                            "max.message.bytes": "1000000"}),
        # a partial override keeps the topic's other defaults (zstd for results)
        names.results: (6, {"retention.ms": str(2 * DAY_MS), "compression.type": "zstd",
                            "max.message.bytes": "1000000"}),
        names.dlq: (1, {"retention.ms": str(30 * DAY_MS), "compression.type": "producer",
                        "max.message.bytes": "1000000"}),
        names.retry: (12, {"retention.ms": str(7 * DAY_MS), "compression.type": "producer",
                           "max.message.bytes": "1000000"}),
    }


async def test_existing_topics_are_left_alone_and_their_differences_reported(broker: str) -> None:
    names = unique_topics("drift")
    await create_topics(broker, names, partitions=2, max_message_bytes=1_000_000)
    changed = TopicSettingsByTopic.model_validate({"requests": {"retention_ms": DAY_MS}})

    again = await create_topics(broker, names, max_message_bytes=1_000_000, settings=changed)

    assert again == []
    found = await describe(broker, topic_names(names))
    assert found[names.requests] == (2, {"retention.ms": str(7 * DAY_MS), "compression.type": "producer",
                                         "max.message.bytes": "1000000"})
    plans = topic_plans(names, changed, max_message_bytes=1_000_000)
    assert await topic_differences(broker, plans) == {
        names.requests: ["partitions 2 (settings: 12)", f"retention.ms={7 * DAY_MS} (settings: {DAY_MS})"],
        names.replay: ["partitions 2 (settings: 12)"],
        names.results: ["partitions 2 (settings: 12)"],
        names.dlq: ["partitions 2 (settings: 1)"],
        names.retry: ["partitions 2 (settings: 12)"],
    }
    same = topic_plans(names, None, partitions=2, max_message_bytes=1_000_000)
    assert await topic_differences(broker, same) == dict.fromkeys(topic_names(names), [])


async def test_topics_create_command_reads_per_topic_settings_from_the_environment(broker: str) -> None:
    names = unique_topics("cli")
    env = dict(os.environ, IMGSTREAM_KAFKA__BOOTSTRAP=broker,
               IMGSTREAM_KAFKA__TOPICS__REQUESTS=names.requests, IMGSTREAM_KAFKA__TOPICS__REPLAY=names.replay,
               IMGSTREAM_KAFKA__TOPICS__RESULTS=names.results, IMGSTREAM_KAFKA__TOPICS__DLQ=names.dlq,
               IMGSTREAM_KAFKA__TOPICS__RETRY=names.retry,
               IMGSTREAM_KAFKA__TOPIC_SETTINGS__REQUESTS__PARTITIONS="3",
               IMGSTREAM_KAFKA__TOPIC_SETTINGS__DLQ__COMPRESSION_TYPE="gzip")

    async def run() -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "imgstream", "topics", "create",
                                                    env=env, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode()

    code, first = await run()
    assert code == 0
    assert f"{names.requests}: created (3 partitions, retention.ms={7 * DAY_MS}, compression.type=producer, " \
           "max.message.bytes=1000000)" in first.splitlines()
    assert f"{names.dlq}: created (1 partitions, retention.ms={30 * DAY_MS}, compression.type=gzip, " \
           "max.message.bytes=1000000)" in first.splitlines()
    assert (await describe(broker, [names.dlq]))[names.dlq][1]["compression.type"] == "gzip"

    env["IMGSTREAM_KAFKA__TOPIC_SETTINGS__REQUESTS__PARTITIONS"] = "4"
    code, second = await run()
    assert code == 0
    assert second.splitlines() == [
        f"{names.requests}: exists, differs from its settings: partitions 3 (settings: 4)",
        f"{names.replay}: exists", f"{names.results}: exists", f"{names.dlq}: exists", f"{names.retry}: exists",
    ]


def test_a_results_topic_smaller_than_the_result_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="results topic would refuse results"):
        KafkaConfig.model_validate({"max_message_bytes": 2_000_000,
                                    "topic_settings": {"results": {"max_message_bytes": 1_000_000}}})
    with pytest.raises(ValueError, match="compression_type"):
        load_config(environ={"IMGSTREAM_KAFKA__TOPIC_SETTINGS__RESULTS__COMPRESSION_TYPE": "brotli"})


async def test_zstd_compressed_results_are_readable(broker: str, topics) -> None:
    # Apache Kafka stores the results topic zstd-compressed (its compression.type), whatever the
    # worker sent: every imgstream consumer must decode zstd batches (aiokafka[zstd]).
    from aiokafka import AIOKafkaProducer

    from tests.kafka_helpers import consume_all

    producer = AIOKafkaProducer(bootstrap_servers=broker, compression_type="zstd", linger_ms=20)
    await producer.start()
    try:
        sent = [await producer.send(topics.results, b'{"n": %d}' % i, key=b"r") for i in range(50)]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    records = await consume_all(broker, topics.results, 50)
    assert [r.value for r in records] == [b'{"n": %d}' % i for i in range(50)]
