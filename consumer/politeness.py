"""Per-host politeness for image fetches: a bound on the fetches to one host, and its Retry-After shared.

A host is an origin (scheme, name, port). Its requests wait for one of its slots, and while
the host's Retry-After holds, for that too, within the fetch deadline; one that would wait
past its deadline is given up at once as a transient failure, which the worker defers.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Final

from yarl import URL

# A host asking for more than a day is treated as asking for a day: its entry must expire some time.
MAX_RETRY_AFTER_S: Final = 24 * 3600.0
# Hosts remembered only for their Retry-After are swept once there are this many entries.
SWEEP_AT_ENTRIES: Final = 4096


class HostBackoff(Exception):
    """A host's Retry-After outlasts the fetch's deadline: the fetch must not ask it now."""

    def __init__(self, host: str, wait_s: float) -> None:
        super().__init__(f"host {host} asked to be left alone for {wait_s:.1f} s more (Retry-After)")
        self.host = host
        self.wait_s = wait_s


@dataclass
class _Host:
    slots: asyncio.Semaphore
    users: int = 0  # fetches holding or waiting for a slot
    blocked_until: float = 0.0  # loop time before which the host is not asked


def origin(url: URL) -> str:
    """The host a fetch of `url` asks: scheme://name:port."""
    return f"{url.scheme}://{(url.host or '').lower()}:{url.port}"


class HostPoliteness:
    """At most `per_host` fetches to one host at a time, and a host's Retry-After held for every fetch.

    `waits` counts fetches that had to wait, by reason ("slot": the host's fetches were at the
    bound; "retry_after": the host had asked to be left alone); `backoffs` counts fetches given
    up at once because the host's Retry-After outlasted their deadline.
    """

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self._hosts: dict[str, _Host] = {}
        self.waits: Counter[str] = Counter()
        self.backoffs = 0

    def blocked_for(self, host: str) -> float:
        """Seconds until `host` may be asked again (0: now)."""
        entry = self._hosts.get(host)
        if entry is None:
            return 0.0
        return max(0.0, entry.blocked_until - asyncio.get_running_loop().time())

    def block(self, host: str, seconds: float) -> None:
        """`host` answered with a Retry-After of `seconds`: no fetch of this worker asks it before then."""
        until = asyncio.get_running_loop().time() + min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
        entry = self._entry(host)
        entry.blocked_until = max(entry.blocked_until, until)
        if len(self._hosts) >= SWEEP_AT_ENTRIES:
            self._sweep()

    def turn(self, host: str, deadline: float | None) -> _Turn:
        """`async with` it to hold one of `host`'s slots, once its Retry-After has passed.

        `deadline` is the fetch's (loop time); raises HostBackoff when the Retry-After ends after it.
        """
        return _Turn(self, host, deadline)

    async def _acquire(self, host: str, entry: _Host, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        if entry.blocked_until <= loop.time() and not entry.slots.locked():
            await entry.slots.acquire()  # the common case: a free slot, no Retry-After (takes it at once)
            return
        counted: set[str] = set()
        while True:
            wait = entry.blocked_until - loop.time()
            if wait > 0:
                if deadline is not None and loop.time() + wait >= deadline:
                    self.backoffs += 1
                    raise HostBackoff(host, wait)
                self._count_wait("retry_after", counted)
                await asyncio.sleep(wait)
                continue
            if entry.slots.locked():
                self._count_wait("slot", counted)
            await entry.slots.acquire()
            # A fetch that held the slot may have been told to back off meanwhile.
            if entry.blocked_until > loop.time():
                entry.slots.release()
                continue
            return

    def _count_wait(self, reason: str, counted: set[str]) -> None:
        if reason not in counted:  # one wait per fetch and reason, however often it loops
            counted.add(reason)
            self.waits[reason] += 1

    def _entry(self, host: str) -> _Host:
        entry = self._hosts.get(host)
        if entry is None:
            entry = self._hosts[host] = _Host(asyncio.Semaphore(self.per_host))
        return entry

    def _forget_if_idle(self, host: str, entry: _Host) -> None:
        if entry.users == 0 and entry.blocked_until <= asyncio.get_running_loop().time():
            self._hosts.pop(host, None)

    def _sweep(self) -> None:
        for host, entry in list(self._hosts.items()):
            self._forget_if_idle(host, entry)


class _Turn:
    """One fetch's turn at a host (HostPoliteness.turn): a plain class, as every fetch enters one."""

    __slots__ = ("hosts", "host", "deadline", "entry", "holding")

    def __init__(self, hosts: HostPoliteness, host: str, deadline: float | None) -> None:
        self.hosts = hosts
        self.host = host
        self.deadline = deadline
        self.entry: _Host | None = None
        self.holding = False

    async def __aenter__(self) -> None:
        self.entry = entry = self.hosts._entry(self.host)
        entry.users += 1
        try:
            await self.hosts._acquire(self.host, entry, self.deadline)
        except BaseException:
            self._leave()
            raise
        self.holding = True

    async def __aexit__(self, *exc: object) -> None:
        assert self.entry is not None
        if self.holding:
            self.holding = False
            self.entry.slots.release()
        self._leave()

    def _leave(self) -> None:
        assert self.entry is not None
        self.entry.users -= 1
        self.hosts._forget_if_idle(self.host, self.entry)
