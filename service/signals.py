"""SIGTERM and SIGINT as calls into the running loop (graceful shutdown of worker and sink)."""

from __future__ import annotations

import asyncio
import signal
from typing import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def on_stop_signals(callback: Callable[[str], None]) -> None:
    """Call `callback(signal_name)` on the running loop for each SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, callback, sig.name)


class EarlyStop:
    """Remembers SIGTERM/SIGINT that arrive before the event loop runs (imports and model loading
    take seconds), so a worker stopped while it starts exits cleanly instead of being killed."""

    def __init__(self) -> None:
        self.signals: list[str] = []

    def install(self) -> EarlyStop:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, _frame: object) -> None:
        self.signals.append(signal.Signals(signum).name)
