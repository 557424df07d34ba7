"""`write_pipelined` reaches into aiormq's Channel: these fail on an aiormq release that changes
what it relies on, before a user's batches silently fall back to one-by-one publishing.
pyproject's aiormq pin follows them."""

from __future__ import annotations

import aiormq
import pytest
from aio_pika.abc import AbstractConnection
from pamqp.commands import Basic

from rabbitq._pipeline import can_pipeline, write_pipelined
from rabbitq._wire import Outgoing, frames
from tests.helpers import wait_until


async def _confirm_channel(connection: AbstractConnection) -> aiormq.Channel:
    channel = await (
        await connection.channel(publisher_confirms=True, on_return_raises=True)
    ).get_underlay_channel()
    assert isinstance(channel, aiormq.Channel)
    assert can_pipeline(channel), "aiormq's Channel lacks what write_pipelined uses"
    return channel


async def test_pipelined_publishes_are_confirmed_and_forgotten(
    connection: AbstractConnection, namespace: str
) -> None:
    channel = await _confirm_channel(connection)
    queue = (await channel.queue_declare(f"{namespace}.q", exclusive=True)).queue
    assert queue is not None
    ids = ["m-1", "m-2"]
    payload = b"".join(
        frames(Outgoing("", queue, b"{}", i, {}), channel.number, channel.max_content_size, {})
        for i in ids
    )
    tag = channel.delivery_tag
    futures = await write_pipelined(channel, payload, ids)
    assert [type(await f) for f in futures] == [Basic.Ack, Basic.Ack]
    assert channel.delivery_tag == tag + 2
    await wait_until(
        lambda: not set(ids) & set(channel.message_id_delivery_tag), what="returns forgotten"
    )
    assert (await channel.queue_declare(queue, passive=True)).message_count == 2


async def test_a_pipelined_publish_that_is_returned_fails_its_future(
    connection: AbstractConnection, namespace: str
) -> None:
    channel = await _confirm_channel(connection)
    out = Outgoing("", f"{namespace}.nobody", b"{}", "m-1", {})
    [future] = await write_pipelined(
        channel, frames(out, channel.number, channel.max_content_size, {}), ["m-1"]
    )
    with pytest.raises(aiormq.exceptions.PublishError):
        await future
