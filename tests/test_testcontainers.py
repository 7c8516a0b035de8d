"""Apache Kafka in a container (testcontainers): the same produce/consume path as production.

Skips with the reason when this machine has no Docker engine. To run the whole suite on
Apache Kafka instead of the embedded broker: KAFKA_TEST_BROKER=testcontainers make test.
"""

from __future__ import annotations

import pytest

from imgstream.producer.topics import create_topics
from tests.conftest import docker_engine_reason
from tests.kafka_helpers import consume_all, produce, unique_topics


@pytest.fixture(scope="module")
def apache_kafka():
    reason = docker_engine_reason()
    if reason:
        pytest.skip(f"testcontainers needs a Docker engine: {reason}")
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer() as kafka:
        yield kafka.get_bootstrap_server()


async def test_topics_and_round_trip_on_apache_kafka(apache_kafka):
    topics = unique_topics("tc")
    await create_topics(apache_kafka, topics, partitions=2, max_message_bytes=1_000_000)
    await produce(apache_kafka, topics.requests, [(b"k", b"v", [("h", b"1")])])
    (record,) = await consume_all(apache_kafka, topics.requests, 1, timeout_s=30)
    assert (record.key, record.value) == (b"k", b"v")
