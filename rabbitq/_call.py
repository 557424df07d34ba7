"""Calls: publish a task and wait for its result over RabbitMQ's direct reply-to.

A `Caller` owns one channel, with publisher confirms, on its app's publishing connection. It
consumes the pseudo-queue `amq.rabbitmq.reply-to` in no-ack mode and publishes every request
on that same channel (the broker answers only the channel that published), confirmed and
mandatory as `Task.publish` is; replies are matched to waiting calls by `correlation_id`.

Why the publishing connection and not one of its own: a call is a publish that also reads, so
it belongs where the app's publishes go (inside a consumer, the consumer's publishing
connection, never the consuming one); a process keeps one connection for both, and a channel
error on the caller's channel closes only that channel.

Results are not stored. A caller that is gone (timed out, cancelled, its process exited) never
hears of the task again: the broker drops the reply. When the channel or its connection
closes, every waiting call fails with `CallLost`; the channel is reopened lazily, at the next
call. Nothing is cancelled on the consumer's side: a task that was called runs to its end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiormq
import aiormq.abc
from aio_pika.abc import AbstractChannel

from rabbitq import _reply as reply
from rabbitq import _tracing as tracing
from rabbitq._connection import scrub
from rabbitq._errors import CallLost, CallTimeout
from rabbitq._pipeline import Confirms, can_pipeline
from rabbitq._publish import Publisher
from rabbitq._wire import Outgoing

if TYPE_CHECKING:
    from opentelemetry.trace import Span

logger = logging.getLogger("rabbitq.call")

Reply = tuple[bytes, Mapping[str, Any] | None]


class Caller:
    """Sends calls and routes their replies back, over one channel of `publisher`'s connection.

    It belongs to the event loop it was made on, as its publisher does.
    """

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.loop = asyncio.get_running_loop()
        self._channel: AbstractChannel | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._confirms: Confirms | None = None
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._lock = asyncio.Lock()

    @property
    def waiting(self) -> int:
        """Calls waiting for their reply now."""
        return len(self._waiting)

    async def call(
        self,
        out: Outgoing,
        timeout_seconds: float,
        load: Callable[[bytes], Any],
        span: Span | None = None,
    ) -> Any:
        """Publish `out` as a call and return its result, read by `load`.

        `timeout_seconds` covers the publish and the wait for the reply; `span`, the publish's
        producer span (`_tracing`), ends once the broker confirmed the request.

        Raises:
            TaskFailed: the task was parked.
            CallTimeout: no reply within `timeout_seconds`.
            CallLost: the channel closed while the call waited.
            ReplyInvalid: the reply is not a result of the task's type.
            Unroutable, NotConfirmed, ConnectionFailed: as `Task.publish` (nothing to wait for).
        """
        task = out.task or ""
        correlation_id = os.urandom(16).hex()
        request = dataclasses.replace(
            out, properties={"reply_to": reply.REPLY_TO, "correlation_id": correlation_id}
        )
        waiter: asyncio.Future[Reply] = self.loop.create_future()
        try:
            async with asyncio.timeout(timeout_seconds) as scope:
                channel, confirms = await self._ready()
                # waiting before the publish: the reply can come before the confirm
                self._waiting[correlation_id] = waiter
                await self.publisher.send_on(channel, confirms, request)
                if span is not None:
                    tracing.end(span)
                body, headers = await waiter
        except _Lost as lost:
            raise CallLost(task, out.message_id, lost.detail) from None
        except TimeoutError:
            if not scope.expired():
                raise
            raise CallTimeout(task, out.message_id, timeout_seconds) from None
        finally:
            self._waiting.pop(correlation_id, None)
            if not waiter.done():
                waiter.cancel()
            elif not waiter.cancelled():
                waiter.exception()  # seen: a loss that came while the publish failed anyway
        return reply.result(body, headers, task=task, message_id=out.message_id, load=load)

    async def close(self) -> None:
        """Close the channel; calls still waiting fail with `CallLost`."""
        channel, self._channel, self._underlay, self._confirms = self._channel, None, None, None
        if channel is not None and not channel.is_closed:
            await channel.close()
        self._fail("the caller was closed")

    async def _ready(self) -> tuple[aiormq.abc.AbstractChannel, Confirms | None]:
        underlay = self._underlay
        if underlay is not None and not underlay.is_closed:
            return underlay, self._confirms
        async with self._lock:
            underlay = self._underlay
            if underlay is not None and not underlay.is_closed:
                return underlay, self._confirms
            channel = await self.publisher.open_channel()
            try:
                underlay = await channel.get_underlay_channel()
                # no-ack is what direct reply-to allows: a reply is never redelivered
                await underlay.basic_consume(reply.REPLY_TO, self._on_reply, no_ack=True)
            except BaseException:
                if not channel.is_closed:
                    await channel.close()
                raise
            confirms = (
                Confirms(underlay, self.publisher.confirm_timeout)
                if can_pipeline(underlay)
                else None
            )
            underlay.closing.add_done_callback(functools.partial(self._on_close, underlay))
            self._channel, self._underlay, self._confirms = channel, underlay, confirms
            return underlay, confirms

    async def _on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        props = message.header.properties
        waiter = self._waiting.get(props.correlation_id or "")
        if waiter is None or waiter.done():
            # a call that gave up, or a reply that is not ours: nothing waits for it
            logger.debug("a reply with no call waiting for it was dropped")
            return
        waiter.set_result((message.body, props.headers))

    def _on_close(self, underlay: aiormq.abc.AbstractChannel, closing: asyncio.Future[Any]) -> None:
        if underlay is not self._underlay:
            return  # a channel `close` let go of: its calls have failed already
        self._channel = self._underlay = self._confirms = None
        exc = None if closing.cancelled() else closing.exception()
        detail = f"{type(exc).__name__}: {exc}" if exc is not None else "the channel was closed"
        self._fail(scrub(detail, self.publisher.url))  # what a library said may quote the URL

    def _fail(self, detail: str) -> None:
        for correlation_id, waiter in list(self._waiting.items()):
            if not waiter.done():
                waiter.set_exception(_Lost(detail))
            del self._waiting[correlation_id]


class _Lost(Exception):
    """What a waiting call's future fails with when its channel closes (`call` names the task)."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)
