"""Publishing as marshalled frames: the fast path of `Publisher.send` and `send_many`.

aiormq's `basic_publish` costs a task, a lock, a timer, a write-queue put, a drain wait and
pamqp's generic encoder per message (docs/performance.md). Here `_wire.frames` encodes, a
batch is written `PIPELINE_CHUNK` messages at a time, a single publish without waiting for
the write, and `Confirms` watches a channel's confirms with one timer. `write_pipelined` is
the one function that reaches into aiormq's Channel internals (7.x); `can_pipeline` falls back
to `basic_publish` when they are missing. The guarantees are `Publisher.send`'s, per message.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, TypeGuard

import aiormq
import aiormq.abc
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic

from rabbitq._errors import NotConfirmed, SendError
from rabbitq._wire import Outgoing, frames

# A batch is written in chunks of this many messages: one write-queue put, one socket write
# and one drain each, so a huge batch never sits in the transport buffer at once.
PIPELINE_CHUNK = 256
DEADLINE = "rabbitq: no confirm within the confirm timeout"  # aiormq ignores a late one
Settled = Callable[[Outgoing, SendError | None, float], None]


class Confirms:
    """The confirms in flight on one aiormq channel (see `can_pipeline`): each fails with the
    reason when the channel or its connection closes, and is cancelled with `DEADLINE` once
    `confirm_timeout` passed since its write. Deadlines come in the order of the writes, so
    one timer, set for the oldest, serves them all (aiormq sets one per publish)."""

    def __init__(self, channel: aiormq.Channel, confirm_timeout: float) -> None:
        self.channel, self.confirm_timeout, self.loop = channel, confirm_timeout, channel.loop
        self.method_frames: dict[tuple[str, str], bytes] = {}  # see `frames`
        self.pending: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.closing = channel.closing
        self.closing.add_done_callback(self._closed)

    def frames(self, out: Outgoing) -> bytes:
        return frames(out, self.channel.number, self.channel.max_content_size, self.method_frames)

    async def publish(self, out: Outgoing) -> Any:
        """Publish and wait: aiormq's Ack, or what `basic_publish` raises, or TimeoutError."""
        write = self.write(self.frames(out), [out.message_id], drain=False)
        if self.channel.write_queue.full():  # the put waits for aiormq's writer: not for ever
            write = asyncio.wait_for(write, self.confirm_timeout)
        [future] = await write
        try:
            return await future
        except asyncio.CancelledError as exc:
            if exc.args != (DEADLINE,):
                raise  # the caller was cancelled
            raise TimeoutError from None

    async def write(
        self, payload: bytes, message_ids: list[str], drain: bool
    ) -> list[asyncio.Future[Any]]:
        """`write_pipelined`, its confirms watched from now; on a closed channel, why."""
        if self.closing.done():
            raise _close_reason(self.closing)
        deadline = self.loop.time() + self.confirm_timeout
        futures = await write_pipelined(self.channel, payload, message_ids, drain)
        pending = self.pending
        while pending and pending[0][1].done():
            pending.popleft()
        pending.extend((deadline, future) for future in futures)
        if self.closing.done():  # it closed while this waited: nothing else fails them now
            self._closed(self.closing)
        elif self.timer is None:
            self.timer = self.loop.call_at(deadline, self._expire)
        return futures

    def _expire(self) -> None:
        self.timer, now, pending = None, self.loop.time(), self.pending
        while pending:
            deadline, future = pending[0]
            if not future.done():
                if deadline > now:
                    self.timer = self.loop.call_at(deadline, self._expire)
                    return
                future.cancel(DEADLINE)
            pending.popleft()

    def _closed(self, closing: asyncio.Future[Any]) -> None:
        reason = _close_reason(closing)
        for _, future in self.pending:
            if not future.done():
                future.set_exception(reason)
        self.pending.clear()  # (the timer, if set, finds nothing)


