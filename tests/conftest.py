"""Shared fixtures: one Kafka-protocol broker per session, fresh topics per test.

The broker is the embedded Tansu by default. With KAFKA_TEST_BROKER=testcontainers the
same suite runs against Apache Kafka in a container (needs a Docker engine).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from imgstream.producer.embedded_broker import EmbeddedBroker
from imgstream.producer.topics import create_topics
from imgstream.schemas.config import Topics
from tests.kafka_helpers import unique_topics
from tests.secure_kafka import acl_listener, secure_cluster  # noqa: F401 - fixtures: TLS, SASL and ACL listeners


def docker_engine_reason() -> str | None:
    """None when a Docker engine answers; otherwise why testcontainers cannot run here."""
    try:
        import docker

        docker.from_env(timeout=5).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means: no engine to use
        return f"no Docker engine reachable ({type(exc).__name__}: {exc})"
    return None


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """Bootstrap address of a broker that lives for the whole test session."""
    if os.environ.get("KAFKA_TEST_BROKER", "embedded") == "testcontainers":
        reason = docker_engine_reason()
        if reason:
            pytest.skip(f"KAFKA_TEST_BROKER=testcontainers but {reason}")
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server()
        return
    with EmbeddedBroker() as embedded:
        yield embedded.bootstrap


@pytest.fixture
async def topics(broker: str) -> Topics:
    """Freshly created, uniquely named topics (4 partitions each) on the session broker."""
    names = unique_topics()
    await create_topics(broker, names, partitions=4)
    return names


@pytest.fixture(scope="session")
async def engine(tmp_path_factory):
    """One task engine for the session: random (seeded) weights, real MTCNN, on the CPU."""
    from imgstream.analysis.engine import Engine
    from imgstream.schemas.config import BatchConfig, ModelsConfig

    config = ModelsConfig(
        weights="random", device="cpu", classifiers_dir=str(tmp_path_factory.mktemp("classifiers")),
        batching={k: BatchConfig(max_batch_size=32, max_wait_ms=20)
                  for k in ("clip", "dino", "person", "face", "caption")},
    )
    engine = Engine(config)
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(scope="session")
def pg() -> Iterator[str]:
    """URI of an embedded PostgreSQL with pgvector (pgserver) that lives for the whole test session."""
    import shutil
    import tempfile

    from imgstream.sink.embedded_pg import start_embedded_postgres

    # Not under pytest's basetemp: as root, pgserver runs postgres as another user, and every new
    # pytest session chmods /tmp/pytest-of-root back to 0700, which would crash a running server.
    parent = tempfile.mkdtemp(prefix="imgstream-pg-")
    embedded = start_embedded_postgres(f"{parent}/data")
    yield embedded.uri
    embedded.stop()
    shutil.rmtree(parent, ignore_errors=True)
