"""Phase times that add up to the whole: each phase ends where the next begins, so the time
spent recording one phase's metric or logging it is counted in the next, never lost between
two timers."""

from __future__ import annotations

import time


class Laps:
    def __init__(self, start: float | None = None):
        self.last = time.monotonic() if start is None else start

    def lap(self) -> float:
        """Seconds since the previous lap ended (or the start); the next lap starts now."""
        now = time.monotonic()
        seconds, self.last = now - self.last, now
        return seconds