def _close_reason(closing: asyncio.Future[Any]) -> BaseException:
    reason = None if closing.cancelled() else closing.exception()
    return reason or aiormq.exceptions.ChannelClosed()


class Pipeline:
    """One `send_many`: marshal, write in chunks, collect the confirms.

    Args:
        confirms: the channel's (`confirm_timeout` runs from each chunk's write).
        batch: the messages, in order.
        error_of: what a failure means to the caller of one message.
        settled: called once per message with its error (None: confirmed) and the seconds from
            the batch's start to its confirm (0: never written), also if it is cancelled.
    """

    def __init__(
        self,
        confirms: Confirms,
        batch: list[Outgoing],
        error_of: Callable[[Outgoing, BaseException], SendError],
        settled: Settled | None,
    ) -> None:
        self.confirms, self.batch, self.error_of, self.settled = confirms, batch, error_of, settled
        self.errors: list[SendError | None] = [None] * len(batch)
        self.sent: list[tuple[int, asyncio.Future[Any]]] = []
        self.written: dict[str, asyncio.Future[Any]] = {}  # the latest publish of each id
        self.chunk: dict[str, tuple[int, bytes]] = {}  # by id: index in the batch, frames
        self.started = time.monotonic()

    async def run(self) -> list[SendError | None]:
        """Every message's error or None, in order. Unsettled confirms are cancelled on the
        way out (aiormq ignores a confirm that comes after)."""
        try:
            await self._write_all()
            for _, future in self.sent:  # each settles: confirmed, failed or past its deadline
                if not future.done():  # (confirms come in bursts: few waits)
                    await asyncio.wait((future,))
            for i, future in self.sent:
                self.errors[i] = self._outcome(self.batch[i], future)
        finally:
            sent = dict(self.sent)
            for i, out in enumerate(self.batch):
                if (confirm := sent.get(i)) is not None:
                    if not confirm.cancel() and not confirm.cancelled():
                        confirm.exception()  # settled: seen, so asyncio never logs it as lost
                elif self.settled is not None:  # never written: failed, or the batch cancelled
                    error = self.errors[i] or NotConfirmed(out.message_id, "cancelled")
                    self.settled(out, error, 0.0)
        return self.errors

    async def _write_all(self) -> None:
        """Marshal and write the batch in chunks; stop at the first chunk that fails."""
        for i, out in enumerate(self.batch):
            # aiormq matches a return to its publish by message id, so an id must not be in
            # flight twice in a batch: the later one waits for the earlier. (Concurrent
            # publishes of one id from separate calls are aiormq's case.)
            message_id = out.message_id
            if message_id in self.chunk and not await self._flush():
                return
            earlier = self.written.get(message_id)
            if earlier is not None and not earlier.done():
                await asyncio.wait((earlier,))
            try:
                self.chunk[message_id] = (i, self.confirms.frames(out))
            except Exception as exc:  # a header or property AMQP cannot encode
                self.errors[i] = self.error_of(out, exc)
                continue
            if len(self.chunk) == PIPELINE_CHUNK and not await self._flush():
                return
        await self._flush()

    async def _flush(self) -> bool:
        """Write the chunk; False (and every message from it on failed) if that failed."""
        chunk, self.chunk = self.chunk, {}
        if not chunk:
            return True
        indexes = [i for i, _ in chunk.values()]
        payload = b"".join([data for _, data in chunk.values()])
        try:
            async with asyncio.timeout(self.confirms.confirm_timeout):
                futures = await self.confirms.write(payload, list(chunk), drain=True)
        except Exception as exc:  # closed, or the socket did not drain in time
            self._fail_from(indexes[0], exc)
            return False
        self.sent += zip(indexes, futures, strict=True)
        self.written.update(zip(chunk, futures, strict=True))
        if (settled := self.settled) is not None:
            for i, future in zip(indexes, futures, strict=True):
                future.add_done_callback(partial(self._settle, settled, self.batch[i]))
        return True

    def _settle(self, settled: Settled, out: Outgoing, future: asyncio.Future[Any]) -> None:
        settled(out, self._outcome(out, future), time.monotonic() - self.started)

    def _fail_from(self, first: int, exc: BaseException) -> None:
        for i in range(first, len(self.batch)):
            if self.errors[i] is None:
                self.errors[i] = self.error_of(self.batch[i], exc)

    def _outcome(self, out: Outgoing, future: asyncio.Future[Any]) -> SendError | None:
        try:
            confirm = future.result()
        except asyncio.CancelledError as exc:
            if exc.args == (DEADLINE,):
                return self.error_of(out, TimeoutError())
            return NotConfirmed(out.message_id, "the publish was cancelled; outcome unknown")
        except Exception as exc:
            return self.error_of(out, exc)
        if not isinstance(confirm, Basic.Ack):
            return NotConfirmed(out.message_id, "the broker nacked it", nacked=True)
        return None


