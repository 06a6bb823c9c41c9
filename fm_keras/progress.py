"""Progress lines for humans: on stderr, so that stdout stays free for one JSON result."""

from __future__ import annotations

import sys
import time


def log(message: str) -> None:
    """Prints ``fm-keras: <message>`` to stderr, flushed."""
    print(f"fm-keras: {message}", file=sys.stderr, flush=True)


class RowProgress:
    """A line ``<what>: N rows so far (R rows/s)`` at most every `interval` seconds while a
    long pass reads rows (the first after `interval`), so that a pass over a large log is not
    minutes of silence.

    Args:
        what: names the pass, e.g. ``"fit pass"``.
        interval: seconds between lines (30, as `fm-keras score` writes to a log file).
    """

    def __init__(self, what: str, interval: float = 30.0):
        self.what, self.interval = what, interval
        self.rows, self.started = 0, time.monotonic()
        self._last = self.started

    def update(self, rows: int) -> None:
        """Counts `rows` more rows read; logs a line if `interval` has passed since the last."""
        self.rows += rows
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            log(f"{self.what}: {self.rows:,} rows so far "
                f"({self.rows / max(now - self.started, 1e-9):,.0f} rows/s)")
