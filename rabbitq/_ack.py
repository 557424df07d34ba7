"""Batched acks for one consuming connection, sent only for deliveries whose outcome is safe.

A `basic.ack` with `multiple=True` settles every outstanding delivery up to its tag, so it may
only name a tag below which every delivery has finished. Handlers finish out of order; the
acker tracks the lowest delivery still unfinished and acks everything finished below it in one
frame, once the handlers that can run have run (a turn of the event loop: no timer holds a
finished task's prefetch slot). Finished deliveries above a running one are acked one by one.
Every frame is written at once, in order, so a multiple-ack never overtakes the nack of a
delivery below it, and whatever was written goes out before a close.

Delivery tags belong to their channel, so an acker lives and dies with its connection:
whatever it still holds when the connection dies is redelivered by the broker
(at-least-once), never acked on another channel.
"""

from __future__ import annotations

import asyncio
import logging

from rabbitq._amqp import ConsumeConnection, Delivery

logger = logging.getLogger("rabbitq.ack")

# At most this many deliveries per ack frame; fewer frames cut the broker's CPU per delivery.
ACK_BATCH = 32


class Acker:
    """Settles the deliveries of one consuming connection, batching acks where it is safe.

    Args:
        connection: the connection the deliveries came on.
        prefetch: the channel's prefetch count.
    """

    def __init__(self, connection: ConsumeConnection, prefetch: int) -> None:
        self.connection = connection
        # A finished but unacked delivery still holds a prefetch slot: batch at most a quarter
        # of the window, so the broker keeps sending (and at prefetch < 8, ack at once).
        self.batch = max(1, min(ACK_BATCH, prefetch // 4))
        self._low = 1  # every tag below this has finished
        self._finished: set[int] = set()  # finished tags above _low
        self._to_ack: list[int] = []
        self._flush: asyncio.Handle | None = None

    @property
    def dead(self) -> bool:
        return self.connection.is_closed

    def settle(self, message: Delivery, requeue: bool = False) -> bool:
        """Ack (or nack with requeue) a delivery of this connection; False if it is gone
        (the broker has requeued the delivery already)."""
        if self.connection.is_closed:
            logger.info(
                "message %s not %s: its channel is closed; the broker redelivers it",
                message.properties.message_id,
                "returned" if requeue else "acked",
            )
            return False
        (self.nack if requeue else self.ack)(message.tag)
        return True

    def ack(self, tag: int) -> None:
        """The delivery's outcome is safe: ack it now, or once the handlers that can run now
        have run (the next turn of the loop), in one frame with theirs."""
        self._to_ack.append(tag)
        self._finish(tag)
        if len(self._to_ack) >= self.batch:
            self.flush()
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self.flush)

    def nack(self, tag: int) -> None:
        """Return the delivery to the queue, after every ack already due."""
        self.flush()
        self.connection.nack(tag)
        self._finish(tag)

    def flush(self) -> None:
        """Write the pending acks: one multiple-ack below the lowest running delivery, single
        acks above it."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if not self._to_ack:
            return
        tags, self._to_ack = sorted(self._to_ack), []
        below = 0
        while below < len(tags) and tags[below] < self._low:
            below += 1
        if below:
            self.connection.ack(tags[below - 1], below > 1)
        for tag in tags[below:]:
            self.connection.ack(tag)

    def _finish(self, tag: int) -> None:
        self._finished.add(tag)
        while self._low in self._finished:
            self._finished.discard(self._low)
            self._low += 1
