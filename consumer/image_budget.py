"""The bound on image bytes held by requests in flight (fetched plus decoded)."""

from __future__ import annotations

import asyncio


class ImageHold:
    """One request's share of the image budget: an estimate until its image is decoded, then what it holds."""

    __slots__ = ("reserved", "held")

    def __init__(self, reserved: int) -> None:
        self.reserved = reserved
        self.held = 0

    @property
    def charge(self) -> int:
        return max(self.reserved, self.held)


class ImageBudget:
    """Image bytes (fetched plus decoded) held by requests in flight, kept near `limit`.

    A request may start fetching only if its estimated size still fits (or nothing else is
    held, so one oversized image can always pass). The estimate starts at the worst case
    and then follows the sizes seen; the bound is exceeded only by images larger than the
    estimate while they are being fetched and decoded.
    """

    SMOOTHING = 0.2

    def __init__(self, limit: int, worst_case: int) -> None:
        self.limit = limit
        self.estimate = worst_case
        self.used = 0  # what admission counts: reservations and bytes held
        self.held = 0  # bytes actually held
        self.peak = 0  # the most bytes held at once
        self._seen = 0
        self._freed = asyncio.Event()

    def full(self) -> bool:
        """Whether a new request would have to wait."""
        return self.used > 0 and self.used + self.estimate > self.limit

    async def acquire(self) -> ImageHold:
        while self.full():
            self._freed.clear()
            await self._freed.wait()
        hold = ImageHold(self.estimate)
        self._charge(hold.charge)
        return hold

    def add(self, hold: ImageHold, size: int) -> None:
        before = hold.charge
        hold.held += size
        self.held += size
        self.peak = max(self.peak, self.held)
        self._charge(hold.charge - before)

    def settle(self, hold: ImageHold) -> None:
        """The image is decoded: charge what it holds, and learn from its size."""
        before = hold.charge
        hold.reserved = 0
        self._charge(hold.charge - before)
        self.estimate = hold.held if self._seen == 0 else round(
            (1 - self.SMOOTHING) * self.estimate + self.SMOOTHING * hold.held)
        self._seen += 1

    def release(self, hold: ImageHold) -> None:
        self.held -= hold.held
        self._charge(-hold.charge)
        hold.reserved = hold.held = 0

    def _charge(self, delta: int) -> None:
        self.used += delta
        if delta < 0:
            self._freed.set()
