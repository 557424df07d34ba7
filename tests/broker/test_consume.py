"""The consumer against the real broker: outcomes of a delivery."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from rabbitq import App
from tests.helpers import queue_depth, running_consumer, wait_until


class Item(BaseModel):
    n: int


async def test_success_path_runs_the_handler_and_acks(make_topology, connection, url, namespace):
    """A published task runs once with its payload and leaves no message behind."""
    topology = await make_topology(jobs={"capacity": 4})
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    seen: list[int] = []
    done = asyncio.Event()

    @app.task("jobs.record", workload="jobs")
    async def record(item: Item) -> None:
        seen.append(item.n)
        if len(seen) == 3:
            done.set()

    async with running_consumer(app, workload, url) as consumer:
        for n in range(3):
            await record.publish(Item(n=n))
        await asyncio.wait_for(done.wait(), timeout=10)
        await wait_until(lambda: consumer.counts["succeeded"] == 3, what="3 acks")
    assert sorted(seen) == [0, 1, 2]
    assert await queue_depth(connection, workload.work_queue) == 0
    assert await queue_depth(connection, workload.parking_queue) == 0
