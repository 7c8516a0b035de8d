"""Logging set-up: every line carries the request_id of the request being processed."""

from __future__ import annotations

import contextvars
import logging
import sys
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


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


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.addFilter(_RepeatLimiter())
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [request_id=%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
