"""kafka_clients.partitioner: the same partition as aiokafka's and the Java client's for every key."""

from __future__ import annotations

import uuid

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from imgstream.kafka_clients.build import producer_args
from imgstream.kafka_clients.partitioner import KeyPartitioner, murmur2
from imgstream.schemas.config import KafkaConfig

# org.apache.kafka.common.utils.UtilsTest#testMurmur2 (signed Java ints).
JAVA = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize("key", list(JAVA))
def test_murmur2_is_the_java_clients(key):
    assert murmur2(key) == JAVA[key] & 0xFFFFFFFF


@settings(max_examples=500, deadline=None, database=None)
@given(key=st.binary(max_size=300))
def test_murmur2_is_aiokafkas(key):
    assert murmur2(key) == aiokafka_murmur2(key)


@settings(max_examples=300, deadline=None, database=None)
@given(key=st.one_of(st.binary(max_size=64), st.uuids().map(lambda u: str(u).encode())),
       partitions=st.integers(1, 64))
def test_a_keyed_record_goes_where_aiokafkas_partitioner_sends_it(key, partitions):
    every = list(range(partitions))
    assert KeyPartitioner()(key, every, every[:1]) == DefaultPartitioner()(key, every, every[:1])


def test_an_unkeyed_record_goes_to_an_available_partition():
    assert {KeyPartitioner()(None, [0, 1, 2, 3], [2]) for _ in range(20)} == {2}
    assert KeyPartitioner()(None, [0, 1, 2, 3], []) in {0, 1, 2, 3}


def test_every_producer_is_built_with_it():
    assert isinstance(producer_args(KafkaConfig(), "worker")["partitioner"], KeyPartitioner)
    key = str(uuid.uuid4()).encode()
    assert KeyPartitioner()(key, list(range(12)), []) == DefaultPartitioner()(key, list(range(12)), [])
