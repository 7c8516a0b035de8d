"""Retrying with backoff: the one helper behind every connect loop (worker and sink to Kafka, sink to its
database)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delays that start at `first_s` and double up to `max_s`."""

    first_s: float = 0.5
    max_s: float = 30.0

    def delays(self) -> Iterator[float]:
        delay = self.first_s
        while True:
            yield delay
            delay = min(delay * 2, self.max_s)


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def retry(attempt: Callable[[], Awaitable[T]], *, retry_on: tuple[type[BaseException], ...],
                stop: asyncio.Event, on_retry: Callable[[int, BaseException, float], None],
                backoff: Backoff = Backoff()) -> T | None:
    """`attempt()`'s result, calling it again after each `retry_on` failure (`on_retry(number, error, delay)`
    says so first); None once `stop` is set. Other errors propagate."""
    for number, delay in enumerate(backoff.delays(), start=1):
        if stop.is_set():
            return None
        try:
            return await attempt()
        except retry_on as exc:
            if stop.is_set():
                return None
            on_retry(number, exc, delay)
            await sleep_unless(stop, delay)
    raise AssertionError("unreachable: delays() never ends")
