"""Shared fixtures: one embedded Kafka-compatible broker per session, fresh topics per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from producer.embedded_broker import EmbeddedBroker
from producer.topics import create_topics
from schemas.config import Topics
from tests.kafka_helpers import unique_topics


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """Bootstrap address of a Tansu broker that lives for the whole test session."""
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
    from analysis.engine import Engine
    from schemas.config import BatchConfig, ModelsConfig

    config = ModelsConfig(
        weights="random", device="cpu", classifiers_dir=str(tmp_path_factory.mktemp("classifiers")),
        batching={k: BatchConfig(max_batch_size=32, max_wait_ms=20)
                  for k in ("clip", "dino", "person", "face", "caption")},
    )
    engine = Engine(config)
    await engine.start()
    yield engine
    await engine.close()
