"""Batched acks for one consuming channel, sent only for deliveries whose outcome is safe.

A `basic.ack` with `multiple=True` settles every outstanding delivery up to its tag, so it may
only name a tag below which every delivery has finished. Handlers finish out of order; the
acker tracks the lowest delivery still unfinished and acks everything finished below it in one
frame. Finished deliveries above a running one wait for it, or for a short timer, which then
acks them one by one. Every frame (acks and nacks) leaves through one ordered queue, so a
multiple-ack can never overtake the nack of a delivery below it.

Delivery tags belong to their channel, so an acker lives and dies with its channel: whatever
it still holds when the channel dies is redelivered by the broker (at-least-once), never acked
on another channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from aiormq.abc import AbstractChannel, DeliveredMessage

logger = logging.getLogger("rabbitq.ack")

# At most this many deliveries per ack frame; fewer frames cut the broker's CPU per delivery.
ACK_BATCH = 32
# How long a finished delivery may wait for its ack.
ACK_DELAY_SECONDS = 0.01


class Acker:
    """Settles the deliveries of one channel, batching acks where it is safe.

    Args:
        channel: the aiormq channel the deliveries came on.
        prefetch: the channel's prefetch count.
    """

    def __init__(self, channel: AbstractChannel, prefetch: int) -> None:
        self.channel = channel
        # A finished but unacked delivery still holds a prefetch slot: batch at most a quarter
        # of the window, so the broker keeps sending (and at prefetch < 8, ack at once).
        self.batch = max(1, min(ACK_BATCH, prefetch // 4))
        self._low = 1  # every tag below this has finished
        self._finished: set[int] = set()  # finished tags above _low
        self._to_ack: list[int] = []
        self._frames: deque[tuple[int, bool, bool]] = deque()  # (tag, multiple, requeue)
        self._sender: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.dead = False

    def settle(self, message: DeliveredMessage, requeue: bool = False) -> bool:
        """Ack (or nack with requeue) a delivery of this channel; False if the channel is gone
        (the broker has requeued the delivery already)."""
        if self.dead or message.channel.is_closed:
            logger.info(
                "message %s not %s: its channel is closed; the broker redelivers it",
                message.header.properties.message_id,
                "returned" if requeue else "acked",
            )
            return False
        tag = message.delivery_tag
        assert tag is not None
        (self.nack if requeue else self.ack)(tag)
        return True

    def ack(self, tag: int) -> None:
        """The delivery's outcome is safe: ack it now or within ACK_DELAY_SECONDS."""
        self._to_ack.append(tag)
        self._finish(tag)
        if len(self._to_ack) >= self.batch:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(ACK_DELAY_SECONDS, self.flush)

    def nack(self, tag: int) -> None:
        """Return the delivery to the queue, ahead of any later ack."""
        self.flush()
        self._frames.append((tag, False, True))
        self._finish(tag)
        self._kick()

    def flush(self) -> None:
        """Queue the pending acks: one multiple-ack below the lowest running delivery, single
        acks above it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._to_ack:
            return
        tags, self._to_ack = sorted(self._to_ack), []
        below = 0
        while below < len(tags) and tags[below] < self._low:
            below += 1
        if below:
            self._frames.append((tags[below - 1], below > 1, False))
        self._frames.extend((tag, False, False) for tag in tags[below:])
        self._kick()

    async def settled(self) -> None:
        """Wait until every queued frame has been written (or the channel died)."""
        self.flush()
        while self._sender is not None and not self._sender.done():
            await asyncio.shield(self._sender)

    def _finish(self, tag: int) -> None:
        self._finished.add(tag)
        while self._low in self._finished:
            self._finished.discard(self._low)
            self._low += 1

    def _kick(self) -> None:
        if self._frames and (self._sender is None or self._sender.done()):
            self._sender = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        while self._frames:
            tag, multiple, requeue = self._frames.popleft()
            try:
                if requeue:
                    await self.channel.basic_nack(tag, requeue=True)
                else:
                    await self.channel.basic_ack(tag, multiple=multiple)
            except Exception as exc:
                # A closed channel raises AMQPError, ConnectionError or aiormq's
                # ChannelInvalidStateError (a RuntimeError): catch all, leave none unretrieved.
                self.dead = True
                logger.info(
                    "%d ack/nack frames not sent: the channel is closed (%s)",
                    len(self._frames) + 1,
                    type(exc).__name__,
                )
                self._frames.clear()
                with contextlib.suppress(Exception):  # only its end makes the broker requeue
                    await self.channel.close()
                return
