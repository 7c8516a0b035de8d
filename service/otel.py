"""Tracing on: OpenTelemetry spans named and attributed per its semantic conventions for messaging and HTTP.

Imported only when the `tracing` setting is on (service/tracing.py `start_tracing`). Spans:
`process <topic>` (a request, consume to last result acknowledged; child of the request's traceparent),
`fetch` and its `GET`s, `decode`, `queue <model>` (an item's wait in a model queue), `send <topic>` (results,
dead letters, deferrals), `batch <model>` (one model batch, linked to every request whose items it ran),
`create <topic>` (`imgstream submit`, where a trace starts) and the sink's `process <topic>` per batch written.
"""

from __future__ import annotations

import contextlib
import time
import urllib.parse
from contextvars import ContextVar
from typing import Any, Awaitable, Iterable, Iterator, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from imgstream.service.logs import request_id_var, use_trace_ids
from imgstream.service.tracing import TRACE_HEADERS, Headers, Tracing, outgoing_trace

T = TypeVar("T")

KAFKA = {"messaging.system": "kafka"}
# Query parameters whose values are credentials (OpenTelemetry's url.full guidance): never exported.
SECRET_QUERY_PARAMETERS = frozenset({"awsaccesskeyid", "signature", "sig", "x-goog-signature", "x-amz-signature",
                                     "x-amz-credential", "x-amz-security-token"})

# The request span the current task works for: model-queue items carry it to their batch.
_request_span: ContextVar[Span | None] = ContextVar("imgstream_request_span", default=None)
# The fetch span around the current GETs: it takes the status of the last one.
_fetch_span: ContextVar[Span | None] = ContextVar("imgstream_fetch_span", default=None)


def otlp_provider(service_name: str) -> TracerProvider:
    """Spans batched to OTLP/HTTP; endpoint, headers, sampler and limits from the OTEL_* variables."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class _HttpSpan:
    """A GET's span: its response status, also set on the fetch span around it."""

    def __init__(self, span: Span) -> None:
        self.span = span

    def status(self, code: int) -> None:
        for span in (self.span, _fetch_span.get()):
            if span is not None:
                span.set_attribute("http.response.status_code", code)
        if code >= 400:
            self.span.set_attribute("error.type", str(code))
            self.span.set_status(Status(StatusCode.ERROR))


