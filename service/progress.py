"""Progress on stderr for long commands: a tqdm bar when tqdm is installed and stderr is a terminal, a bar of
our own on a terminal without it, and a line every few seconds in logs (stderr not a terminal)."""

from __future__ import annotations

import sys
import time
from typing import Any

LINE_EVERY_S = 5.0
BAR_WIDTH = 30


class Progress:
    """Counts finished items of one stage; `note` shows what is being worked on."""

    def __init__(self, label: str, total: int, enabled: bool = True, unit: str = "it") -> None:
        self.label, self.total, self.enabled, self.done = label, total, enabled, 0
        self.tty = sys.stderr.isatty()
        self._bar: Any = None
        self._last_line = time.monotonic()
        if enabled and self.tty:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc=label, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        elif self.tty:
            filled = int(BAR_WIDTH * self.done / max(1, self.total))
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.done}/{self.total}")
            sys.stderr.flush()
        elif time.monotonic() - self._last_line >= LINE_EVERY_S:
            self._last_line = time.monotonic()
            print(f"{self.label}: {self.done}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.tty:
            sys.stderr.write("\n")
        elif self.enabled:
            print(f"{self.label}: {self.done}/{self.total}", file=sys.stderr, flush=True)
