"""What the worker's tracing hooks cost per request with tracing off: each hook's off path, timed alone.

    python scripts/bench_tracing_off.py

Times the exact expressions the hooks evaluate when tracing is off (a test of `enabled`, the batcher's
capture and batch-end tests, the trace headers of a request without headers and of one with a
traceparent) with timeit, and adds them up for one request of one model item. The end-to-end figure
(W4 with tracing off and on) is scripts/bench_stream.py --tracing.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's imgstream

from imgstream.service.tracing import NO_TRACING, trace_headers, with_trace  # noqa: E402

N = 1_000_000


def per_call_ns(statement: str, namespace: dict) -> float:
    runs = timeit.repeat(statement, globals=namespace, number=N, repeat=5)
    return min(runs) / N * 1e9


def main() -> None:
    handler = SimpleNamespace(tracing=NO_TRACING)
    scheduler = SimpleNamespace(tracer=None)
    plain = SimpleNamespace(headers=())
    traced = SimpleNamespace(headers=[("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")])
    ns = {"handler": handler, "scheduler": scheduler, "plain": plain, "traced": traced,
          "trace_headers": trace_headers, "with_trace": with_trace}
    hooks = {
        # intake._request, handling.analyse (decode), handling.publish, fetch.fetch: one test each
        "enabled test (x4 per request)": ("handler.tracing.enabled", 4),
        # fetch._request: one per GET (a blob read makes none)
        "enabled test per GET (x1)": ("handler.tracing.enabled", 1),
        # batcher.submit: one per model item; batcher._execute: one per batch
        "batcher capture (x1 per item)": ("scheduler.tracer.capture() if scheduler.tracer is not None else None", 1),
        "batcher batch end (x1 per batch)": ("scheduler.tracer is not None", 1),
        # handling.publish: the results' headers
        "trace_headers, no headers (x1)": ("trace_headers(plain.headers)", 1),
    }
    total = 0.0
    for name, (statement, times) in hooks.items():
        cost = per_call_ns(statement, ns)
        total += cost * times
        print(f"{name:40s} {cost:7.1f} ns")
    print(f"{'trace_headers, a traceparent (carried)':40s} {per_call_ns('trace_headers(traced.headers)', ns):7.1f} ns")
    print(f"{'with_trace (a deferral)':40s} {per_call_ns('with_trace(traced.headers)', ns):7.1f} ns")
    print(f"one request, one model item, one GET, no headers: {total:.0f} ns with tracing off")


if __name__ == "__main__":
    main()
