"""Publishing at a steady rate: the load for the latency scenario.

Each publish is its own task, started on schedule and stamped with the wall-clock time as it
starts, so a slow confirm never delays the next send and every latency is measured from the
moment the task was handed to the publisher.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

# asyncio's timers are about 1 ms coarse; a burst of due sends per wake-up keeps the mean exact.
MIN_SLEEP_SECONDS = 0.0005


async def paced(send: Callable[[int], Awaitable[None]], rate: float, count: int) -> float:
    """Call `send(i)` for i in 0..count-1 at `rate` per second; the rate achieved.

    Raises:
        the first exception of a send, once all have finished.
    """
    started = time.monotonic()
    pending: list[asyncio.Task[None]] = []
    sent = 0
    while sent < count:
        due = min(count, int((time.monotonic() - started) * rate) + 1)
        while sent < due:
            pending.append(asyncio.ensure_future(send(sent)))
            sent += 1
        next_at = started + sent / rate
        await asyncio.sleep(max(MIN_SLEEP_SECONDS, next_at - time.monotonic()))
    elapsed = time.monotonic() - started
    await asyncio.gather(*pending)
    return count / elapsed if elapsed > 0 else float("nan")
