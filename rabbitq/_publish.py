"""Confirmed, mandatory publishing: a publish succeeds only once the broker has confirmed it.

Every publish goes out persistent and `mandatory` on a channel with publisher confirms; a
message the broker returns (no queue bound) raises `Unroutable`, a nack or a confirm that does
not come in time raises `NotConfirmed` (the outcome is then unknown: publishing again may
duplicate, which at-least-once delivery allows). Publishes go out as marshalled frames, not
through `basic_publish`, and batches pipeline their confirms (`_pipeline.py`). The
publisher opens its own connection, never the consumer's, and reopens it lazily after a loss;
it never replays a publish on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence

import aiormq
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractConnection
from pamqp.commands import Basic

from rabbitq import _permissions as permissions
from rabbitq._connection import connect, is_open, mask_url
from rabbitq._declare import exists
from rabbitq._errors import (
    ConnectionFailed,
    NotConfirmed,
    PublishError,
    PublishRefused,
    QueueUnavailable,
    SendError,
    Unroutable,
)
from rabbitq._metrics import PublishMetrics
from rabbitq._pipeline import Confirms, Pipeline, can_pipeline
from rabbitq._wire import Outgoing

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
        # aiormq's channel under aio-pika's: no aio-pika Message to build per publish
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._confirms: Confirms | None = None  # None: not connected, or `can_pipeline` said no
        self._lock = asyncio.Lock()
        self._queues_seen: set[str] = set()  # `check_queue`s that existed: asked once each

    async def start(self) -> None:
        """Connect now rather than at the first publish (to fail fast)."""
        await self._ready()

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._underlay = self._confirms = None
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
                self._underlay = underlay = await self._channel.get_underlay_channel()
                self._confirms = (
                    Confirms(underlay, self.confirm_timeout) if can_pipeline(underlay) else None
                )
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
        started = time.monotonic()
        try:
            if out.check_queue is not None and out.check_queue not in self._queues_seen:
                if await self._missing_queues([out]):
                    raise Unroutable(out.message_id, out.exchange, out.routing_key, out.check_queue)
            confirms = self._confirms
            if confirms is None or confirms.channel.is_closed:  # not yet, closed, or no pipelining
                channel = await self._ready()
                if (confirms := self._confirms) is None:
                    confirm = await channel.basic_publish(
                        out.body,
                        exchange=out.exchange,
                        routing_key=out.routing_key,
                        properties=out.amqp_properties(),
                        mandatory=True,
                        timeout=self.confirm_timeout,
                    )
            if confirms is not None:
                confirm = await confirms.publish(out)
            if not isinstance(confirm, Basic.Ack):
                raise NotConfirmed(out.message_id, "the broker nacked it", nacked=True)
        except Exception as exc:  # returned, nacked, timed out, closed under the publish
            error = self._error(out, exc)
            self._count(out, error, 0.0)
            raise error from None
        except BaseException as exc:  # cancelled
            self._count(out, exc, 0.0)
            raise
        self._count(out, None, time.monotonic() - started)

    async def reply(self, out: Outgoing, timeout_seconds: float) -> None:
        """Publish a reply to a caller over direct reply-to and wait for its confirm.

        Not `mandatory`: the broker routes a direct reply-to name past its queues, so a
        mandatory reply comes back as unroutable even when its caller got it (RabbitMQ 3.10);
        one whose caller is gone is confirmed and dropped. Not counted in the publish metrics.

        Raises:
            NotConfirmed: nacked, or no confirm within `timeout_seconds`.
            ConnectionFailed: the broker cannot be reached.
        """
        channel = await self._ready()
        try:
            confirm = await channel.basic_publish(
                out.body,
                exchange=out.exchange,
                routing_key=out.routing_key,
                properties=out.amqp_properties(),
                mandatory=False,
                timeout=timeout_seconds,
            )
        except Exception as exc:
            raise _send_error(out, exc, self.url, timeout_seconds) from None
        if not isinstance(confirm, Basic.Ack):
            raise NotConfirmed(out.message_id, "the broker nacked it", nacked=True)

    async def open_channel(self) -> AbstractChannel:
        """A new channel with confirms on this publisher's connection, connecting if need be:
        a caller's (`_call.py`), whose requests must go out on the channel its replies come to.

        Raises:
            ConnectionFailed: the broker cannot be reached.
        """
        await self._ready()
        try:
            assert self._connection is not None
            return await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        except Exception as exc:  # the connection died under the call
            raise ConnectionFailed(mask_url(self.url), f"{type(exc).__name__}: {exc}") from None

    async def send_on(
        self, channel: aiormq.abc.AbstractChannel, confirms: Confirms | None, out: Outgoing
    ) -> None:
        """`send`, on another channel of this connection (`open_channel`'s), as mandatory and
        confirmed, counted the same way; `confirms` watches that channel when it pipelines."""
        started = time.monotonic()
        try:
            if confirms is not None:
                confirm = await confirms.publish(out)
            else:
                confirm = await channel.basic_publish(
                    out.body,
                    exchange=out.exchange,
                    routing_key=out.routing_key,
                    properties=out.amqp_properties(),
                    mandatory=True,
                    timeout=self.confirm_timeout,
                )
            if not isinstance(confirm, Basic.Ack):
                raise NotConfirmed(out.message_id, "the broker nacked it", nacked=True)
        except Exception as exc:
            error = self._error(out, exc)
            self._count(out, error, 0.0)
            raise error from None
        except BaseException as exc:  # cancelled
            self._count(out, exc, 0.0)
            raise
        self._count(out, None, time.monotonic() - started)

    def _count(self, out: Outgoing, error: BaseException | None, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.count(out.kind, error, seconds)

    async def send_many(self, messages: Iterable[Outgoing]) -> list[SendError | None]:
        """Publish all, confirms pipelined; the error of each message, or None if confirmed.

        Each message is published persistent and mandatory, and counts as sent only once the
        broker confirmed it; a return, a nack, a closed channel or no confirm within
        `confirm_timeout` is that message's error. The batch is written in chunks
        (`_pipeline.py`).
        """
        batch = list(messages)
        if not batch:
            return []
        try:
            await self._ready()
            missing = await self._missing_queues(batch)
        except ConnectionFailed as exc:
            for out in batch:
                self._count(out, exc, 0.0)
            return [ConnectionFailed(exc.url, exc.reason) for _ in batch]
        if missing:  # those go nowhere; the others are sent
            sent = [m for m in batch if m.check_queue not in missing]
            errors = iter(await self.send_many(sent))
            out_errors: list[SendError | None] = []
            for out in batch:
                if out.check_queue in missing:
                    error = Unroutable(
                        out.message_id, out.exchange, out.routing_key, str(out.check_queue)
                    )
                    self._count(out, error, 0.0)
                    out_errors.append(error)
                else:
                    out_errors.append(next(errors))
            return out_errors
        if self._confirms is None:
            return await self._send_each(batch)  # `send` counts each message
        counted = None if self.metrics is None else self._count
        return await Pipeline(self._confirms, batch, self._error, counted).run()

    async def _missing_queues(self, batch: Sequence[Outgoing]) -> set[str]:
        """The `check_queue`s of `batch` that do not exist; one that did is not asked again."""
        wanted = {m.check_queue for m in batch if m.check_queue} - self._queues_seen
        missing: set[str] = set()
        if not wanted:
            return missing
        await self._ready()
        assert self._connection is not None
        for name in sorted(wanted):
            try:
                found = await exists(self._connection, "queue", name)
            except QueueUnavailable:
                found = True  # there, on a node that is down: the ladder holds the task meanwhile
            except Exception as exc:  # the connection dropped under the check
                raise ConnectionFailed(mask_url(self.url), f"{type(exc).__name__}: {exc}") from None
            if found:
                self._queues_seen.add(name)
            else:
                missing.add(name)
        return missing

    def _error(self, out: Outgoing, exc: BaseException) -> SendError:
        return _send_error(out, exc, self.url, self.confirm_timeout)

    async def _send_each(self, batch: list[Outgoing]) -> list[SendError | None]:
        """One `send` per message, confirms pipelined: for a channel that `write_pipelined`
        cannot use."""
        results = await asyncio.gather(*(self.send(m) for m in batch), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, SendError):
                raise result  # cancelled, or a bug
        return results  # type: ignore[return-value]  # `send` returns None or raises a SendError


def _send_error(out: Outgoing, exc: BaseException, url: str, timeout: float) -> SendError:
    """What a failed publish means to its caller."""
    if isinstance(exc, PublishError | ConnectionFailed):
        return exc
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        refused = permissions.refusal(str(exc), "write", "publish to", publish=True)
        if isinstance(refused, PublishRefused):
            return refused
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
    failed = [e for e in errors if e is not None]
    if len(failed) > 1:
        failed[0].add_note(f"{len(failed) - 1} more of the {len(messages)} messages failed too")
    if failed:
        raise failed[0]
