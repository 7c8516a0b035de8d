"""Deferred fetch retries: the retry topic's lane, and what a failed fetch means for each attempt.

A request whose fetch fails transiently with attempts left is published to the retry topic
with its next attempt's number and due time in headers, and its offset is finished (Spring
Kafka's retry topics). Workers read the retry topic in a lane of its own and never start a
record before it is due: a partition whose head is not due is rewound to the head and paused
until then, so nothing spins and no other partition waits. The last attempt's failure is the
request's final answer (docs/DECISIONS.md "Deferred retries").
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, OrderedDict
from datetime import datetime, timedelta, timezone
from typing import Any, Final, Literal

from aiokafka import TopicPartition
from pydantic import ValidationError

from imgstream.analysis.imaging import ImageError
from imgstream.consumer.fetch import TransientFetchError
from imgstream.schemas.config import FetchConfig
from imgstream.schemas.events import DeferredRetry

log = logging.getLogger(__name__)

RETRY: Final = "retry"  # the retry topic's lane, beside analysis.batcher's LIVE and REPLAY
EVENTS: Final = ("scheduled", "due", "exhausted", "superseded")
# Requests remembered per worker (about 100 bytes each) so one request never gets two final answers here.
REMEMBERED: Final = 65536
_ANSWERED: Final = 0

Decision = Literal["answer", "defer", "drop"]


class Attempt:
    """One delivery of a request: which attempt it is and how the earlier ones failed.

    `digest` (of the request's bytes: deliveries of the same request share it) is computed when first
    asked: a first delivery that fetches its image needs none.
    """

    __slots__ = ("number", "source_topic", "retry", "_value", "_digest")

    def __init__(self, number: int, value: bytes | None, source_topic: str,
                 retry: DeferredRetry | None = None) -> None:
        self.number = number  # 1: the request's first delivery (requests or replay topic)
        self.source_topic = source_topic
        self.retry = retry  # the headers it came with from the retry topic
        self._value = value
        self._digest: bytes | None = None

    @property
    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = _digest(self._value)
            self._value = None  # the bytes are not kept longer than the digest needs them
        return self._digest

    @classmethod
    def first(cls, value: bytes | None, topic: str) -> Attempt:
        return cls(1, value, topic)

    def __repr__(self) -> str:
        return f"Attempt(number={self.number}, source_topic={self.source_topic!r})"


class Deferral(Exception):
    """The fetch failed transiently: the request goes to the retry topic ("defer") or is left to another
    delivery of it that is already waiting there ("drop"); either way it gets no result now."""

    def __init__(self, error: TransientFetchError, decision: Decision) -> None:
        super().__init__(str(error))
        self.error = error
        self.decision = decision


class DeferredRetries:
    """The retry lane of one worker: which retry partitions wait for their head, and each request's attempts.

    `counts` tallies events: scheduled (published for a later attempt), due (taken from the retry
    topic), exhausted (final image_fetch_failed after the last attempt), superseded (a delivery
    left unanswered because another delivery of the same request answers).
    """

    def __init__(self, config: FetchConfig, topic: str) -> None:
        self.config = config
        self.topic = topic
        self.counts: Counter[str] = Counter(dict.fromkeys(EVENTS, 0))
        self._held: dict[TopicPartition, float] = {}  # partition -> when its head is due (epoch seconds)
        # digest -> the attempt number waiting on the retry topic, or _ANSWERED
        self._requests: OrderedDict[bytes, int] = OrderedDict()

    # -- the lane ---------------------------------------------------------------------------

    def hold_until_due(self, tp: TopicPartition, record: Any) -> bool:
        """False when `record` (the first one fetched from `tp`) is due; else True, and `tp` stays
        in `held()` until then (the caller rewinds to the record)."""
        retry = self._retry_of(record)
        due = retry.due_at.timestamp() if retry is not None else 0.0
        if due > time.time():
            self._held[tp] = due
            return True
        self._held.pop(tp, None)
        self.counts["due"] += 1
        return False

    def held(self) -> set[TopicPartition]:
        """Retry partitions whose head is not due yet: keep them paused."""
        now = time.time()
        for tp in [tp for tp, due in self._held.items() if due <= now]:
            del self._held[tp]
        return set(self._held)

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Revoked partitions: their new owner reads their heads again."""
        for tp in partitions:
            self._held.pop(tp, None)

    # -- attempts ---------------------------------------------------------------------------

    def attempt(self, tp: TopicPartition, record: Any) -> Attempt:
        """Which attempt `record` is: 1 on the requests and replay topics, its header's on the retry topic."""
        if tp.topic != self.topic:
            return Attempt.first(record.value, tp.topic)
        retry = self._retry_of(record)
        if retry is None:
            return Attempt.first(record.value, tp.topic)
        return Attempt(retry.attempt, record.value, retry.source_topic, retry)

    def superseded(self, attempt: Attempt) -> bool:
        """A retry of a request this worker has answered meanwhile (another delivery of it succeeded or
        failed for good): it must not answer again."""
        if attempt.number > 1 and self._requests.get(attempt.digest) == _ANSWERED:
            self.counts["superseded"] += 1
            return True
        return False

    def decide(self, error: ImageError, attempt: Attempt | None) -> Decision:
        """What a failed fetch means for this attempt: answer it now, defer it, or leave it to another delivery.

        Deciding to defer books the next attempt at once, so a duplicate delivery failing meanwhile
        is left to this one rather than starting a second chain of retries.
        """
        if attempt is None or not isinstance(error, TransientFetchError):
            return "answer"
        waiting = self._requests.get(attempt.digest)
        if waiting not in (None, _ANSWERED, attempt.number):
            # Another delivery of this request waits on the retry topic; it answers (or defers again).
            self.counts["superseded"] += 1
            return "drop"
        if attempt.number >= self.config.deferred_attempts:
            return "answer"
        self._remember(attempt.digest, attempt.number + 1)
        return "defer"

    def next_retry(self, attempt: Attempt, error: TransientFetchError) -> DeferredRetry:
        """The headers of `attempt`'s successor: due after the attempt's delay, or the host's longer Retry-After."""
        now = datetime.now(timezone.utc)
        delay = max(self.config.deferred_delay_s(attempt.number), error.retry_after_s or 0.0)
        first = attempt.retry
        return DeferredRetry(
            attempt=attempt.number + 1, due_at=now + timedelta(seconds=delay),
            first_failure=first.first_failure if first else error.message,
            first_failed_at=first.first_failed_at if first else now,
            last_failure=error.message, source_topic=attempt.source_topic,
        )

    def headers(self, record: Any, retry: DeferredRetry) -> list[tuple[str, bytes]]:
        """The retry record's headers: the request's own (a traceparent, ...) and the retry's."""
        own = [(k, v) for k, v in (record.headers or ()) if not k.startswith(DeferredRetry.HEADER_PREFIX)]
        return own + retry.headers()

    def scheduled(self) -> None:
        """The retry record booked by `decide` is on the retry topic."""
        self.counts["scheduled"] += 1

    def answered(self, attempt: Attempt | None) -> None:
        """The request got its results (deferring it may have failed): a retry of it on the topic is superseded."""
        if attempt is not None and self._requests and attempt.digest in self._requests:
            self._remember(attempt.digest, _ANSWERED)

    def final_message(self, error: ImageError, attempt: Attempt | None) -> str:
        """The error message of a result; a transient failure at the last attempt says how many there were."""
        if attempt is None or not isinstance(error, TransientFetchError) or self.config.deferred_attempts < 2:
            return error.message
        self.counts["exhausted"] += 1
        since = f", the first at {attempt.retry.first_failed_at:%Y-%m-%d %H:%M:%S} UTC" if attempt.retry else ""
        return f"{error.message}; gave up after {attempt.number} attempts (deferred retries included{since})"

    # -- internals --------------------------------------------------------------------------

    def _remember(self, digest: bytes, state: int) -> None:
        self._requests[digest] = state
        self._requests.move_to_end(digest)
        while len(self._requests) > REMEMBERED:
            self._requests.popitem(last=False)

    def _retry_of(self, record: Any) -> DeferredRetry | None:
        try:
            return DeferredRetry.from_headers(record.headers or ())
        except (ValidationError, ValueError) as exc:
            # Not written by a worker: taken now, as a first attempt.
            log.warning("%s[%d]@%d has no valid retry headers (%s); taken now as a first attempt",
                        record.topic, record.partition, record.offset, " ".join(str(exc).split())[:200])
            return None


def _digest(value: bytes | None) -> bytes:
    return hashlib.sha256(value or b"").digest()[:16]
