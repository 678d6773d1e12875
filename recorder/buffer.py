"""The bounded in-memory buffer between paho's network thread and the writer thread.

``put`` never blocks (it runs on the network thread). When the buffer holds ``max_items``,
a *droppable* item (a QoS 0 sample: at-most-once by contract) is refused and counted;
an item that will be acknowledged (QoS 1) is always kept: it is not acknowledged until
stored, so the broker still holds it, and how many such messages can be outstanding is
the broker's in-flight window for this client (its Receive Maximum).
``take`` hands the writer a batch in arrival order, lingering briefly for it to fill.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class BoundedBuffer(Generic[T]):
    """FIFO of pending messages; thread-safe."""

    def __init__(self, max_items: int) -> None:
        if max_items < 1:
            raise ValueError("buffer needs room for at least one item")
        self.max_items = max_items
        self.dropped = 0
        self.high_water = 0
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._wake_at = 1
        """``put`` notifies the writer once this many items wait (1 unless it lingers)."""
        self._woken = False

    def put(self, item: T, droppable: bool = False) -> bool:
        """Append ``item``; False (and counted in ``dropped``) when full and droppable."""
        with self._cond:
            n = len(self._items)
            if droppable and n >= self.max_items:
                self.dropped += 1
                return False
            self._items.append(item)
            n += 1
            if n > self.high_water:
                self.high_water = n
            if n >= self._wake_at:
                self._cond.notify()
            return True

    def take(self, max_n: int, timeout_s: float, linger_s: float = 0.0) -> list[T]:
        """Up to ``max_n`` items, oldest first. Waits up to ``timeout_s`` seconds for the
        first one, then up to ``linger_s`` more for the batch to fill (bigger transactions,
        fewer commits); returns at once when ``max_n`` are there or after :meth:`wake`."""
        with self._cond:
            if not self._items and not self._woken:
                self._cond.wait(timeout_s)
            if self._items and linger_s > 0 and not self._woken:
                deadline = time.monotonic() + linger_s
                self._wake_at = max_n
                try:
                    while len(self._items) < max_n and not self._woken:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                finally:
                    self._wake_at = 1
            n = min(max_n, len(self._items))
            return [self._items.popleft() for _ in range(n)]

    def wake(self) -> None:
        """Wake a waiting ``take``; from now on it neither waits nor lingers (shutdown)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
