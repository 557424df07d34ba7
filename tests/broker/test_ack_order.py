"""Ack order: a failed delivery is acked only after its forward (retry or park) is confirmed.

If the forward cannot be confirmed, the original must stay in the work queue. Acking first
would lose the task; this test catches that order.
"""

from __future__ import annotations

import asyncio

import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

from rabbitq import App, Consumer, TopologyMissing
from rabbitq._consume import MISSING_WAIT_SECONDS
from rabbitq._wire import HEADER_ATTEMPT
from tests.helpers import drain_queue, queue_depth, wait_until


class Item(BaseModel):
    n: int


async def test_failed_task_is_kept_when_neither_retry_nor_park_copy_can_be_confirmed(
    make_topology, connection, url, namespace
):
    """With the retry and parking exchanges gone, the failed task stays in the work queue."""
    topology = await make_topology(
        jobs={"capacity": 1, "retry": {"tiers": ["50ms", "100ms"], "max_attempts": 3}}
    )
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    failures = 0
    failed = asyncio.Event()

    @app.task("jobs.fail", workload="jobs")
    async def fail(item: Item) -> None:
        nonlocal failures
        failures += 1
        failed.set()
        raise RuntimeError("always fails")

    consumer = Consumer(app, workload, url)
    run = asyncio.create_task(consumer.run())
    try:
        ready = asyncio.create_task(consumer.ready.wait())
        await asyncio.wait({run, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            if run.done():
                run.result()  # raises what stopped it
            pytest.fail("the consumer was not ready within 10s")

        channel = await connection.channel()
        await channel.exchange_delete(workload.retry_exchange)
        await channel.exchange_delete(workload.parking_exchange)

        out = fail.message(Item(n=5))
        underlay = await channel.get_underlay_channel()
        await underlay.basic_publish(
            out.body,
            exchange=out.exchange,
            routing_key=out.routing_key,
            properties=out.amqp_properties(),
        )
        await channel.close()

        await asyncio.wait_for(failed.wait(), timeout=10)
        # The forward fails, the delivery is returned, and the reconnects find the topology
        # gone for longer than the consumer waits for it.
        with pytest.raises(TopologyMissing) as missing:
            await asyncio.wait_for(run, timeout=MISSING_WAIT_SECONDS + 15)
    finally:
        if not run.done():
            consumer.stop()
            await asyncio.wait_for(run, timeout=15)
    assert missing.value.name in {workload.retry_exchange, workload.parking_exchange}
    assert failures >= 1
    assert consumer.reconnects >= 1
    assert consumer.counts["retried"] == 0
    assert not any(k.startswith("parked:") for k in consumer.counts)

    await wait_until(
        lambda: _depth_is(connection, workload.work_queue, 1),
        timeout=5,
        what="the failed task back in the work queue",
    )
    kept = await drain_queue(connection, workload.work_queue)
    assert len(kept) == 1
    assert kept[0].body == out.body
    assert kept[0].message_id == out.message_id
    assert (kept[0].headers or {})[HEADER_ATTEMPT] == 1


async def _depth_is(connection: AbstractConnection, name: str, depth: int) -> bool:
    return await queue_depth(connection, name) == depth
