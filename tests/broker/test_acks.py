"""Batched acks against the real broker: every delivery acked once, on its own channel, in time."""

from __future__ import annotations

import asyncio
import gc
import random
from collections.abc import Callable
from typing import Any

import aiormq
import aiormq.abc
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

from rabbitq import App, Consumer
from rabbitq._ack import Acker
from tests.helpers import plain_message, queue_depth, running_consumer, wait_until


class Item(BaseModel):
    n: int


async def test_out_of_order_finishes_are_each_acked_once(make_topology, connection, url, namespace):
    """Handlers finishing out of order at capacity 16: all acked, no channel error, none left."""
    topology = await make_topology(jobs={"capacity": 16})
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    runs: list[int] = []
    rng = random.Random(7)

    @app.task("jobs.jitter", workload="jobs")
    async def jitter(item: Item) -> None:
        await asyncio.sleep(rng.random() * 0.01)  # the handler's work, of varying length
        runs.append(item.n)

    async with running_consumer(app, workload, url) as consumer:
        await app.publish_many([jitter.message(Item(n=n)) for n in range(300)])
        await wait_until(lambda: consumer.counts["succeeded"] == 300, what="300 tasks to finish")
        # An ack naming an unknown or already-acked tag would have closed the channel.
        assert consumer.reconnects == 0
    # Stopped: anything left unacked would be back in the queue now.
    assert await queue_depth(connection, workload.work_queue) == 0
    assert sorted(runs) == list(range(300))


async def test_a_long_task_does_not_hold_back_the_acks_of_later_ones(
    make_topology, connection, url, namespace
):
    """With the lowest delivery still running, later finished ones are acked and more arrive."""
    topology = await make_topology(jobs={"capacity": 8})
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    release = asyncio.Event()
    quick_done: list[int] = []

    @app.task("jobs.long", workload="jobs")
    async def long(item: Item) -> None:
        await release.wait()

    @app.task("jobs.quick", workload="jobs")
    async def quick(item: Item) -> None:
        quick_done.append(item.n)

    await app.publish_many(
        [long.message(Item(n=0))] + [quick.message(Item(n=n)) for n in range(1, 41)]
    )
    await app.close()
    async with running_consumer(app, workload, url) as consumer:
        # 40 quick tasks through a window of 8 with one slot held: only possible if the
        # finished ones above the running delivery were acked while it still ran.
        await wait_until(lambda: len(quick_done) == 40, what="40 quick tasks to finish")
        assert consumer.running == 1
        release.set()
        await wait_until(lambda: consumer.counts["succeeded"] == 41, what="the long task")
    assert await queue_depth(connection, workload.work_queue) == 0


async def test_graceful_stop_sends_the_acks_still_batched(
    make_topology, connection, url, namespace
):
    """Acks held for batching reach the broker before the consumer closes: nothing redelivered."""
    topology = await make_topology(jobs={"capacity": 64})
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    seen: list[int] = []
    holder: list[Consumer] = []

    @app.task("jobs.record", workload="jobs")
    async def record(item: Item) -> None:
        seen.append(item.n)
        if len(seen) == 10:
            holder[0].stop()  # stop right away, before the ack timer fires

    await app.publish_many([record.message(Item(n=n)) for n in range(10)])
    await app.close()
    async with running_consumer(app, workload, url) as consumer:
        holder.append(consumer)
        # 10 finished tasks are fewer than one batch (64 // 4): their acks are still held
        # when the stop comes.
        await wait_until(lambda: len(seen) == 10, what="10 tasks to run")
    assert await queue_depth(connection, workload.work_queue) == 0


async def _held_delivery(
    connection: AbstractConnection, namespace: str
) -> tuple[aiormq.abc.AbstractChannel, Acker, int, str]:
    """A message taken (unacked) on a channel of its own, with that channel's acker."""
    setup = await connection.channel()
    queue = (await setup.declare_queue(f"{namespace}.held", exclusive=True)).name
    await setup.default_exchange.publish(plain_message(b"held"), routing_key=queue)
    await setup.close()
    channel = await (await connection.channel(publisher_confirms=False)).get_underlay_channel()
    delivery = await channel.basic_get(queue, no_ack=False)
    assert delivery.delivery_tag is not None
    return channel, Acker(channel, prefetch=1), delivery.delivery_tag, queue


def is_dead(acker: Acker) -> Callable[[], bool]:
    return lambda: acker.dead


async def requeued(connection: AbstractConnection, queue: str) -> bool:
    return await queue_depth(connection, queue) == 1


async def test_an_ack_after_the_broker_closed_the_channel_marks_the_acker_dead(
    connection, namespace
):
    """An ack for a channel the broker closed: the acker is dead, no task error goes unseen."""
    unseen: list[dict[str, Any]] = []
    # The loop is this test's own: the handler stays, so a task collected late (after a
    # failure) is recorded here rather than logged while pytest reports.
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: unseen.append(context))
    channel, acker, tag, queue = await _held_delivery(connection, namespace)
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):  # a 404 closes the channel
        await channel.queue_declare(f"{namespace}.missing", passive=True)
    acker.ack(tag)  # aiormq refuses it with ChannelInvalidStateError, a RuntimeError
    await wait_until(is_dead(acker), timeout=5, what="the acker to give up its channel")
    del acker  # with it goes its sender task
    gc.collect()  # a task whose exception nobody retrieved says so when it is collected
    assert unseen == []
    await wait_until(
        lambda: requeued(connection, queue), timeout=5, what="the unacked message to be requeued"
    )


async def test_an_ack_that_fails_on_an_open_channel_closes_the_channel(
    connection, namespace, monkeypatch
):
    """Whatever stops an ack, the acker closes its channel, so the broker requeues the delivery."""
    channel, acker, tag, queue = await _held_delivery(connection, namespace)

    async def broken(*_args: Any, **_kwargs: Any) -> None:
        raise ValueError("the frame could not be written")

    monkeypatch.setattr(channel, "basic_ack", broken)
    acker.ack(tag)
    await wait_until(
        lambda: acker.dead and channel.is_closed, timeout=5, what="the acker to close its channel"
    )
    await wait_until(
        lambda: requeued(connection, queue), timeout=5, what="the unacked message to be requeued"
    )
