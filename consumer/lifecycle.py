"""When the worker stops, and why: a stop signal (drain), a second one (abandon), or a refusal by the
cluster that only a changed setting or permission can fix (the worker then exits non-zero)."""

from __future__ import annotations

import asyncio
import logging

from imgstream.kafka_clients import KafkaSetupError, explain_runtime_error
from imgstream.schemas.config import WorkerConfig

log = logging.getLogger("imgstream.consumer.worker")


class Lifecycle:
    """The worker's stop state, shared by its rooms."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.stopping = asyncio.Event()
        self.abandon = asyncio.Event()  # a second signal: stop draining now
        self.failure: KafkaSetupError | None = None

    def request_stop(self, why: str = "stop requested") -> None:
        if not self.stopping.is_set():
            log.info("%s: draining in-flight requests (deadline %.0fs)", why, self.config.drain_timeout_s)
            self.stopping.set()
        elif not self.abandon.is_set():
            log.warning("%s again: abandoning the requests in flight; they will be redone", why)
            self.abandon.set()

    def fail(self, error: KafkaSetupError) -> None:
        """Stop for good: the cluster refuses something only a changed setting or permission can fix."""
        if self.failure is None:
            self.failure = error
            log.error("%s", error.message)
        self.request_stop(f"stopping: {error.kind} failure")

    def refused(self, exc: BaseException, action: str) -> bool:
        """Whether `exc` (from the consumer) is one no retry can fix; if so, the worker stops with it."""
        k = self.config.kafka
        error = explain_runtime_error(exc, f"{action} {k.topics.requests} and {k.topics.replay} as group {k.group}")
        if error is not None:
            self.fail(error)
        return error is not None
