"""consumer.batches through the Publisher against the real broker: results out in batches per partition,
where aiokafka's partitioner would put them, in order per request, and alone when a batch fails."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiokafka.errors import KafkaTimeoutError
from aiokafka.partitioner import DefaultPartitioner

from imgstream.consumer.publish import Publisher
from imgstream.kafka_clients import open_producer
from imgstream.schemas.config import KafkaConfig
from tests.kafka_helpers import consume_all

LIMIT = 1_000_000


@pytest.fixture
async def publisher(broker, topics):
    producer = await open_producer(KafkaConfig(bootstrap=broker, topics=topics))
    publisher = Publisher(producer, topics.results, topics.dlq, LIMIT, batch_linger_s=0.005)
    yield publisher
    await publisher.close()
    await producer.stop()


def payloads(request: int, count: int) -> list[bytes]:
    return [orjson.dumps({"request": request, "n": n}) for n in range(count)]


async def test_results_go_out_in_batches_where_aiokafka_would_put_them_in_order(broker, topics, publisher):
    refused = await asyncio.gather(*(publisher.results(f"req-{i}", payloads(i, 3)) for i in range(200)))
    assert refused == [{}] * 200
    batches = publisher.batches
    assert batches.records_sent == 600 and batches.batches_sent < 60, (batches.batches_sent, batches.records_sent)
    records = await consume_all(broker, topics.results, 600)
    assert len(records) == 600
    every = list(range(4))
    seen: dict[bytes, list[int]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        assert record.partition == DefaultPartitioner()(record.key, every, every)
        seen.setdefault(record.key, []).append(orjson.loads(record.value)["n"])
    assert seen == {f"req-{i}".encode(): [0, 1, 2] for i in range(200)}  # each request's results in order


async def test_a_failed_batch_sends_its_records_alone(broker, topics, publisher, monkeypatch):
    async def broker_times_out(*args, **kwargs):
        raise KafkaTimeoutError()

    monkeypatch.setattr(publisher.producer, "send_batch", broker_times_out)
    refused = await asyncio.gather(*(publisher.results(f"req-{i}", payloads(i, 2)) for i in range(20)))
    assert refused == [{}] * 20
    assert publisher.batches.batches_sent == 0
    records = await consume_all(broker, topics.results, 40)
    assert sorted(r.value for r in records) == sorted(p for i in range(20) for p in payloads(i, 2))


async def test_a_record_over_the_request_size_goes_alone_and_is_refused_there(publisher):
    assert publisher.batches.add(b"k", b"x" * LIMIT, None) is None
    refused = await publisher.results("big", [b"x" * LIMIT, b"{}"])
    assert list(refused) == [0] and "MessageSizeTooLarge" in type(refused[0]).__name__
    assert publisher.outcomes["results", "refused"] == 1


async def test_closing_sends_what_is_open(broker, topics, publisher):
    publisher.batches.linger_s = 60.0  # only the close can send it
    waiter = publisher.batches.add(b"late", b'{"late": true}', [("trace", b"t")])
    assert waiter is not None and not waiter.done()
    await publisher.close()
    assert waiter.done() and waiter.exception() is None
    (record,) = await consume_all(broker, topics.results, 1)
    assert (record.key, record.value, list(record.headers)) == (b"late", b'{"late": true}', [("trace", b"t")])


async def test_a_cancelled_publish_leaves_no_outcome_unread(publisher):
    """A request abandoned while its results wait (a hard stop) takes every one of its waiters with it."""
    publisher.batches.linger_s = 60.0
    publishing = asyncio.create_task(publisher.results("gone", payloads(0, 3)))
    await asyncio.sleep(0.05)
    (batch,) = publisher.batches._open.values()
    assert len(batch.waiters) == 3
    publishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await publishing
    assert all(waiter.cancelled() for waiter in batch.waiters)
