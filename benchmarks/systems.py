"""The systems of every comparison, behind one interface: the raw aio-pika floor, the same
publisher sending rabbitq's message, the hand-tuned aiormq loop, rabbitq, and the peers.

A side knows which measurements it takes part in (`measures`), where a scenario's tasks go,
how to fill its queues, how to start its consumer process for a scenario, and how to publish:
one at a time with a confirm each, from several concurrent publishers, in batches with
pipelined confirms, or paced; and how to call (publish and wait for the result over direct
reply-to), many calls at once. Connections are opened before the clock starts; building each
message is timed (it is part of publishing).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange

import rabbitq
from benchmarks import broker, wire
from benchmarks.names import QUEUE_TYPE_WORKLOADS, RawQueues
from benchmarks.pacing import paced
from benchmarks.procs import Disturbed, Worker
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
    loop: str  # "asyncio" or "uvloop": every consumer process and the runner (`run --loop`)


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


# What a side can take part in (a scenario may hold several).
PUBLISH = frozenset({"publish_one", "publish_concurrent", "publish_batch"})
CONSUME = frozenset({"drain", "latency"})
# queue_types: batch publish and drain on rabbitq's classic and quorum work queues.
EVERYTHING = PUBLISH | CONSUME | {"retry", "tiers", "scale", "queue_types", "calls"}
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
# a call that has no answer in this time is lost, not slow: the measurement is repeated
CALLS_TIMEOUT_SECONDS = 120.0
# delayed against immediate tasks (`benchmarks.delays`): rabbitq's own, no baseline has delays
DELAYS = "delays"
# traces off and on (`benchmarks/tracing.py`): rabbitq alone, like the delays
TRACING = "tracing"


async def _concurrently(send: Any, n: int, publishers: int) -> float:
    """Seconds for `publishers` coroutines to call `await send(i)` for i in 0..n-1 between them."""

    async def one(first: int) -> None:
        for i in range(first, n, publishers):
            await send(i)

    started = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(publishers)))
    return time.perf_counter() - started


async def _call_all(call: Any, count: int, warmup: int) -> tuple[list[float], float]:
    """`warmup` calls at once (untimed: the caller's channel opens, the consumer warms up), then
    `count` at once: each call's seconds, and the seconds for all `count`. `call(i)` must return
    task i's result, 2 * i."""

    async def timed(i: int) -> float:
        started = time.perf_counter()
        result = await call(i)
        if result != 2 * i:
            raise Disturbed(f"call {i} returned {result!r}, not {2 * i}")
        return time.perf_counter() - started

    async def rounds() -> tuple[list[float], float]:
        await asyncio.gather(*(timed(i) for i in range(warmup)))
        started = time.perf_counter()
        latencies = await asyncio.gather(*(timed(i) for i in range(warmup, warmup + count)))
        return list(latencies), time.perf_counter() - started

    return await asyncio.wait_for(rounds(), CALLS_TIMEOUT_SECONDS)


class RawSide:
    """The minimal aio-pika programs, written in this folder."""

    name = "raw"
    title = "raw (aio-pika)"
    measures = EVERYTHING
    worker_module = "benchmarks.raw_worker"

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        raw = ctx.raw
        self._queues = {
            "publish": raw.publish.name,
            "latency": raw.latency.name,
            "retry": raw.retry.name,
            "tiers": raw.tiers.name,
            "scale": raw.scale.name,
            "calls": raw.calls.name,
            # queue_types: the very queues rabbitq uses (see `benchmarks.names`), so that the
            # ratio is the client's alone whatever the queue type costs the broker
            **{w: ctx.topology.workload(w).work_queue for w in QUEUE_TYPE_WORKLOADS},
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
        args = _worker_common(mode, self.ctx.url, self.ctx.loop, expect, idle, rss_at)
        args += ["--queue", self.work_queue(workload), "--prefetch", str(capacity)]
        if workload in self._delay:
            args += ["--delay-queue", self._delay[workload]]
        return Worker(self.worker_module, args, label or f"{self.name} {mode} {workload}")

    async def set_up(self) -> None:
        """The raw queues are declared by the runner with rabbitq's topology (`broker.set_up`)."""

    async def tear_down(self) -> None:
        """Deleted by the runner with the namespace."""

    async def fill(self, workload: str, count: int) -> None:
        await broker.fill(self.ctx.url, self.target(workload), workload, count)

    async def _exchange(self, conn: aio_pika.abc.AbstractConnection) -> AbstractExchange:
        channel = await conn.channel(publisher_confirms=True)
        return channel.default_exchange

    async def publish_concurrent(self, n: int, publishers: int) -> float:
        """Seconds for `publishers` concurrent one-at-a-time publishers on one channel."""
        queue = self.work_queue("publish")
        bodies = [body(i) for i in range(n)]
        async with broker.connection(self.ctx.url, "bench raw publisher") as conn:
            exchange = await self._exchange(conn)

            async def send(i: int) -> None:
                message = aio_pika.Message(bodies[i], delivery_mode=PERSISTENT)
                await exchange.publish(message, routing_key=queue)

            return await _concurrently(send, n, publishers)

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

    async def publish_batches(self, n: int, batch: int, workload: str = "publish") -> float:
        """Seconds to publish n tasks in batches, each batch's confirms pipelined."""
        queue = self.work_queue(workload)
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

    async def call_concurrently(self, count: int, warmup: int) -> tuple[list[float], float]:
        """Direct reply-to by hand: one confirm channel consumes `amq.rabbitmq.reply-to`
        (no-ack) and publishes the requests; a future per correlation id."""
        queue = self.work_queue("calls")
        bodies = [body(i) for i in range(warmup + count)]
        async with broker.connection(self.ctx.url, "bench raw caller") as conn:
            channel = await conn.channel(publisher_confirms=True)
            waiting: dict[str, asyncio.Future[bytes]] = {}

            async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                future = waiting.pop(message.correlation_id or "", None)
                if future is not None and not future.done():
                    future.set_result(message.body)

            replies = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
            await replies.consume(on_reply, no_ack=True)
            loop = asyncio.get_running_loop()

            async def call(i: int) -> Any:
                correlation_id = uuid.uuid4().hex
                waiting[correlation_id] = future = loop.create_future()
                request = aio_pika.Message(
                    bodies[i],
                    delivery_mode=PERSISTENT,
                    correlation_id=correlation_id,
                    reply_to=DIRECT_REPLY_TO,
                )
                await channel.default_exchange.publish(request, routing_key=queue)
                return json.loads(await future)

            return await _call_all(call, count, warmup)


class RabbitqSide:
    """rabbitq through its public API: `Task.publish`, `App.publish_many`, `Consumer`."""

    name = "rabbitq"
    title = "rabbitq"
    measures = EVERYTHING | {DELAYS, TRACING}

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

    async def set_up(self) -> None:
        """The topology is declared by the runner (`broker.set_up`)."""

    async def tear_down(self) -> None:
        """Deleted by the runner with the namespace."""

    async def fill(self, workload: str, count: int) -> None:
        await broker.fill(self.ctx.url, self.target(workload), workload, count)

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
        args = _worker_common(mode, self.ctx.url, self.ctx.loop, expect, idle, rss_at)
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

    async def publish_concurrent(self, n: int, publishers: int) -> float:
        app, tasks = self._app()
        task = tasks["publish"]
        payloads = [Job.make(i) for i in range(n)]
        async with app:

            async def send(i: int) -> None:
                await task.publish(payloads[i])

            return await _concurrently(send, n, publishers)

    async def publish_batches(self, n: int, batch: int, workload: str = "publish") -> float:
        app, tasks = self._app()
        task = tasks[workload]
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

    async def call_concurrently(self, count: int, warmup: int) -> tuple[list[float], float]:
        """`await task.call(model)`, many at once, from one app."""
        app, tasks = self._app()
        task = tasks["calls"]
        payloads = [Job.make(i) for i in range(warmup + count)]
        async with app:

            async def call(i: int) -> Any:
                return await task.call(payloads[i], timeout=CALLS_TIMEOUT_SECONDS)

            return await _call_all(call, count, warmup)

    async def publish_with_delays(
        self, workload: str, delays: list[float | None], batch: int | None
    ) -> float:
        """Seconds to publish one task per delay (None: run now; else seconds from now), with
        `publish_many` in batches of `batch`, or one at a time with `publish` if None.

        An immediate task is published without the option, exactly as `publish_batches` does.
        """
        app, tasks = self._app()
        task = tasks[workload]
        payloads = [Job.make(i) for i in range(len(delays))]

        def message(i: int) -> Any:
            delay = delays[i]
            return (
                task.message(payloads[i])
                if delay is None
                else task.message(payloads[i], delay=delay)
            )

        async with app:
            started = time.perf_counter()
            if batch is None:
                for i, delay in enumerate(delays):
                    if delay is None:
                        await task.publish(payloads[i])
                    else:
                        await task.publish(payloads[i], delay=delay)
            else:
                for start in range(0, len(delays), batch):
                    end = min(start + batch, len(delays))
                    await app.publish_many([message(i) for i in range(start, end)])
            return time.perf_counter() - started


class RawTaskMessageSide(RawSide):
    """The raw aio-pika publisher sending rabbitq's message: its properties and headers,
    `mandatory`, through the task exchange into rabbitq's work queue. What rabbitq's publish
    adds over this is rabbitq's own code; what this adds over `raw` is the message."""

    name = "raw-task-message"
    title = "raw-task-message (aio-pika, rabbitq's message)"
    measures = PUBLISH

    def work_queue(self, workload: str) -> str:
        return self.ctx.topology.workload(workload).work_queue

    def queues(self, workload: str) -> list[str]:
        return [self.work_queue(workload)]

    def target(self, workload: str) -> tuple[str, str]:
        spec = self.ctx.topology.workload(workload)
        return spec.task_exchange, spec.routing_key

    async def _sender(
        self, conn: aio_pika.abc.AbstractConnection, workload: str = "publish"
    ) -> Any:
        exchange_name, routing_key = self.target(workload)
        channel = await conn.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name, ensure=False)
        props = wire.task_properties(workload)
        del props["message_id"], props["timestamp"]

        async def send(data: bytes) -> None:
            # a fresh id and timestamp per message, as rabbitq writes them
            message = aio_pika.Message(
                data, message_id=uuid.uuid4().hex, timestamp=int(time.time()), **props
            )
            await exchange.publish(message, routing_key=routing_key, mandatory=True)

        return send

    async def publish_one_at_a_time(self, n: int) -> float:
        bodies = [body(i) for i in range(n)]
        async with broker.connection(self.ctx.url, "bench raw publisher") as conn:
            send = await self._sender(conn)
            started = time.perf_counter()
            for data in bodies:
                await send(data)
            return time.perf_counter() - started

    async def publish_concurrent(self, n: int, publishers: int) -> float:
        bodies = [body(i) for i in range(n)]
        async with broker.connection(self.ctx.url, "bench raw publisher") as conn:
            send = await self._sender(conn)
            return await _concurrently(lambda i: send(bodies[i]), n, publishers)

    async def publish_batches(self, n: int, batch: int, workload: str = "publish") -> float:
        bodies = [body(i) for i in range(n)]
        async with broker.connection(self.ctx.url, "bench raw publisher") as conn:
            send = await self._sender(conn, workload)
            started = time.perf_counter()
            for start in range(0, n, batch):
                await asyncio.gather(*(send(data) for data in bodies[start : start + batch]))
            return time.perf_counter() - started


class AiormqSide(RawSide):
    """The hand-tuned ceiling: a plain aiormq loop with one multiple-ack per 16 deliveries
    (`aiormq_worker.py`), consuming the raw queues. It publishes nothing of its own."""

    name = "aiormq"
    title = "aiormq (hand-tuned, ack per 16)"
    measures = CONSUME
    worker_module = "benchmarks.aiormq_worker"


Side = Any  # RawSide, RawTaskMessageSide, AiormqSide, RabbitqSide, or a peer (benchmarks.peers)


def all_sides(ctx: RunContext) -> list[Side]:
    """Every system in the order each scenario measures them; peers only where installed
    (`pip install -e '.[bench]'`)."""
    sides: list[Side] = [RawSide(ctx), RawTaskMessageSide(ctx), AiormqSide(ctx), RabbitqSide(ctx)]
    try:
        from benchmarks.peers import DramatiqSide, FastStreamSide  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return sides
    return [*sides, FastStreamSide(ctx), DramatiqSide(ctx)]
