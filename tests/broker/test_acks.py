"""Batched acks against the real broker: every delivery acked once, on its own channel, in time."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

from rabbitq import App
from rabbitq._ack import Acker
from rabbitq._amqp import ConsumeConnection, Delivery, open_consumer
from rabbitq._topology import Workload
from tests.conftest import broker_url
from tests.helpers import plain_message, queue_depth, running_consumer, wait_until
from tests.ledger import actl


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


async def _recorded(
    make_topology: Any,
    url: str,
    namespace: str,
    spec: dict[str, Any],
    tasks: int,
    gate: Callable[[int], asyncio.Event],
) -> tuple[Workload, App, list[int]]:
    """A workload of `spec` with `tasks` tasks queued; task n notes that it runs, then waits
    for `gate(n)`. The workload, its app and the notes."""
    topology = await make_topology(jobs=spec)
    app = App(namespace=namespace, url=url)
    seen: list[int] = []

    @app.task("jobs.record", workload="jobs")
    async def record(item: Item) -> None:
        seen.append(item.n)
        await gate(item.n).wait()

    await app.publish_many([record.message(Item(n=n)) for n in range(tasks)])
    await app.close()
    return topology.workload("jobs"), app, seen


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_graceful_stop_sends_the_acks_still_batched(
    make_topology, url, namespace, queue_type
):
    """Acks held for batching reach the broker before the consumer closes: nothing redelivered."""
    tasks, release = 10, asyncio.Event()
    spec = {"capacity": 64, "queue_type": queue_type}
    workload, app, seen = await _recorded(
        make_topology, url, namespace, spec, tasks, lambda _: release
    )
    async with running_consumer(app, workload, url) as consumer:
        await wait_until(lambda: len(seen) == tasks, what=f"{tasks} tasks to run")
        # every one finishes in the same moment and the stop comes with them: 10 finished
        # tasks are fewer than one batch (64 // 4), so their acks are still held when it comes
        release.set()
        consumer.stop()
    assert consumer.counts["succeeded"] == tasks, consumer.counts
    # every task is gone from the queue, ready and handed out alike: an ack the channel
    # dropped would leave its task handed out to a consumer that is gone, then back ready
    await wait_until(
        lambda: _messages_in(workload.work_queue, queue_type, 0),
        what="the queue to hold no task at all",
    )


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_stop_right_after_hundreds_of_single_acks_redelivers_nothing(
    make_topology, url, namespace, queue_type
):
    """249 tasks finish above one that still runs, so each is acked in a frame of its own; it
    finishes and the stop comes at once. A quorum queue's client on the broker's channel sends
    at most 32 commands ahead of the leader and a channel that closes drops the ones it still
    holds back (`_parking.QUORUM_ACKS_PER_READ`): none of the 250 may run again. (Not a
    multiple of the 32-ack batch: the last acks are still held when the stop comes.)"""
    tasks, others, first = 250, asyncio.Event(), asyncio.Event()
    spec = {"capacity": tasks, "queue_type": queue_type}
    workload, app, seen = await _recorded(
        make_topology, url, namespace, spec, tasks, lambda n: first if n == 0 else others
    )
    async with running_consumer(app, workload, url) as consumer:
        await wait_until(lambda: len(seen) == tasks, what=f"{tasks} tasks to run")
        others.set()
        await wait_until(lambda: consumer.counts["succeeded"] == tasks - 1, what="all but one done")
        first.set()
        consumer.stop()
    assert consumer.counts["succeeded"] == tasks, consumer.counts
    await wait_until(
        lambda: _messages_in(workload.work_queue, queue_type, 0),
        what="the queue to hold no task at all",
    )


# A quorum queue's `list_queues messages` is its last tick's figure (every 5 s): ask its
# Raft state instead.
_QUORUM_TOTAL = (
    'Q = rabbit_misc:r(<<"/">>, queue, <<"{name}">>), {{ok, A}} = rabbit_amqqueue:lookup(Q), '
    "{{Ra, _}} = amqqueue:get_pid(A), "
    "{{ok, {{_, N}}, _}} = ra:local_query({{Ra, node()}}, fun rabbit_fifo:query_messages_total/1), "
    "N."
)


async def _messages_in(queue: str, queue_type: str, count: int) -> bool:
    """The broker's own count of a queue's tasks, ready and unacked alike: a passive declare
    counts only the ready ones."""
    if queue_type == "quorum":
        return (await actl("eval", _QUORUM_TOTAL.format(name=queue))).strip() == str(count)
    listed = await actl("list_queues", "-q", "--no-table-headers", "name", "messages")
    counts = dict(line.split("\t") for line in listed.splitlines() if "\t" in line)
    return counts.get(queue) == str(count)


async def _held(
    connection: AbstractConnection, namespace: str, count: int
) -> tuple[ConsumeConnection, Acker, list[Delivery], str]:
    """`count` messages delivered (unacked) on a consuming connection, with its acker."""
    setup = await connection.channel()
    queue = (await setup.declare_queue(f"{namespace}.held")).name
    for n in range(count):
        await setup.default_exchange.publish(plain_message(b"%d" % n), routing_key=queue)
    await setup.close()
    held: list[Delivery] = []
    lost: list[str] = []
    consuming = ConsumeConnection(held.append, lost.append)
    await open_consumer(consuming, broker_url(), "test held", queue, prefetch=count)
    await wait_until(lambda: len(held) == count, timeout=5, what="the deliveries")
    return consuming, Acker(consuming, prefetch=count), held, queue


async def requeued(connection: AbstractConnection, queue: str, count: int) -> bool:
    return await queue_depth(connection, queue) == count


async def test_an_ack_the_broker_refuses_closes_the_channel_and_the_acker_is_dead(
    connection, namespace
):
    """The broker closes the channel on an unknown tag: the acker is dead, settle says so,
    and every held delivery is requeued, never acked elsewhere."""
    consuming, acker, held, queue = await _held(connection, namespace, 2)
    try:
        consuming.ack(10_000)  # no such delivery: PRECONDITION_FAILED closes the channel
        await wait_until(lambda: acker.dead, timeout=5, what="the acker to see the close")
        assert acker.settle(held[0]) is False
        await wait_until(
            lambda: requeued(connection, queue, 2), timeout=5, what="both to be requeued"
        )
    finally:
        await consuming.close()
        await (await connection.channel()).queue_delete(queue)


async def test_acks_and_a_nack_written_before_a_close_reach_the_broker(connection, namespace):
    """A multiple-ack and a nack written just before a graceful close: nothing is lost or
    redelivered beyond the nacked one."""
    consuming, acker, held, queue = await _held(connection, namespace, 3)
    try:
        acker.ack(held[0].tag)
        acker.ack(held[1].tag)
        acker.settle(held[2], requeue=True)  # flushes the acks first, then the nack
        await consuming.close()
        await wait_until(
            lambda: requeued(connection, queue, 1), timeout=5, what="only the nacked one back"
        )
    finally:
        await consuming.close()
        await (await connection.channel()).queue_delete(queue)
