"""A tiny progress bar on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


class Progress:
    """``update(done)`` redraws at most every ``min_interval_s`` seconds; ``close()`` ends
    the line. Does nothing when disabled (stderr not a terminal, or ``enabled=False``)."""

    def __init__(self, total: int | None, label: str = "", *, stream: TextIO | None = None,
                 enabled: bool | None = None, width: int = 30,
                 min_interval_s: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.total = total
        self.label = label
        self.width = width
        self.min_interval_s = min_interval_s
        self.done = 0
        self._last_draw = 0.0
        self._drawn = False

    def update(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw >= self.min_interval_s or done == self.total:
            self._last_draw = now
            self._draw()

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def render(self) -> str:
        """The bar as text: ``label [#####-----]  50% 5/10``."""
        if self.total:
            frac = min(1.0, self.done / self.total)
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            return f"{self.label} [{bar}] {frac * 100:3.0f}% {self.done}/{self.total}"
        return f"{self.label} {self.done}"

    def _draw(self) -> None:
        self.stream.write("\r" + self.render())
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], total: int | None, label: str = "", *,
          stream: TextIO | None = None, enabled: bool | None = None,
          every: int = 100) -> Iterator[T]:
    """Yield ``items`` unchanged, advancing a :class:`Progress` bar every ``every`` items;
    e.g. ``track(read_samples(db), count_samples(db), "replay")`` for ``gpuheal replay``."""
    bar = Progress(total, label, stream=stream, enabled=enabled)
    done = 0
    try:
        for item in items:
            yield item
            done += 1
            if done % every == 0:
                bar.update(done)
        bar.update(done)
    finally:
        bar.close()
