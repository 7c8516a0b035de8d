"""Work shared across requests by content: the same image costs once.

A stage's outcome (a detection, an embedding, a caption, a crop's PNG, a classifier's answer)
is a pure function of the image bytes' sha256, the stage and its parameters, and the model's
name and weights (or the classifier file's version): that tuple is its key. Identical work from
concurrent requests runs once and every waiting task gets the answer (in flight); finished
outcomes stay in a bounded LRU (by bytes) for requests that come later (cached). Errors are
never kept: the next request tries again.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter, OrderedDict
from typing import Any, Awaitable, Callable, Hashable, Literal

import numpy as np

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


class ReuseStore:
    """In-flight coalescing plus an LRU of finished outcomes, bounded by `max_bytes` (0: no LRU)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._done: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._flight: dict[Hashable, asyncio.Future] = {}
        self.bytes = 0
        self.hits: Counter[str] = Counter()  # stage lookups answered without computing, by kind

    @property
    def entries(self) -> int:
        return len(self._done)

    async def share(self, key: Hashable, make: Callable[[], Awaitable[Any]]) -> tuple[Any, Kind]:
        """`make()`'s value for `key`, computing it only if no request has it or is computing it."""
        if key in self._done:
            self._done.move_to_end(key)
            self.hits["cached"] += 1
            return self._done[key][0], "cached"
        future = self._flight.get(key)
        if future is not None:
            self.hits["in_flight"] += 1
            # shield: one waiter being cancelled must not cancel the work others wait on.
            return await asyncio.shield(future), "in_flight"
        future = asyncio.ensure_future(make())
        self._flight[key] = future
        future.add_done_callback(lambda done, key=key: self._settle(key, done))
        return await asyncio.shield(future), "computed"

    def _settle(self, key: Hashable, future: asyncio.Future) -> None:
        self._flight.pop(key, None)
        if future.cancelled() or future.exception() is not None or self.max_bytes <= 0:
            return
        value = future.result()
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
