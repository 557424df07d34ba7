"""The two sides of every comparison, behind one interface: the raw aio-pika floor and rabbitq.

A side knows where a scenario's tasks go, how to start its consumer process for a scenario,
and how to publish: one at a time with a confirm each, in batches with pipelined confirms, or
paced. Connections are opened before the clock starts; building each message is timed (it is
part of publishing).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange

import rabbitq
from benchmarks import broker
from benchmarks.names import RawQueues
from benchmarks.pacing import paced
from benchmarks.procs import Worker
from benchmarks.rq_app import Job, build_app
from benchmarks.wire import PERSISTENT, body
from rabbitq._topology import Topology


@dataclass(frozen=True, slots=True)
class RunContext:
    """What every scenario needs to know about this run."""

    url: str
    namespace: str
    topology: Topology
    topology_file: Path
    raw: RawQueues
    raw_loop: str  # "asyncio" or "uvloop", per side: see `run --loop`
    rabbitq_loop: str


def _worker_common(
    mode: str, url: str, loop: str, expect: int, idle: float, rss_at: tuple[int, ...]
) -> list[str]:
    return [
        "--mode",
        mode,
        "--url",
        url,
        "--loop",
        loop,
        "--expect",
        str(expect),
        "--idle",
        str(idle),
        "--rss-at",
        ",".join(map(str, rss_at)),
    ]


class RawSide:
    """The minimal aio-pika programs, written in this folder."""

    name = "raw"

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        raw = ctx.raw
        self._queues = {
            "publish": raw.publish.name,
            "latency": raw.latency.name,
            "retry": raw.retry.name,
            "tiers": raw.tiers.name,
            "scale": raw.scale.name,
        }
        self._delay = {"retry": raw.retry_delay.name, "tiers": raw.tiers_delay.name}

    def work_queue(self, workload: str) -> str:
        # One raw queue serves every drain capacity (it is purged between runs).
        return self._queues.get(workload, self.ctx.raw.drain.name)

    def queues(self, workload: str) -> list[str]:
        extra = self._delay.get(workload)
        return [self.work_queue(workload)] + ([extra] if extra else [])

    def target(self, workload: str) -> tuple[str, str]:
        return "", self.work_queue(workload)

    def worker(
        self,
        mode: str,
        workload: str,
        capacity: int,
        *,
        expect: int = 0,
        idle: float = 1.0,
        rss_at: tuple[int, ...] = (),
        label: str = "",
    ) -> Worker:
        args = _worker_common(mode, self.ctx.url, self.ctx.raw_loop, expect, idle, rss_at)
        args += ["--queue", self.work_queue(workload), "--prefetch", str(capacity)]
        if workload in self._delay:
            args += ["--delay-queue", self._delay[workload]]
        return Worker("benchmarks.raw_worker", args, label or f"raw {mode} {workload}")

    async def _exchange(self, conn: aio_pika.abc.AbstractConnection) -> AbstractExchange:
        channel = await conn.channel(publisher_confirms=True)
        return channel.default_exchange

    async def publish_one_at_a_time(self, n: int) -> float:
        """Seconds to publish n tasks, each waiting for its confirm."""
        queue = self.work_queue("publish")
        bodies = [body(i) for i in range(n)]
        async with broker.connection(self.ctx.url, "bench raw publisher") as conn:
            exchange = await self._exchange(conn)
            started = time.perf_counter()
            for data in bodies:
                await exchange.publish(
                    aio_pika.Message(data, delivery_mode=PERSISTENT), routing_key=queue
                )
            return time.perf_counter() - started

    async def publish_batches(self, n: int, batch: int) -> float:
        """Seconds to publish n tasks in batches, each batch's confirms pipelined."""
        queue = self.work_queue("publish")
        bodies = [body(i) for i in range(n)]
        async with broker.connection(self.ctx.url, "bench raw publisher") as conn:
            exchange = await self._exchange(conn)
            started = time.perf_counter()
            for start in range(0, n, batch):
                await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(data, delivery_mode=PERSISTENT), routing_key=queue
                        )
                        for data in bodies[start : start + batch]
                    )
                )
            return time.perf_counter() - started

    async def publish_paced(self, workload: str, rate: float, count: int) -> float:
        queue = self.work_queue(workload)
        async with broker.connection(self.ctx.url, "bench raw publisher") as conn:
            exchange = await self._exchange(conn)

            async def send(i: int) -> None:
                message = aio_pika.Message(body(i, time.time()), delivery_mode=PERSISTENT)
                await exchange.publish(message, routing_key=queue)

            return await paced(send, rate, count)


class RabbitqSide:
    """rabbitq through its public API: `Task.publish`, `App.publish_many`, `Consumer`."""

    name = "rabbitq"

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def work_queue(self, workload: str) -> str:
        return self.ctx.topology.workload(workload).work_queue

    def queues(self, workload: str) -> list[str]:
        spec = self.ctx.topology.workload(workload)
        return [spec.work_queue, *(t.queue for t in spec.tiers), spec.parking_queue]

    def target(self, workload: str) -> tuple[str, str]:
        spec = self.ctx.topology.workload(workload)
        return spec.task_exchange, spec.routing_key

    def worker(
        self,
        mode: str,
        workload: str,
        capacity: int,
        *,
        expect: int = 0,
        idle: float = 1.0,
        rss_at: tuple[int, ...] = (),
        label: str = "",
    ) -> Worker:
        # capacity is the workload's (see benchmarks.names); the argument keeps one signature
        assert self.ctx.topology.workload(workload).capacity == capacity
        args = _worker_common(mode, self.ctx.url, self.ctx.rabbitq_loop, expect, idle, rss_at)
        args += ["--workload", workload, "--topology", str(self.ctx.topology_file)]
        return Worker("benchmarks.rq_worker", args, label or f"rabbitq {mode} {workload}")

    def _app(self) -> tuple[rabbitq.App, dict[str, rabbitq.Task[Any, Any]]]:
        app, tasks = build_app()
        app.namespace, app.url = self.ctx.namespace, self.ctx.url
        return app, tasks

    async def publish_one_at_a_time(self, n: int) -> float:
        app, tasks = self._app()
        task = tasks["publish"]
        payloads = [Job.make(i) for i in range(n)]
        async with app:  # connects before the clock starts
            started = time.perf_counter()
            for payload in payloads:
                await task.publish(payload)
            return time.perf_counter() - started

    async def publish_batches(self, n: int, batch: int) -> float:
        app, tasks = self._app()
        task = tasks["publish"]
        payloads = [Job.make(i) for i in range(n)]
        async with app:
            started = time.perf_counter()
            for start in range(0, n, batch):
                await app.publish_many([task.message(p) for p in payloads[start : start + batch]])
            return time.perf_counter() - started

    async def publish_paced(self, workload: str, rate: float, count: int) -> float:
        app, tasks = self._app()
        task = tasks[workload]
        async with app:

            async def send(i: int) -> None:
                await task.publish(Job.make(i, time.time()))

            return await paced(send, rate, count)


Side = RawSide | RabbitqSide
