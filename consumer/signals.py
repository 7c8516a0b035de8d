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
