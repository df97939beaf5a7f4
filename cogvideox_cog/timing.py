"""Time spent making frames that are made only as they are read: upscale and interpolate run
inside the encoder's loop, so their seconds are the sum of the waits for their frames."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Timed(Iterator[T]):
    """An iterable's items, and the seconds spent waiting for them (its sources' included)."""

    def __init__(self, items: Iterable[T]):
        self._items, self.seconds = iter(items), 0.0

    def __next__(self) -> T:
        started = time.monotonic()
        try:
            return next(self._items)
        finally:
            self.seconds += time.monotonic() - started
