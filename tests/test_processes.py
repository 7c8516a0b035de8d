"""`imgstream worker --processes N`: N workers of one group on one host, each with its own HTTP port; a stop
signal drains them all and nothing is lost."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from imgstream.consumer.processes import child_config
from imgstream.producer.embedded_broker import find_free_port
from imgstream.schemas.config import WorkerConfig
from tests.worker_procs import (  # noqa: F401 - fixture
    FACE_TASKS,
    ResultReader,
    produce_paced,
    request_bytes,
    small_photo,
    workers,
)


def _consumed(worker, port_offset: int) -> float:
    status, body, _ = worker.get("/metrics", port=worker.http_port + port_offset)
    assert status == 200, (status, body[:200])
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    return sum(s.value for s in families["imgstream_requests_consumed"].samples if s.name.endswith("_total"))


def test_each_worker_gets_its_own_port_and_client_id():
    config = WorkerConfig(processes=3, http_port=9100)
    children = [child_config(config, i) for i in range(3)]
    assert [c.http_port for c in children] == [9100, 9101, 9102]
    assert [c.kafka.client_id for c in children] == ["imgstream-0", "imgstream-1", "imgstream-2"]
    assert all(c.processes == 1 for c in children)
    assert child_config(WorkerConfig(processes=2), 1).http_port is None


async def test_two_processes_share_the_partitions_and_drain_on_one_sigterm(broker, topics, workers, tmp_path):
    image = {"blob": small_photo(tmp_path / "face.jpg").as_uri()}
    port = find_free_port()
    worker = workers.start(args=["--processes", "2"], http_port=port)
    await worker.wait_for_log(r"partitions assigned", timeout_s=180, count=2)
    messages = [(f"p-{i}".encode(), request_bytes(f"p-{i}", image)) for i in range(40)]
    async with ResultReader(broker, topics.results) as reader:
        await produce_paced(broker, topics.requests, messages)
        await reader.wait_for(40 * len(FACE_TASKS), timeout_s=180, workers=[worker])
        # Both worker processes took requests, each counted on its own port.
        counts = [_consumed(worker, 0), _consumed(worker, 1)]
        assert sum(counts) >= 40 and all(n > 0 for n in counts), counts
    assert await worker.terminate(timeout_s=90) == 0
    log = worker.log()
    assert log.count("worker stopped") == 2, worker.tail()
    assert "started 2 worker processes" in log and "worker processes stopped (exit statuses 0, 0)" in log
