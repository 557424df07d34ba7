"""Writing a batch of publishes at once: the fast path of `Publisher.send_many`.

aiormq's `basic_publish` costs a task, a lock, a timeout, a write-queue put, a socket write and
a drain wait per message, most of a batch's client CPU (docs/performance.md). Here a batch is
encoded by `_wire.frames` and written `PIPELINE_CHUNK` messages at a time, one lock, one put
and one write each, with aiormq's own confirm bookkeeping. `write_pipelined` is the one
function that reaches into aiormq's Channel internals (7.x); `can_pipeline` falls back to
`basic_publish` when they are missing. The guarantees are `Publisher.send`'s, per message.
"""

from __future__ import annotations

import asyncio
import time
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


class Pipeline:
    """One `send_many` on an aiormq channel: marshal, write in chunks, collect the confirms.

    Args:
        channel: aiormq's channel, with publisher confirms (see `can_pipeline`).
        batch: the messages, in order.
        confirm_timeout: seconds for the whole batch to be confirmed.
        error_of: what a failure means to the caller of one message.
        settled: called once per message with its error (None: confirmed) and the seconds from
            the start of the batch to its confirm; also when the batch is cancelled.
    """

    def __init__(
        self,
        channel: aiormq.Channel,
        batch: list[Outgoing],
        confirm_timeout: float,
        error_of: Callable[[Outgoing, BaseException], SendError],
        settled: Callable[[Outgoing, SendError | None, float], None] | None,
    ) -> None:
        self.channel, self.batch, self.error_of, self.settled = channel, batch, error_of, settled
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + confirm_timeout
        self.errors: list[SendError | None] = [None] * len(batch)
        self.sent: list[tuple[int, asyncio.Future[Any]]] = []
        self.written: dict[str, asyncio.Future[Any]] = {}  # the latest publish of each id
        self.chunk: dict[str, tuple[int, bytes]] = {}  # by id: index in the batch, frames
        self.method_frames: dict[tuple[str, str], bytes] = {}
        self.started = time.monotonic()
        self.settled_at: dict[asyncio.Future[Any], float] = {}  # for the confirm latency
        # Fires when the channel or its connection closes: the confirm futures are not
        # aiormq's (see `write_pipelined`), so nothing else fails them then.
        self.closing = channel.closing

    async def run(self) -> list[SendError | None]:
        """Every message's error or None, in order. Unsettled confirms are cancelled on the
        way out (aiormq ignores a confirm that comes after)."""
        finished = False
        try:
            await self._write_all()
            unconfirmed = [f for _, f in self.sent if not f.done()]
            if unconfirmed:
                await self._until(_all_done(unconfirmed))
            for i, future in self.sent:
                out = self.batch[i]
                if future.done():
                    self.errors[i] = self._outcome(out, future)
                else:  # the channel closed, or the deadline passed
                    self.errors[i] = self.error_of(out, self._stopped())
            finished = True
        finally:
            if self.settled is not None:
                self._report(self.settled, finished)
            self.closing.cancel()  # stops observing (a no-op if it fired)
            for _, future in self.sent:
                if not future.cancel() and not future.cancelled():
                    future.exception()  # settled: seen, so asyncio never logs it as lost
        return self.errors

    async def _write_all(self) -> None:
        """Marshal and write the batch in chunks; stop at the first chunk that fails."""
        number, max_body = self.channel.number, self.channel.max_content_size
        for i, out in enumerate(self.batch):
            # aiormq matches a return to its publish by message id, so an id must not be in
            # flight twice in a batch: the later one waits for the earlier. (Concurrent
            # publishes of one id from separate calls are aiormq's case.)
            message_id = out.message_id
            if message_id in self.chunk and not await self._flush():
                return
            earlier = self.written.get(message_id)
            if earlier is not None and not await self._until(earlier):
                self._fail_from(i, self._stopped())
                return
            try:
                self.chunk[message_id] = (i, frames(out, number, max_body, self.method_frames))
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
            async with asyncio.timeout_at(self.deadline):
                futures = await write_pipelined(self.channel, payload, list(chunk))
        except Exception as exc:  # closed, or the socket did not drain in time
            self._fail_from(indexes[0], exc)
            return False
        self.sent += zip(indexes, futures, strict=True)
        self.written.update(zip(chunk, futures, strict=True))
        if self.settled is not None:
            for future in futures:
                future.add_done_callback(self._confirmed)
        return True

    def _confirmed(self, future: asyncio.Future[Any]) -> None:
        self.settled_at[future] = time.monotonic()

    def _fail_from(self, first: int, exc: BaseException) -> None:
        for i in range(first, len(self.batch)):
            if self.errors[i] is None:
                self.errors[i] = self.error_of(self.batch[i], exc)

    async def _until(self, future: asyncio.Future[Any]) -> bool:
        """Wait for `future` while the channel is open, until the deadline; whether it came."""
        if not future.done():
            await asyncio.wait(
                (future, self.closing),
                timeout=max(0.0, self.deadline - self.loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        return future.done()

    def _stopped(self) -> BaseException:
        """Why confirms stopped coming: the channel's close reason, or the deadline."""
        if not self.closing.done():
            return TimeoutError()
        reason = None if self.closing.cancelled() else self.closing.exception()
        return reason or aiormq.exceptions.ChannelClosed()

    def _report(
        self, settled: Callable[[Outgoing, SendError | None, float], None], finished: bool
    ) -> None:
        """Each message's outcome; if the batch was cancelled, what was not confirmed by then
        failed."""
        futures = dict(self.sent)
        now = time.monotonic()
        for i, out in enumerate(self.batch):
            future = futures.get(i)
            if finished:
                error = self.errors[i]
            elif future is not None and future.done() and self._outcome(out, future) is None:
                error = None
            else:
                error = NotConfirmed(out.message_id, "cancelled")
            at = self.settled_at.get(future, now) if future is not None else now
            settled(out, error, at - self.started)

    def _outcome(self, out: Outgoing, future: asyncio.Future[Any]) -> SendError | None:
        if future.cancelled():
            return NotConfirmed(out.message_id, "the publish was cancelled; outcome unknown")
        exc = future.exception()
        if exc is not None:
            return self.error_of(out, exc)
        if not isinstance(future.result(), Basic.Ack):
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
    channel: aiormq.Channel, payload: bytes, message_ids: list[str]
) -> list[asyncio.Future[Any]]:
    """Write a chunk of marshalled publishes at once; a confirm future for each, in order.

    One lock, one put and one write cover the chunk. The bookkeeping is aiormq's (7.x), done
    as `basic_publish` does it: under the channel lock, delivery tags numbered in the order
    the frames are written; a future per tag in `confirmations`, which aiormq's reader
    resolves on an ack and fails on a nack or a return; and `message_id_delivery_tag`, by
    which the reader finds the publish a return belongs to, dropped once it is settled.
    Unlike `basic_publish`'s, the futures are plain ones, not registered with aiormq's
    future store (whose bookkeeping cost ~7 us a message): the store would fail them when
    the channel closes, so the caller watches `channel.closing` instead. `can_pipeline`
    falls back to `basic_publish` when these attributes are missing; the broker tests of
    returns, nacks and closes cover their meaning.
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
        drain = channel.create_future()  # aiormq's: failed if the channel closes meanwhile
        sent = False
        try:
            await channel.write_queue.put(
                ChannelFrame(payload=payload, should_close=False, drain_future=drain)
            )
            sent = True
            for tag, message_id, future in entries:
                future.add_done_callback(partial(_forget, lookup, message_id, tag))
            await drain
        except BaseException:
            if not sent:  # the broker never saw these: take the tags back, as aiormq does
                channel.delivery_tag = first - 1
                for tag, message_id, future in entries:
                    confirmations.pop(tag, None)
                    _forget(lookup, message_id, tag)
                    future.cancel()
            drain.cancel()
            raise
    return futures


def _forget(lookup: dict[str, int], message_id: str, tag: int, *_: object) -> None:
    """Drop a settled publish's return lookup, unless a later publish reused its id."""
    if lookup.get(message_id) == tag:
        del lookup[message_id]


def _all_done(futures: list[asyncio.Future[Any]]) -> asyncio.Future[None]:
    """A future that is done once all of `futures` are: one plain callback each (gather's
    bookkeeping cost 6% of a batched publish's instructions)."""
    done: asyncio.Future[None] = futures[0].get_loop().create_future()
    left = [len(futures)]

    def settled(_: object) -> None:
        left[0] -= 1
        if not left[0] and not done.done():
            done.set_result(None)

    for future in futures:
        future.add_done_callback(settled)
    return done
