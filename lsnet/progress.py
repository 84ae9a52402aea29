"""A progress bar that stays readable in a log file.

On a terminal it redraws one line (``\\r``); otherwise (a log file, a pipe, ``ray job logs``) it prints
a plain line at most every ``every_s`` seconds and at the end -- no carriage returns, no colour codes::

    [test] 40/158 images (25%) 3.2 images/s, ETA 0:00:37
"""
from __future__ import annotations

import datetime as _dt
import sys
import time
from typing import Self, TextIO


def _eta(seconds: float) -> str:
    return str(_dt.timedelta(seconds=max(0, round(seconds))))


class Progress:
    """``with Progress(total, "test", "images") as bar: bar.update(n)``."""

    def __init__(self, total: int, label: str, unit: str = "items", stream: TextIO | None = None,
                 every_s: float = 10.0, enabled: bool = True):
        self.total, self.label, self.unit = max(int(total), 0), label, unit
        self.stream = stream if stream is not None else sys.stderr
        self.every_s, self.enabled = every_s, enabled
        self.done = 0
        self.start = self._last = time.perf_counter()
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())

    def line(self, now: float | None = None) -> str:
        """The current progress as one line (no newline)."""
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        rate = self.done / elapsed
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = f"[{self.label}] {self.done}/{self.total} {self.unit}{pct} {rate:.1f} {self.unit}/s"
        if self.done < self.total and rate > 0:
            text += f", ETA {_eta((self.total - self.done) / rate)}"
        elif self.done >= self.total:
            text += f", {elapsed:.1f}s"
        return text

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r" + self.line(now))
            self.stream.flush()
        elif now - self._last >= self.every_s and self.done < self.total:
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()
            self._last = now

    def close(self) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + self.line() + "\n")
            self.stream.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
