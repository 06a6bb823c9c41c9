"""Progress lines for humans: on stderr, so that stdout stays free for one JSON result."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    """Prints ``fm-keras: <message>`` to stderr, flushed."""
    print(f"fm-keras: {message}", file=sys.stderr, flush=True)
