"""Deferred fetch retries and per-host politeness, through a running worker and the real broker: a
transient failure waits on the retry topic (never taken before it is due) instead of becoming a
final answer, other requests do not wait for it, and an image host is neither crowded nor asked
again before its Retry-After."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from imgstream.schemas.codec import decode_result
from imgstream.schemas.config import FetchConfig
from imgstream.schemas.events import DeferredRetry, ResultEvent
from tests.kafka_helpers import consume_all
from tests.test_request_failures import running_worker, until_committed
from tests.worker_procs import jpeg_bytes, produce_paced, request_bytes

TASKS = [{"operation_id": "box", "type": "detect_bounding_box",
          "params": {"target": "prominent_face", "face_context": "whole_image"}}]
JPEG = jpeg_bytes(96)


@dataclass
class ImageHost:
    """A local image host that fails, rate-limits or dawdles on request, and remembers when it was asked."""

    base: str = ""
    asked: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # path -> time.time()s
    window_until: float = 0.0  # /limited: answers 429 until then
    asked_in_window: int = 0
    in_flight: int = 0
    max_in_flight: int = 0

    def url(self, path: str) -> str:
        return self.base + path

    def asks(self, prefix: str) -> list[float]:
        return sorted(t for path, times in self.asked.items() if path.startswith(prefix) for t in times)


@pytest.fixture
async def host() -> AsyncIterator[ImageHost]:
    state = ImageHost()

    @web.middleware
    async def remember(request: web.Request, handler):
        state.asked[request.path].append(time.time())
        return await handler(request)

    async def flaky(request: web.Request) -> web.Response:
        """503 for the first `n` asks of this path, then the image."""
        if len(state.asked[request.path]) <= int(request.match_info["n"]):
            return web.Response(status=503, text="busy")
        return web.Response(body=JPEG, content_type="image/jpeg")

    async def down(_: web.Request) -> web.Response:
        return web.Response(status=503, text="down for maintenance")

    async def limited(request: web.Request) -> web.Response:
        """The whole host rate-limits: the first ask opens a window of `seconds`; asks inside it get 429."""
        now = time.time()
        if state.window_until == 0.0:
            state.window_until = now + int(request.match_info["seconds"])
        elif now < state.window_until:
            state.asked_in_window += 1
        if now < state.window_until:
            left = max(1, round(state.window_until - now))
            return web.Response(status=429, headers={"Retry-After": str(left)}, text="slow down")
        return web.Response(body=JPEG, content_type="image/jpeg")

    async def slow(_: web.Request) -> web.Response:
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            await asyncio.sleep(0.4)
        finally:
            state.in_flight -= 1
        return web.Response(body=JPEG, content_type="image/jpeg")

    app = web.Application(middlewares=[remember])
    app.router.add_get("/flaky/{n}/{name}", flaky)
    app.router.add_get("/down/{name}", down)
    app.router.add_get("/limited/{seconds}/{name}", limited)
    app.router.add_get("/slow/{name}", slow)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    address, port = runner.addresses[0][:2]
    state.base = f"http://{address}:{port}"
    yield state
    await runner.cleanup()


# Room for every request of a test to fetch at once (a request reserves the worst case before its fetch).
ROOMY = 4 * 2**30


def fetch_config(**overrides: object) -> FetchConfig:
    """One ask per attempt (no retries inside a fetch) and deferred delays of seconds, not minutes."""
    values: dict[str, object] = {"allow_private_addresses": True, "retries": 0, "backoff_s": 0.05,
                                 "total_timeout_s": 5.0, "deferred_attempts": 3, "deferred_delays_s": [1.0]}
    values.update(overrides)
    return FetchConfig(**values)  # type: ignore[arg-type]


async def results(broker: str, topic: str, count: int, settle_s: float = 2.0) -> dict[str, ResultEvent]:
    """The results once `count` have arrived, after `settle_s` more to show there are no others; by request_id."""
    records = await consume_all(broker, topic, count, timeout_s=90)
    assert len(records) == count, f"{len(records)} of {count} results"
    await asyncio.sleep(settle_s)
    records = await consume_all(broker, topic, count + 1, timeout_s=1.0)
    found = [decode_result(r.value) for r in records]
    by_id = {r.request_id: r for r in found}
    assert len(found) == len(by_id) == count, sorted(r.request_id for r in found)
    return by_id


async def retry_records(broker: str, topic: str, count: int) -> list[tuple[bytes, bytes, DeferredRetry]]:
    records = await consume_all(broker, topic, count, timeout_s=30)
    assert len(records) == count
    return sorted(((r.key, r.value, DeferredRetry.from_headers(r.headers)) for r in records),
                  key=lambda item: (item[0], item[2].attempt))


async def test_a_host_that_fails_for_a_while_answers_success_after_deferrals_and_holds_nobody_up(
        broker, topics, engine, host, tmp_path):
    flaky = request_bytes("flaky", {"url": host.url("/flaky/2/a.jpg")}, TASKS)
    others = [request_bytes(f"other-{i}", {"url": host.url(f"/flaky/0/{i}.jpg")}, TASKS) for i in range(3)]
    async with running_worker(broker, topics, engine, fetch=fetch_config(deferred_delays_s=[3.0]),
                              blobs={"dir": str(tmp_path / "blobs")}) as worker:
        # One key, so one partition, with the flaky request first.
        await produce_paced(broker, topics.requests, [(b"crawler-7", value) for value in [flaky, *others]])
        by_id = await results(broker, topics.results, 4)
        group = worker.config.kafka.group
        assert await until_committed(broker, group, topics.retry, 2) == 2

    assert by_id["flaky"].status == "success" and by_id["flaky"].data is not None
    deferred = await retry_records(broker, topics.retry, 2)
    assert [(key, value, retry.attempt) for key, value, retry in deferred] == [(b"flaky", flaky, 2),
                                                                               (b"flaky", flaky, 3)]
    first, second = (retry for _, _, retry in deferred)
    assert "503" in first.first_failure and first.first_failed_at == second.first_failed_at
    assert first.source_topic == second.source_topic == topics.requests
    # Nobody waited for it: the others were answered before its first retry was even due ...
    assert max(by_id[f"other-{i}"].completed_at.timestamp() for i in range(3)) < first.due_at.timestamp()
    # ... and it was never asked before it was due.
    asks = host.asks("/flaky/2/")
    assert len(asks) == 3
    assert asks[1] >= first.due_at.timestamp() and asks[2] >= second.due_at.timestamp()
    assert second.due_at.timestamp() - first.due_at.timestamp() >= 3.0
    assert worker.retries.counts == {"scheduled": 2, "due": 2, "exhausted": 0, "superseded": 0}
    assert worker.metrics.value("imgstream_deferred_retries_total", event="due") == 2
    assert worker.tracker.in_flight() == 0


async def test_a_host_that_stays_down_gets_its_final_image_fetch_failed_after_the_last_attempt(
        broker, topics, engine, host, tmp_path):
    down = request_bytes("down", {"url": host.url("/down/a.jpg")}, TASKS)
    async with running_worker(broker, topics, engine, fetch=fetch_config(deferred_delays_s=[0.5, 1.0]),
                              blobs={"dir": str(tmp_path / "blobs")}) as worker:
        await produce_paced(broker, topics.requests, [(b"down", down)])
        by_id = await results(broker, topics.results, 1)
        group = worker.config.kafka.group
        assert await until_committed(broker, group, topics.requests, 1) == 1
        assert await until_committed(broker, group, topics.retry, 2) == 2

    result = by_id["down"]
    assert (result.status, result.error_code) == ("error", "image_fetch_failed")
    assert "503" in result.error_message and "after 3 attempts" in result.error_message, result.error_message
    asks = host.asks("/down/")
    assert len(asks) == 3 and asks[1] - asks[0] >= 0.5 and asks[2] - asks[1] >= 1.0  # the delays grow
    assert worker.retries.counts == {"scheduled": 2, "due": 2, "exhausted": 1, "superseded": 0}
    assert worker.metrics.value("imgstream_deferred_retries_total", event="exhausted") == 1
    assert worker.metrics.value("imgstream_results_total", status="error", error_code="image_fetch_failed") == 1


async def test_a_duplicate_delivery_while_a_retry_waits_is_left_to_that_retry(broker, topics, engine, host, tmp_path):
    twice = request_bytes("twice", {"url": host.url("/flaky/2/twice.jpg")}, TASKS)
    async with running_worker(broker, topics, engine, fetch=fetch_config(),
                              blobs={"dir": str(tmp_path / "blobs")}) as worker:
        await produce_paced(broker, topics.requests, [(b"twice", twice), (b"twice", twice)])
        by_id = await results(broker, topics.results, 1, settle_s=3.0)

    assert by_id["twice"].status == "success"  # one answer, from the one chain of retries
    assert len(host.asks("/flaky/2/")) == 3
    assert worker.retries.counts == {"scheduled": 1, "due": 1, "exhausted": 0, "superseded": 1}


async def test_a_short_retry_after_makes_the_hosts_requests_wait_and_the_host_is_asked_once_per_window(
        broker, topics, engine, host, tmp_path):
    async with running_worker(broker, topics, engine, blobs={"dir": str(tmp_path / "blobs")},
                              max_in_flight_image_bytes=ROOMY,
                              fetch=fetch_config(retries=1, per_host_concurrent=1, total_timeout_s=8.0)) as worker:
        # One partition: the four are in flight together, and the three the first 429 finds wait it out.
        await produce_paced(broker, topics.requests, [
            (b"one-host", request_bytes(f"r{i}", {"url": host.url(f"/limited/2/{i}.jpg")}, TASKS))
            for i in range(4)])
        by_id = await results(broker, topics.results, 4, settle_s=0.5)

    assert {r.status for r in by_id.values()} == {"success"}
    assert host.asked_in_window == 0  # only the ask that opened the window
    asks = host.asks("/limited/")
    assert len(asks) == 5 and all(t >= host.window_until for t in asks[1:])
    assert worker.metrics.value("imgstream_fetch_host_waits_total", reason="retry_after") >= 3
    assert worker.retries.counts["scheduled"] == 0


async def test_a_retry_after_past_the_fetch_deadline_defers_the_hosts_requests_until_it_has_passed(
        broker, topics, engine, host, tmp_path):
    async with running_worker(broker, topics, engine, blobs={"dir": str(tmp_path / "blobs")},
                              max_in_flight_image_bytes=ROOMY,
                              fetch=fetch_config(per_host_concurrent=1, total_timeout_s=1.5,
                                                 deferred_delays_s=[0.5])) as worker:
        # One partition: the four are in flight together, and the three the first 429 finds give up at once.
        await produce_paced(broker, topics.requests, [
            (b"one-host", request_bytes(f"r{i}", {"url": host.url(f"/limited/4/{i}.jpg")}, TASKS))
            for i in range(4)])
        by_id = await results(broker, topics.results, 4, settle_s=0.5)

    assert {r.status for r in by_id.values()} == {"success"}
    assert host.asked_in_window == 0
    asks = host.asks("/limited/")
    assert len(asks) == 5 and all(t >= host.window_until for t in asks[1:])
    deferred = await retry_records(broker, topics.retry, 4)
    # Due when the host's Retry-After ends, not after the shorter deferred delay.
    assert all(retry.due_at.timestamp() >= host.window_until - 1.0 for _, _, retry in deferred)
    assert worker.metrics.value("imgstream_fetch_host_deferrals_total") == 3  # given up without asking
    assert worker.retries.counts["scheduled"] == worker.retries.counts["due"] == 4


async def test_fetches_to_one_host_are_bounded_per_worker(broker, topics, engine, host, tmp_path):
    async with running_worker(broker, topics, engine, blobs={"dir": str(tmp_path / "blobs")},
                              max_in_flight_image_bytes=ROOMY, fetch=fetch_config(per_host_concurrent=2)) as worker:
        await produce_paced(broker, topics.requests, [
            (f"s{i}".encode(), request_bytes(f"s{i}", {"url": host.url(f"/slow/{i}.jpg")}, TASKS)) for i in range(8)])
        by_id = await results(broker, topics.results, 8, settle_s=0.0)

    assert {r.status for r in by_id.values()} == {"success"}
    assert host.max_in_flight == 2
    assert worker.metrics.value("imgstream_fetch_host_waits_total", reason="slot") >= 1


def test_the_retry_topic_must_outlive_the_longest_deferred_delay() -> None:
    from imgstream.schemas.config import WorkerConfig

    with pytest.raises(ValueError, match="shorter than the longest deferred delay"):
        WorkerConfig.model_validate({"fetch": {"deferred_delays_s": [60, 7200]},
                                     "kafka": {"topic_settings": {"retry": {"retention_ms": 3_600_000}}}})
    # The last delay repeats; with one attempt nothing is deferred, so any retention will do.
    fetch = FetchConfig(deferred_attempts=5, deferred_delays_s=[1, 2])
    assert [fetch.deferred_delay_s(n) for n in range(1, 5)] == [1, 2, 2, 2]
    WorkerConfig.model_validate({"fetch": {"deferred_attempts": 1, "deferred_delays_s": [7200]},
                                 "kafka": {"topic_settings": {"retry": {"retention_ms": 1000}}}})


def test_retry_headers_round_trip_and_a_hostile_reason_stays_small() -> None:
    from datetime import datetime, timezone

    now = datetime(2026, 12, 5, 10, 0, tzinfo=timezone.utc)
    retry = DeferredRetry(attempt=2, due_at=now, first_failure="x" * 100_000, first_failed_at=now,
                          last_failure="HTTP 503", source_topic="imgstream.requests")
    again = DeferredRetry.from_headers(retry.headers() + [("traceparent", b"00-abc-def-01")])
    assert again == retry and len(again.first_failure) == DeferredRetry.MAX_REASON_CHARS
    with pytest.raises(ValueError):
        DeferredRetry.from_headers([("imgstream.attempt", b"two")])
    assert Counter(name for name, _ in retry.headers())["imgstream.due_at"] == 1
