"""Tracing: W3C trace context through Kafka headers, and OpenTelemetry spans that explain a request's latency.

Off by default (the `tracing` setting). Off, `NO_TRACING` stands in: nothing imports OpenTelemetry, no span
is made, and each of the worker's hooks costs one test of `enabled`; a request's own `traceparent` still
travels on to its results and dead letters. On, `service/otel.py` makes the spans and exports them over
OTLP/HTTP as the standard OTEL_* variables say (docs/DEPLOY.md "Tracing").
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Awaitable, ContextManager, Iterable, TypeVar

from imgstream.schemas.config import ConfigError

T = TypeVar("T")
Headers = list[tuple[str, bytes]]

TRACE_HEADERS = frozenset({"traceparent", "tracestate"})

# The trace headers of the events the current request causes: its span's context (set by the request span).
outgoing_trace: ContextVar[Headers | None] = ContextVar("imgstream_outgoing_trace", default=None)

_NOTHING: ContextManager[Any] = contextlib.nullcontext()


def trace_headers(request_headers: Iterable[tuple[str, bytes]] | None) -> Headers | None:
    """The trace headers a result or dead letter of the current request carries: the request span's context
    while tracing, else the request's own traceparent/tracestate (None when it has none)."""
    traced = outgoing_trace.get()
    if traced is not None:
        return traced
    if not request_headers:
        return None
    return [(k, v) for k, v in request_headers if k in TRACE_HEADERS] or None


def with_trace(headers: Headers) -> Headers:
    """`headers` (which carry the request's own) with the request span's context instead, while tracing."""
    traced = outgoing_trace.get()
    if traced is None:
        return headers
    return [(k, v) for k, v in headers if k not in TRACE_HEADERS] + traced


class TracingUnavailable(ConfigError):
    """Tracing is on, but the OpenTelemetry SDK is not installed."""


class Tracing:
    """Tracing switched off: every span is no span at all. `service.otel.OtelTracing` is the one that traces."""

    enabled = False

    # -- the worker (its hot-path hooks test `enabled` first and call none of these when off) ---------

    def request(self, tp: Any, record: Any, group: str) -> ContextManager[Any]:
        """The span of one request record, from consume to its last result acknowledged."""
        return _NOTHING

    async def span(self, name: str, awaitable: Awaitable[T], attributes: dict[str, Any] | None = None) -> T:
        return await awaitable

    async def send(self, topic: str, key: str | None, count: int, awaitable: Awaitable[T]) -> T:
        return await awaitable

    def fetch(self, location: str, host: str | None) -> ContextManager[Any]:
        return _NOTHING

    def http_get(self, url: str, host: str | None, port: int | None) -> ContextManager[Any]:
        return _NOTHING

    # -- the model batcher (analysis.batcher.BatchTracer) -----------------------------------------

    def capture(self) -> Any:
        return None

    def batch(self, key: str, device: str, items: list[tuple[Any, float]], started: float) -> None:
        pass

    # -- submit and the sink -------------------------------------------------------------------------

    def created(self, topic: str, key: str | None, request_id: str) -> Headers | None:
        """The headers of a new request: a trace starts here (None when off)."""
        return None

    def consumed(self, topic: str, group: str, headers: list[Any], count: int) -> ContextManager[Any]:
        """The span of one batch of records written by the sink, linked to each record's trace."""
        return _NOTHING

    def shutdown(self) -> None:
        pass


NO_TRACING = Tracing()


def start_tracing(enabled: bool, service_name: str) -> Tracing:
    """NO_TRACING when off; else spans exported over OTLP/HTTP (OTEL_EXPORTER_OTLP_ENDPOINT and friends),
    named `service_name` unless OTEL_SERVICE_NAME says otherwise."""
    if not enabled:
        return NO_TRACING
    try:
        from imgstream.service.otel import OtelTracing, otlp_provider
    except ImportError as exc:
        raise TracingUnavailable(f"tracing is on but OpenTelemetry is not installed ({exc}): install "
                                 "imgstream[otel], or set IMGSTREAM_TRACING=off") from None
    return OtelTracing(otlp_provider(service_name))