def can_pipeline(channel: aiormq.abc.AbstractChannel) -> TypeGuard[aiormq.Channel]:
    """Whether `write_pipelined` knows this channel: aiormq's own, with confirms on."""
    return (
        isinstance(channel, aiormq.Channel)
        and all(hasattr(channel, name) for name in _CHANNEL_INTERNALS)
        and bool(channel.publisher_confirms)
    )


# What `write_pipelined` uses of aiormq's Channel beyond `basic_publish`.
_CHANNEL_INTERNALS = (
    "lock delivery_tag confirmations message_id_delivery_tag write_queue max_content_size "
    "publisher_confirms create_future closing loop"
).split()


async def write_pipelined(
    channel: aiormq.Channel, payload: bytes, message_ids: list[str], drain: bool = True
) -> list[asyncio.Future[Any]]:
    """Write a chunk of marshalled publishes at once; a confirm future for each, in order.

    One lock, one put and one write cover the chunk; with `drain`, it returns once the socket
    took it (a batch's backpressure), else once aiormq's writer has it. The bookkeeping is
    aiormq's (7.x), done as `basic_publish` does it: under the channel lock, delivery tags
    numbered in the order the frames are written; a future per tag in `confirmations`, which
    aiormq's reader resolves on an ack and fails on a nack or a return; and
    `message_id_delivery_tag`, by which the reader finds the publish a return belongs to,
    dropped once it is settled. The futures are plain ones, not in aiormq's future store
    (~7 us a message), which would fail them on a close: `Confirms` does. The broker tests of
    returns, nacks and closes cover what these attributes mean.
    """
    loop = channel.loop
    futures = [loop.create_future() for _ in message_ids]
    async with channel.lock:
        first = channel.delivery_tag + 1
        tags = range(first, first + len(message_ids))
        entries = list(zip(tags, message_ids, futures, strict=True))
        confirmations, lookup = channel.confirmations, channel.message_id_delivery_tag
        for tag, message_id, future in entries:
            confirmations[tag] = future
            lookup[message_id] = tag
        channel.delivery_tag = tags[-1]
        # aiormq's future: failed if the channel closes meanwhile
        drained = channel.create_future() if drain else None
        sent = False
        try:
            await channel.write_queue.put(ChannelFrame(payload, False, drained))
            sent = True
            for tag, message_id, future in entries:
                future.add_done_callback(partial(_forget, lookup, message_id, tag))
            if drained is not None:
                await drained
        except BaseException:
            if not sent:  # the broker never saw these: take the tags back, as aiormq does
                channel.delivery_tag = first - 1
                for tag, message_id, future in entries:
                    confirmations.pop(tag, None)
                    _forget(lookup, message_id, tag)
                    future.cancel()
            if drained is not None:
                drained.cancel()
            raise
    return futures


def _forget(lookup: dict[str, int], message_id: str, tag: int, *_: object) -> None:
    """Drop a settled publish's return lookup, unless a later publish reused its id."""
    if lookup.get(message_id) == tag:
        del lookup[message_id]
