"""When the acker writes: on the loop's next turn, in one frame for what finished together.

The frames' effect on the broker is tested against it (tests/broker/test_acks.py); this holds
the timing that keeps a finished task from holding its prefetch slot.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from rabbitq._ack import Acker
from rabbitq._amqp import ConsumeConnection


class Written:
    """Records the frames an acker writes."""

    is_closed = False

    def __init__(self) -> None:
        self.frames: list[tuple[str, int, bool]] = []

    def ack(self, tag: int, multiple: bool = False) -> bool:
        self.frames.append(("ack", tag, multiple))
        return True

    def nack(self, tag: int) -> bool:
        self.frames.append(("nack", tag, False))
        return True


def acker(prefetch: int) -> tuple[Acker, Written]:
    written = Written()
    return Acker(cast(ConsumeConnection, cast(Any, written)), prefetch), written


async def test_tasks_finished_in_one_turn_are_acked_in_one_frame_on_the_next() -> None:
    ack, written = acker(64)
    for tag in (1, 2, 3):
        ack.ack(tag)
    assert written.frames == []  # held while the handlers that can run now still run
    await asyncio.sleep(0)
    assert written.frames == [("ack", 3, True)]


async def test_a_quarter_of_the_window_is_acked_at_once() -> None:
    ack, written = acker(64)
    for tag in range(1, 17):
        ack.ack(tag)
    assert written.frames == [("ack", 16, True)]


async def test_finished_above_a_running_delivery_are_acked_singly_and_a_nack_follows_acks() -> None:
    ack, written = acker(64)
    ack.ack(2)
    ack.ack(3)  # 1 still runs: a multiple-ack of 3 would settle it
    ack.nack(1)
    assert written.frames == [("ack", 2, False), ("ack", 3, False), ("nack", 1, False)]