class OtelTracing(Tracing):
    """Spans from `provider`; the logs carry the current span's ids while it lives."""

    enabled = True

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("imgstream")
        self.propagator = TraceContextTextMapPropagator()
        use_trace_ids(current_ids)

    # -- context through headers ------------------------------------------------------------------

    def context_of(self, headers: Iterable[tuple[str, bytes]] | None) -> otel_context.Context:
        """The trace context a record's traceparent/tracestate carry (an empty one: a new trace)."""
        carrier = {k: v.decode("latin-1") for k, v in headers or () if k in TRACE_HEADERS and v is not None}
        return self.propagator.extract(carrier, context=otel_context.Context())

    def headers_of(self, ctx: otel_context.Context) -> Headers:
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=ctx)
        return [(k, v.encode()) for k, v in carrier.items()]

    # -- the worker --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def request(self, tp: Any, record: Any, group: str) -> Iterator[None]:
        parent = self.context_of(record.headers)
        attributes = {**KAFKA, "messaging.operation.type": "process", "messaging.operation.name": "process",
                      "messaging.destination.name": tp.topic, "messaging.destination.partition.id": str(tp.partition),
                      "messaging.consumer.group.name": group, "messaging.kafka.offset": record.offset,
                      "messaging.message.body.size": len(record.value or b"")}
        if record.key is not None:
            attributes["messaging.kafka.message.key"] = record.key.decode("utf-8", "replace")
        span = self.tracer.start_span(f"process {tp.topic}", context=parent, kind=SpanKind.CONSUMER,
                                      attributes=attributes)
        ctx = trace.set_span_in_context(span, parent)
        attached = otel_context.attach(ctx)
        current = _request_span.set(span)
        outgoing = outgoing_trace.set(self.headers_of(ctx))
        try:
            yield
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            request_id = request_id_var.get()
            if request_id != "-":
                span.set_attribute("imgstream.request_id", request_id)
            outgoing_trace.reset(outgoing)
            _request_span.reset(current)
            otel_context.detach(attached)
            span.end()

    async def span(self, name: str, awaitable: Awaitable[T], attributes: dict[str, Any] | None = None) -> T:
        with self._current(self.tracer.start_span(name, attributes=attributes)):
            return await awaitable

    async def send(self, topic: str, key: str | None, count: int, awaitable: Awaitable[T]) -> T:
        attributes: dict[str, Any] = {**KAFKA, "messaging.operation.type": "send", "messaging.operation.name": "send",
                                      "messaging.destination.name": topic}
        if key is not None:
            attributes["messaging.kafka.message.key"] = key
        if count != 1:
            attributes["messaging.batch.message_count"] = count
        with self._current(self.tracer.start_span(f"send {topic}", kind=SpanKind.PRODUCER, attributes=attributes)):
            return await awaitable

    @contextlib.contextmanager
    def fetch(self, location: str, host: str | None) -> Iterator[None]:
        attributes = {"url.full": redact_url(location)}
        if host:
            attributes["server.address"] = host
        span = self.tracer.start_span("fetch", attributes=attributes)
        token = _fetch_span.set(span)
        try:
            with self._current(span):
                yield
        finally:
            _fetch_span.reset(token)

    @contextlib.contextmanager
    def http_get(self, url: str, host: str | None, port: int | None) -> Iterator[_HttpSpan]:
        attributes: dict[str, Any] = {"http.request.method": "GET", "url.full": redact_url(url)}
        if host:
            attributes["server.address"] = host
        if port is not None:
            attributes["server.port"] = port
        span = self.tracer.start_span("GET", kind=SpanKind.CLIENT, attributes=attributes)
        with self._current(span):
            yield _HttpSpan(span)

    # -- the model batcher -------------------------------------------------------------------------

    def capture(self) -> Span | None:
        return _request_span.get()

    def batch(self, key: str, device: str, items: list[tuple[Any, float]], started: float) -> None:
        """The span of one model batch (`started` to now, perf_counter seconds), linked to each request whose
        items it ran, and each item's `queue <model>` span, from when it was queued to `started`."""
        now_ns, now = time.time_ns(), time.perf_counter()

        def epoch_ns(t: float) -> int:
            return now_ns - int((now - t) * 1e9)

        per_request: dict[int, tuple[Span, int]] = {}
        for span, _ in items:
            if span is not None:
                known = per_request.get(id(span))
                per_request[id(span)] = (span, known[1] + 1 if known else 1)
        if not per_request:
            return  # no traced request among them (a warm-up, say)
        links = [Link(span.get_span_context(), {"imgstream.batch.items": n}) for span, n in per_request.values()]
        batch = self.tracer.start_span(
            f"batch {key}", context=otel_context.Context(), links=links, start_time=epoch_ns(started),
            attributes={"imgstream.model": key, "imgstream.device": device, "imgstream.batch.size": len(items),
                        "imgstream.batch.requests": len(per_request)})
        to_batch = [Link(batch.get_span_context())]
        batch_start = epoch_ns(started)
        for span, enqueued in items:
            if span is not None:
                wait = self.tracer.start_span(f"queue {key}", context=trace.set_span_in_context(span), links=to_batch,
                                              start_time=epoch_ns(enqueued), attributes={"imgstream.model": key})
                wait.end(end_time=batch_start)
        batch.end(end_time=now_ns)

    # -- submit and the sink ------------------------------------------------------------------------

    def created(self, topic: str, key: str | None, request_id: str) -> Headers:
        attributes: dict[str, Any] = {**KAFKA, "messaging.operation.type": "create", "messaging.operation.name":
                                      "create", "messaging.destination.name": topic, "imgstream.request_id": request_id}
        if key is not None:
            attributes["messaging.kafka.message.key"] = key
        span = self.tracer.start_span(f"create {topic}", context=otel_context.Context(), kind=SpanKind.PRODUCER,
                                      attributes=attributes)
        try:
            return self.headers_of(trace.set_span_in_context(span))
        finally:
            span.end()

    @contextlib.contextmanager
    def consumed(self, topic: str, group: str, headers: list[Any], count: int) -> Iterator[None]:
        links, seen = [], set()
        for record_headers in headers:
            context = trace.get_current_span(self.context_of(record_headers)).get_span_context()
            if context.is_valid and (context.trace_id, context.span_id) not in seen:
                seen.add((context.trace_id, context.span_id))
                links.append(Link(context))
        attributes = {**KAFKA, "messaging.operation.type": "process", "messaging.operation.name": "process",
                      "messaging.destination.name": topic, "messaging.consumer.group.name": group,
                      "messaging.batch.message_count": count}
        span = self.tracer.start_span(f"process {topic}", context=otel_context.Context(), kind=SpanKind.CONSUMER,
                                      links=links, attributes=attributes)
        with self._current(span):
            yield

    def shutdown(self) -> None:
        """Export what is left and stop."""
        use_trace_ids(None)
        self.provider.shutdown()

    # -- helpers -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _current(self, span: Span) -> Iterator[Span]:
        """`span` as the current span until the block ends; a failure marks it (error.type: the error's code)."""
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield span
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            otel_context.detach(token)
            span.end()


def _failed(span: Span, exc: BaseException) -> None:
    span.set_attribute("error.type", str(getattr(exc, "code", None) or type(exc).__qualname__))
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:300]))


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span, as hex, for the log lines."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def redact_url(url: str) -> str:
    """`url` without credentials: user and password, and the values of signing query parameters."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "REDACTED"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "REDACTED:REDACTED@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_QUERY_PARAMETERS for k, _ in pairs):
            query = urllib.parse.urlencode([(k, "REDACTED" if k.lower() in SECRET_QUERY_PARAMETERS else v)
                                            for k, v in pairs])
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
