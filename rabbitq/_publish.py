"""Confirmed, mandatory publishing: a publish succeeds only once the broker has confirmed it.

Every publish goes out persistent and `mandatory` on a channel with publisher confirms; a
message the broker returns (no queue bound) raises `Unroutable`, a nack or a confirm that does
not come in time raises `NotConfirmed` (the outcome is then unknown: publishing again may
duplicate, which at-least-once delivery allows). Batches pipeline their confirms, and are
written a chunk at a time rather than a `basic_publish` per message (`_pipeline.py`). The
publisher opens its own connection, never the consumer's, and reopens it lazily after a loss;
it never replays a publish on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence

import aiormq
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractConnection
from pamqp.commands import Basic

from rabbitq._connection import connect, is_open, mask_url
from rabbitq._errors import (
    ConnectionFailed,
    NotConfirmed,
    PublishError,
    RabbitqError,
    SendError,
    Unroutable,
)
from rabbitq._metrics import PublishMetrics
from rabbitq._pipeline import Pipeline, can_pipeline
from rabbitq._wire import Outgoing

logger = logging.getLogger("rabbitq.publish")

CONFIRM_TIMEOUT_SECONDS = 30.0


class Publisher:
    """Publishes with confirms over a connection of its own.

    Args:
        url: the broker URL (credentials are never logged).
        name: shown in the broker's connection list.
        confirm_timeout: seconds to wait for a confirm before raising `NotConfirmed`.
        metrics: where publishes and confirm latency are counted, if anywhere.
    """

    def __init__(
        self,
        url: str,
        name: str = "publisher",
        confirm_timeout: float = CONFIRM_TIMEOUT_SECONDS,
        metrics: PublishMetrics | None = None,
    ) -> None:
        self.url = url
        self.name = name
        self.confirm_timeout = confirm_timeout
        self.metrics = metrics
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        # aiormq's channel under aio-pika's: publishing there skips building an aio-pika
        # Message per publish (a measurable share of a batch's CPU)
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Connect now rather than at the first publish (to fail fast)."""
        await self._ready()

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._underlay = None
        if connection is not None and not connection.is_closed:
            await connection.close()

    @property
    def is_connected(self) -> bool:
        return (
            self._channel is not None
            and not self._channel.is_closed
            and self._connection is not None
            and is_open(self._connection)
        )

    async def _ready(self) -> aiormq.abc.AbstractChannel:
        if self._underlay is not None and self.is_connected:
            return self._underlay
        async with self._lock:
            if self._underlay is not None and self.is_connected:
                return self._underlay
            if self._connection is None or not is_open(self._connection):
                # not left to aio-pika's __del__ (it warns); one the broker dropped closes at once
                await self.close()
                self._connection = await connect(self.url, self.name)
            try:
                self._channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                self._underlay = await self._channel.get_underlay_channel()
            except Exception as exc:  # the connection died between the check and the call
                await self.close()
                raise ConnectionFailed(mask_url(self.url), f"{type(exc).__name__}: {exc}") from None
            return self._underlay

    async def send(self, out: Outgoing) -> None:
        """Publish one message and wait for its confirm.

        Raises:
            Unroutable: the broker returned it, or the exchange does not exist.
            NotConfirmed: nacked, no confirm in time, or the connection dropped meanwhile.
            ConnectionFailed: the broker cannot be reached.
        """
        if self.metrics is None:
            await self._send(out)
            return
        started = time.monotonic()
        try:
            await self._send(out)
        except BaseException as exc:
            self._count(out, exc, 0.0)
            raise
        self._count(out, None, time.monotonic() - started)

    def _count(self, out: Outgoing, error: BaseException | None, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.count(out.kind, error, seconds)

    async def _send(self, out: Outgoing) -> None:
        try:
            channel = await self._ready()
            confirm = await channel.basic_publish(
                out.body,
                exchange=out.exchange,
                routing_key=out.routing_key,
                properties=out.amqp_properties(),
                mandatory=True,
                timeout=self.confirm_timeout,
            )
        except RabbitqError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # returned, nacked, timed out, closed under the publish
            raise self._error(out, exc) from None
        if not isinstance(confirm, Basic.Ack):
            raise NotConfirmed(out.message_id, "the broker nacked it", nacked=True)

    async def send_many(self, messages: Iterable[Outgoing]) -> list[SendError | None]:
        """Publish all, confirms pipelined; the error of each message, or None if confirmed.

        Each message is published persistent and mandatory, and counts as sent only once the
        broker confirmed it; a return, a nack, a closed channel or no confirm within
        `confirm_timeout` is that message's error. The batch goes out in chunks of
        `PIPELINE_CHUNK` marshalled messages, each one write (see `pipeline.py`).
        """
        batch = list(messages)
        if not batch:
            return []
        try:
            channel = await self._ready()
        except ConnectionFailed as exc:
            for out in batch:
                self._count(out, exc, 0.0)
            return [ConnectionFailed(exc.url, exc.reason) for _ in batch]
        if not can_pipeline(channel):
            return await self._send_each(batch)  # `send` counts each message
        counted = None if self.metrics is None else self._count
        return await Pipeline(channel, batch, self.confirm_timeout, self._error, counted).run()

    def _error(self, out: Outgoing, exc: BaseException) -> SendError:
        return _send_error(out, exc, self.url, self.confirm_timeout)

    async def _send_each(self, batch: list[Outgoing]) -> list[SendError | None]:
        """One `send` per message, confirms pipelined: for a channel that `write_pipelined`
        cannot use."""
        results = await asyncio.gather(*(self.send(m) for m in batch), return_exceptions=True)
        out: list[SendError | None] = []
        for result in results:
            if isinstance(result, PublishError | ConnectionFailed) or result is None:
                out.append(result)
            elif isinstance(result, BaseException):
                raise result
        return out


def _send_error(out: Outgoing, exc: BaseException, url: str, timeout: float) -> SendError:
    """What a failed publish means to its caller."""
    if isinstance(exc, PublishError | ConnectionFailed):
        return exc
    if isinstance(exc, aiormq.exceptions.PublishError | aiormq.exceptions.ChannelNotFoundEntity):
        # returned, or the exchange does not exist (the broker closes the channel)
        return Unroutable(out.message_id, out.exchange, out.routing_key)
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return NotConfirmed(out.message_id, "the broker nacked it", nacked=True)
    if isinstance(exc, TimeoutError):
        return NotConfirmed(out.message_id, f"no confirm within {timeout}s; outcome unknown")
    # the channel or connection closed under the publish, or AMQP cannot encode the message
    return NotConfirmed(out.message_id, f"{type(exc).__name__} while publishing to {mask_url(url)}")


def raise_first(messages: Sequence[Outgoing], errors: Sequence[SendError | None]) -> None:
    """Raise the first error of a batch, saying how many others failed."""
    failed = [(m, e) for m, e in zip(messages, errors, strict=True) if e is not None]
    if not failed:
        return
    first = failed[0][1]
    assert first is not None
    if len(failed) > 1:
        first.add_note(f"{len(failed) - 1} more of the {len(messages)} messages failed too")
    raise first
