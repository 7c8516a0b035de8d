"""What the worker says about itself: a summary log line every report_interval_s, and the metrics whose
values live in its rooms (read at scrape time)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING

from imgstream.analysis.batcher import LIVE, REPLAY
from imgstream.consumer.deferred import RETRY

if TYPE_CHECKING:
    from imgstream.consumer.worker import Worker

log = logging.getLogger("imgstream.consumer.worker")


async def report_periodically(worker: Worker) -> None:
    """One INFO line per interval: what an operator tailing the log wants to see."""
    interval = worker.config.report_interval_s
    previous: Counter[str] = Counter()
    previous_reused: Counter[str] = Counter()
    previous_batches: dict[str, tuple[int, int]] = {}
    while True:
        await asyncio.sleep(interval)
        now, reused = Counter(worker.handler.counts), Counter(worker.engine.reused)
        done = {k: now[k] - previous[k] for k in ("requests", "success", "skipped", "error")}
        results = done["success"] + done["skipped"] + done["error"]
        shared = {k: reused[k] - previous_reused[k] for k in ("in_flight", "cached")}
        batches = []
        for key, stats in worker.engine.batch_stats().items():
            calls, items = stats["calls"], stats["items"]
            last_calls, last_items = previous_batches.get(key, (0, 0))
            if calls > last_calls:
                batches.append(f"{key} {(items - last_items) / (calls - last_calls):.1f}")
            previous_batches[key] = (calls, items)
        lanes = worker.in_flight_by_lane()
        cache = worker.engine.reuse
        log.info(
            "last %.0fs: %d requests (%.1f/s), results %d ok, %d skipped, %d error; in flight %d live, %d replay, "
            "%d retry; reused %.0f%% (%d in flight, %d cached; cache %d entries, %.1f MiB); mean batch %s",
            interval, done["requests"], done["requests"] / interval, done["success"], done["skipped"],
            done["error"], lanes[LIVE], lanes[REPLAY], lanes[RETRY],
            100.0 * sum(shared.values()) / results if results else 0.0,
            shared["in_flight"], shared["cached"], cache.entries if cache else 0,
            (cache.bytes if cache else 0) / 2**20, ", ".join(batches) or "-")
        previous, previous_reused = now, reused

def register_gauges(worker: Worker) -> None:
    m = worker.metrics
    m.add_gauge("imgstream_requests_in_flight", "Requests being processed.",
                lambda: [({}, worker.tracker.in_flight())])
    m.add_gauge("imgstream_image_bytes_in_flight", "Fetched plus decoded image bytes held by requests.",
                lambda: [({}, worker.images.held)])
    m.add_gauge("imgstream_image_bytes_reserved", "Image bytes counted against the bound (estimates included).",
                lambda: [({}, worker.images.used)])
    # Retry partitions waiting for their due time are not backpressure (imgstream_retry_partitions_waiting).
    m.add_gauge("imgstream_partitions_paused", "Assigned partitions paused by backpressure.",
                lambda: [({}, len(worker.consumer.paused() - worker.retries.held()) if worker.consumer else 0)])
    m.add_gauge("imgstream_broker_reachable", "1 when the last broker probe succeeded.",
                lambda: [({}, 1 if worker.broker_reachable else 0)])
    m.add_gauge("imgstream_consumer_lag", "Messages behind the partition's high watermark.", worker.checkpoint.lag)
    m.add_live_counter("imgstream_model_batches_total", "Model calls (batches), per model.",
                       lambda: [({"model": k}, s["calls"]) for k, s in worker.engine.batch_stats().items()])
    m.add_live_counter("imgstream_model_items_total", "Items run, per model.",
                       lambda: [({"model": k}, s["items"]) for k, s in worker.engine.batch_stats().items()])
    m.add_live_counter("imgstream_model_queue_wait_ms_total",
                       "Time items waited in the model's batcher, summed, per model "
                       "(divide by imgstream_model_items_total for the mean).",
                       lambda: [({"model": k}, s["queue_wait_ms_total"])
                                for k, s in worker.engine.batch_stats().items()])
    m.add_live_histogram("imgstream_model_batch_size", "Items per model call, per model.",
                         lambda: [({"model": k}, s["batch_sizes"], float(s["items"]))
                                  for k, s in worker.engine.batch_stats().items()])
    m.add_live_counter("imgstream_publish_failures_total",
                       "Publishes that failed, by kind (results, dlq) and outcome (retried; abandoned at "
                       "shutdown; refused for good).", lambda: _publish_failures(worker))
    m.add_live_counter("imgstream_result_batches_total",
                       "Batches of results the broker acknowledged (one per partition and linger).",
                       lambda: _result_batches(worker, "batches_sent"))
    m.add_live_counter("imgstream_result_batch_records_total",
                       "Results in those batches (divide by imgstream_result_batches_total for the mean size).",
                       lambda: _result_batches(worker, "records_sent"))
    m.add_live_counter("imgstream_device_busy_seconds_total",
                       "Seconds each device (cpu, cuda:N) spent running batches; its rate is the "
                       "device's utilisation.",
                       lambda: [({"device": k}, v["busy_s"]) for k, v in worker.engine.device_stats().items()])
    m.add_live_counter("imgstream_device_batches_total", "Batches each device ran.",
                       lambda: [({"device": k}, v["batches"]) for k, v in worker.engine.device_stats().items()])
    m.add_gauge("imgstream_lane_requests_in_flight", "Requests being processed, per lane (live, replay).",
                lambda: [({"lane": lane}, n) for lane, n in worker.in_flight_by_lane().items()])
    m.add_live_counter("imgstream_reuse_total",
                       "Task results taken from identical work on the same image bytes, by kind: in_flight "
                       "(shared with a concurrent request) or cached (a recent outcome).",
                       lambda: [({"kind": kind}, worker.engine.reused[kind]) for kind in ("in_flight", "cached")])
    m.add_gauge("imgstream_reuse_cache_bytes", "Memory held by recent outcomes kept for reuse.",
                lambda: [({}, worker.engine.reuse.bytes if worker.engine.reuse else 0)])
    m.add_gauge("imgstream_reuse_cache_entries", "Recent outcomes kept for reuse.",
                lambda: [({}, worker.engine.reuse.entries if worker.engine.reuse else 0)])
    m.add_gauge("imgstream_model_queue_depth", "Items waiting in each model's batcher.",
                lambda: [({"model": k}, v) for k, v in worker.engine.queued().items()])
    m.add_live_counter("imgstream_deferred_retries_total",
                       "Deferred fetch retries, by event: scheduled (sent to the retry topic), due (taken from "
                       "it), exhausted (final image_fetch_failed after the last attempt), superseded (left "
                       "unanswered: another delivery of the request answers).",
                       lambda: [({"event": event}, n) for event, n in worker.retries.counts.items()])
    m.add_gauge("imgstream_retry_partitions_waiting",
                "Retry topic partitions paused until their first record is due.",
                lambda: [({}, len(worker.retries.held()))])
    m.add_live_counter("imgstream_fetch_host_waits_total",
                       "Fetches that waited for their host, by reason: slot (fetch.per_host_concurrent "
                       "reached) or retry_after (the host's Retry-After).", lambda: _host_waits(worker))
    m.add_live_counter("imgstream_fetch_host_deferrals_total",
                       "Fetches given up at once because their host's Retry-After outlasts the fetch deadline "
                       "(deferred to the retry topic).",
                       lambda: [({}, worker.fetcher.hosts.backoffs if worker.fetcher else 0)])

def _host_waits(worker: Worker) -> list[tuple[dict[str, str], float]]:
    waits = worker.fetcher.hosts.waits if worker.fetcher else {}
    return [({"reason": reason}, waits.get(reason, 0)) for reason in ("slot", "retry_after")]

def _publish_failures(worker: Worker) -> list[tuple[dict[str, str], float]]:
    return worker.publisher.failure_samples() if worker.publisher else []


def _result_batches(worker: Worker, field: str) -> list[tuple[dict[str, str], float]]:
    batches = worker.publisher.batches if worker.publisher else None
    return [({}, getattr(batches, field))] if batches is not None else []
