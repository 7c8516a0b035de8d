"""Work shared across requests by content: the same image costs once.

A stage's outcome (a detection, an embedding, a caption, a crop's PNG, a classifier's answer)
is a pure function of the image bytes' sha256, the stage and its parameters, and the model's
name and weights (or the classifier file's version): that tuple is its key. Identical work from
concurrent requests runs once and every waiting task gets the answer (in flight); finished
outcomes stay in a bounded LRU (by bytes) for requests that come later (cached). Errors are
never kept: the next request tries again. Shared work runs in the lane of the request that
started it until a live request joins it (analysis.batcher.LaneTicket).
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter, OrderedDict
from typing import Any, Awaitable, Callable, Hashable, Literal

import numpy as np

from imgstream.analysis.batcher import LIVE, LaneTicket, Timed, current_ticket

Kind = Literal["computed", "in_flight", "cached"]
# What an entry costs beyond its value's own bytes (the key, the dict slot, the Timed wrapper).
ENTRY_OVERHEAD_BYTES = 256


def outcome_bytes(value: Any) -> int:
    """Roughly what keeping `value` costs: arrays by their buffer, strings by length, the rest shallowly."""
    inner = getattr(value, "value", value)  # a Timed model answer
    if isinstance(inner, np.ndarray):
        return inner.nbytes + ENTRY_OVERHEAD_BYTES
    if isinstance(inner, (str, bytes)):
        return len(inner) + ENTRY_OVERHEAD_BYTES
    if isinstance(inner, (list, tuple)):
        return sum(sys.getsizeof(item) for item in inner) + 64 * len(inner) + ENTRY_OVERHEAD_BYTES
    return sys.getsizeof(inner) + ENTRY_OVERHEAD_BYTES


def detached(value: Any) -> Any:
    """`value` owning its memory: a row that is a view into a whole batch's array would keep
    that array alive, and the cache would hold far more than it counts."""
    inner = getattr(value, "value", value)
    if isinstance(inner, np.ndarray) and inner.base is not None:
        inner = inner.copy()
        return Timed(inner, value.queue_ms, value.compute_ms) if isinstance(value, Timed) else inner
    return value


class InFlight:
    """Work by key that concurrent callers share, each in its lane: one computes, the rest wait."""

    def __init__(self) -> None:
        self._work: dict[Hashable, tuple[asyncio.Future, LaneTicket]] = {}

    def join(self, key: Hashable, lane: str) -> asyncio.Future | None:
        """The future of `key`'s work if some caller is computing it (lifted to the live lane for a live caller)."""
        work = self._work.get(key)
        if work is None:
            return None
        future, ticket = work
        if lane == LIVE:
            ticket.promote()
        return future

    def start(self, key: Hashable, make: Callable[[], Awaitable[Any]], lane: str,
              settle: Callable[[asyncio.Future], None] | None = None) -> asyncio.Future:
        """Start `make()` for `key` in `lane`; when it is done its entry goes and `settle` sees it,
        in one step, so no caller finds the work neither in flight nor settled."""
        ticket = LaneTicket(lane)
        token = current_ticket.set(ticket)  # the task copies the context: its batched items follow the ticket
        try:
            future = asyncio.ensure_future(make())
        finally:
            current_ticket.reset(token)
        self._work[key] = (future, ticket)

        def done(finished: asyncio.Future) -> None:
            self._work.pop(key, None)
            if settle is not None:
                settle(finished)

        future.add_done_callback(done)
        return future


class ReuseStore:
    """In-flight coalescing plus an LRU of finished outcomes, bounded by `max_bytes` (0: no LRU)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._done: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._flight = InFlight()
        self.bytes = 0
        self.hits: Counter[str] = Counter()  # stage lookups answered without computing, by kind

    @property
    def entries(self) -> int:
        return len(self._done)

    async def share(self, key: Hashable, make: Callable[[], Awaitable[Any]],
                    lane: str = LIVE) -> tuple[Any, Kind]:
        """`make()`'s value for `key`, computing it (in `lane`) only if no request has it or is computing it."""
        if key in self._done:
            self._done.move_to_end(key)
            self.hits["cached"] += 1
            return self._done[key][0], "cached"
        future = self._flight.join(key, lane)
        if future is not None:
            self.hits["in_flight"] += 1
            # shield: one waiter being cancelled must not cancel the work others wait on.
            return await asyncio.shield(future), "in_flight"
        future = self._flight.start(key, make, lane, settle=lambda done: self._settle(key, done))
        return await asyncio.shield(future), "computed"

    def _settle(self, key: Hashable, future: asyncio.Future) -> None:
        if future.cancelled() or future.exception() is not None or self.max_bytes <= 0:
            return
        value = detached(future.result())
        size = outcome_bytes(value)
        if size > self.max_bytes:
            return
        self._done[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._done.popitem(last=False)
            self.bytes -= evicted

    def clear(self) -> None:
        self._done.clear()
        self.bytes = 0
