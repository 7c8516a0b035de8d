"""Logging set-up: every line carries the request_id of the request being processed; text or JSON lines."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from datetime import datetime, timezone
from typing import Callable

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# (trace_id, span_id) of the current span, set by service/tracing while tracing is on; None: no ids.
TraceIds = Callable[[], "tuple[str, str] | None"]
_trace_ids: TraceIds | None = None


def use_trace_ids(lookup: TraceIds | None) -> None:
    """Stamp each log record with the current span's ids (tracing on), or stop doing so (None)."""
    global _trace_ids
    _trace_ids = lookup


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        ids = _trace_ids() if _trace_ids is not None else None
        record.trace_id, record.span_id = ids if ids is not None else (None, None)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, RFC 3339), level, logger, message, request_id, and trace_id and
    span_id while tracing; an exception's traceback under `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": _request_id(record),
        }
        if getattr(record, "trace_id", None):
            line["trace_id"], line["span_id"] = record.trace_id, record.span_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["exception"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def _request_id(record: logging.LogRecord) -> str | None:
    request_id = getattr(record, "request_id", "-")
    return None if request_id == "-" else request_id


class _RepeatLimiter(logging.Filter):
    """Lets each message of the Kafka client through at most once per interval.

    While a broker is down aiokafka logs the same errors many times a second; one line per
    interval, with a count of what was held back, says as much.
    """

    def __init__(self, prefixes: tuple[str, ...] = ("aiokafka", "kafka"), interval_s: float = 30.0) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.interval_s = interval_s
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        last, held_back = self._seen.get(key, (None, 0))
        if last is not None and now - last < self.interval_s:
            self._seen[key] = (last, held_back + 1)
            return False
        self._seen[key] = (now, 0)
        if held_back:
            record.msg = f"{record.msg} [{held_back} more like this in the last {now - last:.0f}s]"
        return True


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr at `level`: readable lines ("text") or one JSON object per line ("json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.addFilter(_RepeatLimiter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [request_id=%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
