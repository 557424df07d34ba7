"""Spans in which the whole machine stood still, seen from a thread that should tick every 10 ms.

A test that holds the broker to a clock (a delayed task runs within a second of its time) must
tell "the broker was late" from "nothing on this machine ran": a virtual machine paused by its
host, or starved of both cores, delays the broker's timers and the test's own clock alike. A
thread, not the event loop, does the ticking: a consumer that blocked the loop is a bug the test
must still see, and a thread keeps ticking through it (the GIL switches every 5 ms).
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

TICK_SECONDS = 0.01
# a gap this much longer than a tick is a stall; shorter ones are ordinary scheduling noise
STALL_SECONDS = 0.2


class Stalls:
    """`with Stalls() as stalls:` records stalls on the monotonic clock until the block ends."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="stalls", daemon=True)

    def __enter__(self) -> Stalls:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _tick(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(TICK_SECONDS):
            now = time.monotonic()
            if now - last - TICK_SECONDS > STALL_SECONDS:
                self.spans.append((last, now))
            last = now

    def within(self, start: float, end: float) -> float:
        """Seconds of stall between two monotonic times."""
        return sum(max(0.0, min(end, b) - max(start, a)) for a, b in self.spans)

    def __str__(self) -> str:
        if not self.spans:
            return "no stalls"
        return ", ".join(f"{b - a:.2f}s" for a, b in self.spans)
