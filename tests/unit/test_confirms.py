"""`Confirms` without a broker: on a stand-in for aiormq's channel whose write queue nobody reads,
a confirm comes only when the test sends it, so deadlines and closes can be provoked at will."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pytest
from pamqp.commands import Basic

from rabbitq._errors import NotConfirmed
from rabbitq._pipeline import Confirms, Pipeline
from rabbitq._publish import _send_error
from rabbitq._wire import Outgoing


class FakeChannel:
    """What `write_pipelined` and `Confirms` use of aiormq's Channel, and nothing else."""

    number, max_content_size, publisher_confirms = 1, 131_064, True

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.delivery_tag = 0
        self.confirmations: dict[int, asyncio.Future[Any]] = {}
        self.message_id_delivery_tag: dict[str, int] = {}
        self.write_queue: asyncio.Queue[Any] = asyncio.Queue()
        self._closing = self.loop.create_future()
        self._lock = asyncio.Lock()

    @property
    def closing(self) -> asyncio.Future[Any]:
        return self._closing

    @property
    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        async with self._lock:
            yield

    def create_future(self) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        self.loop.call_soon(future.set_result, None)  # a drain future: the write is taken
        return future

    def ack(self, tag: int) -> None:
        self.confirmations.pop(tag).set_result(Basic.Ack(delivery_tag=tag))


def _out(n: int) -> Outgoing:
    return Outgoing("ns.tasks", "w", b"{}", f"m-{n}", {})


def _confirms(confirm_timeout: float = 30.0) -> tuple[FakeChannel, Confirms]:
    channel = FakeChannel()
    return channel, Confirms(channel, confirm_timeout)  # type: ignore[arg-type]  # a stand-in


async def _written(channel: FakeChannel, tags: int) -> None:
    await asyncio.sleep(0)  # one loop turn: a publish writes before it first waits
    assert channel.delivery_tag == tags


async def test_a_confirmed_publish_returns_the_ack_and_is_forgotten() -> None:
    channel, confirms = _confirms()
    publishing = asyncio.create_task(confirms.publish(_out(1)))
    await _written(channel, 1)
    channel.ack(1)
    assert isinstance(await publishing, Basic.Ack)
    assert channel.write_queue.qsize() == 1 and not channel.message_id_delivery_tag
    second = asyncio.create_task(confirms.publish(_out(2)))
    await _written(channel, 2)
    assert len(confirms.pending) == 1  # the settled one was dropped
    channel.ack(2)
    await second


async def test_no_confirm_in_time_is_a_timeout_with_one_timer_for_all() -> None:
    channel, confirms = _confirms(confirm_timeout=0.05)
    publishing = [asyncio.create_task(confirms.publish(_out(n))) for n in range(3)]
    await _written(channel, 3)
    channel.ack(2)  # the middle one is confirmed, the others time out
    results = await asyncio.gather(*publishing, return_exceptions=True)
    assert [type(r) for r in results] == [TimeoutError, Basic.Ack, TimeoutError]
    assert not confirms.pending and confirms.timer is None
    error = _send_error(_out(0), TimeoutError(), "amqp://u:secret@h/", 0.05)
    assert isinstance(error, NotConfirmed) and "no confirm within 0.05s" in str(error)


async def test_a_closed_channel_fails_what_is_in_flight_at_once() -> None:
    channel, confirms = _confirms()
    publishing = asyncio.create_task(confirms.publish(_out(1)))
    await _written(channel, 1)
    channel.closing.set_exception(aiormq.exceptions.ChannelNotFoundEntity("no exchange"))
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await publishing
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):  # nothing more is written
        await confirms.publish(_out(2))
    assert channel.write_queue.qsize() == 1


async def test_a_cancelled_caller_is_cancelled_not_timed_out() -> None:
    channel, confirms = _confirms()
    publishing = asyncio.create_task(confirms.publish(_out(1)))
    await _written(channel, 1)
    publishing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await publishing
    assert channel.confirmations[1].cancelled()  # aiormq ignores the confirm that follows


async def test_a_batch_past_its_deadline_is_not_confirmed_per_message() -> None:
    channel, confirms = _confirms(confirm_timeout=0.05)
    batch = [_out(n) for n in range(3)]
    settled: list[tuple[str, str]] = []

    def count(out: Outgoing, error: Any, seconds: float) -> None:
        settled.append((out.message_id, type(error).__name__))

    def error_of(out: Outgoing, exc: BaseException) -> Any:
        return _send_error(out, exc, "amqp://h/", 0.05)

    running = asyncio.create_task(Pipeline(confirms, batch, error_of, count).run())
    await _written(channel, 3)
    channel.ack(2)  # tags count from 1
    errors = await running
    assert [type(e).__name__ for e in errors] == ["NotConfirmed", "NoneType", "NotConfirmed"]
    assert "no confirm within" in str(errors[0])
    await asyncio.sleep(0)  # the done callbacks run on the next loop turn
    assert sorted(settled) == [
        ("m-0", "NotConfirmed"),
        ("m-1", "NoneType"),
        ("m-2", "NotConfirmed"),
    ]
