"""FastStream and Dramatiq as a user would pick them instead of rabbitq, behind the runner's
side interface (see `systems.RawSide`): publishing with each one's own API, consumers in
`faststream_worker.py` and `dramatiq_worker.py`, each configured for concurrency 64.

Each peer works in its own queues, `NS.faststream.*` and `NS.dramatiq.*` (with Dramatiq's own
`.DQ` and `.XQ` beside each), declared by the peer itself as it declares them by default, and
filled with tasks in its own wire format: the ~100-byte body of `wire.body` as FastStream
serializes a pydantic model, and as the keyword arguments of a Dramatiq message. Set-up and
filling are never timed; connections are opened before the clock starts.

Dramatiq's client is blocking (pika), so its calls run on threads, never on the runner's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from importlib.metadata import version
from typing import Any

import aio_pika
import dramatiq
import pika.exceptions  # type: ignore[import-untyped]  # no stubs
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import dq_name, xq_name

from benchmarks import broker
from benchmarks.dramatiq_worker import declare_actor, sender
from benchmarks.dramatiq_worker import new_broker as new_dramatiq_broker
from benchmarks.faststream_worker import Job, queue
from benchmarks.faststream_worker import new_broker as new_faststream_broker
from benchmarks.pacing import paced
from benchmarks.procs import Disturbed, Worker
from benchmarks.systems import RunContext
from benchmarks.wire import PERSISTENT, body, pad_for

MEASURES = frozenset({"publish_one", "publish_concurrent", "drain", "latency"})
# The queues of a peer, by role; every drain capacity shares one queue (purged between runs).
ROLES = ("publish", "drain", "latency")
# Dramatiq's paced publisher: a blocking send per thread at a time, so the latency run keeps
# this many in flight (as a threaded web app calling `actor.send` would).
PACED_THREADS = 8


def _role(workload: str) -> str:
    return workload if workload in ("publish", "latency") else "drain"


def _queue_name(ctx: RunContext, system: str, role: str) -> str:
    return f"{ctx.namespace}.{system}.{role}"


def _fields(task_id: int, sent_at: float = 0.0) -> dict[str, Any]:
    """The task's fields: what `wire.body` encodes."""
    return {"id": task_id, "sent_at": sent_at, "pad": pad_for(task_id, sent_at)}


def _worker_args(
    ctx: RunContext,
    mode: str,
    queue_name: str,
    capacity: int,
    expect: int,
    idle: float,
    rss_at: tuple[int, ...],
) -> list[str]:
    return [
        *("--mode", mode, "--url", ctx.url, "--loop", ctx.loop),
        *("--expect", str(expect), "--idle", str(idle), "--rss-at", ",".join(map(str, rss_at))),
        *("--queue", queue_name, "--prefetch", str(capacity)),
    ]


async def _concurrently(send: Callable[[int], Awaitable[Any]], n: int, publishers: int) -> float:
    """Seconds for `publishers` coroutines to `await send(i)` for i in 0..n-1 between them."""

    async def one(first: int) -> None:
        for i in range(first, n, publishers):
            await send(i)

    started = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(publishers)))
    return time.perf_counter() - started


async def _delete_queues(url: str, names: list[str]) -> None:
    """Delete the queues (a missing one is no error); says on stderr what could not go."""
    for failure in await broker.delete_everything(url, names, []):
        print(f"could not delete {failure}", file=sys.stderr, flush=True)


class FastStreamSide:
    """FastStream's `RabbitBroker`: `broker.publish` of a pydantic model, a subscriber with a
    prefetch of the concurrency (`faststream_worker.py`)."""

    name = "faststream"
    title = f"FastStream {version('faststream')}"
    measures = MEASURES

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def work_queue(self, workload: str) -> str:
        return _queue_name(self.ctx, self.name, _role(workload))

    def queues(self, workload: str) -> list[str]:
        return [self.work_queue(workload)]

    def _all_queues(self) -> list[str]:
        return [self.work_queue(role) for role in ROLES]

    async def set_up(self) -> None:
        async with new_faststream_broker(self.ctx.url) as fs:
            for name in self._all_queues():
                await fs.declare_queue(queue(name))

    async def tear_down(self) -> None:
        await _delete_queues(self.ctx.url, self._all_queues())

    async def _publish(self, fs: Any, job: Job, queue_name: str) -> None:
        # FastStream publishes transient messages unless asked: the comparison is of tasks
        # that survive a broker restart, as everything else in it publishes them.
        await fs.publish(job, queue=queue_name, persist=True)

    async def fill(self, workload: str, count: int) -> None:
        queue_name = self.work_queue(workload)
        window = asyncio.Semaphore(broker.FILL_WINDOW)
        async with new_faststream_broker(self.ctx.url) as fs:

            async def one(i: int) -> None:
                async with window:
                    await self._publish(fs, Job.model_validate_json(body(i)), queue_name)

            await asyncio.gather(*(one(i) for i in range(count)))

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
        queue_name = self.work_queue(workload)
        args = _worker_args(self.ctx, mode, queue_name, capacity, expect, idle, rss_at)
        return Worker(
            "benchmarks.faststream_worker", args, label or f"faststream {mode} {workload}"
        )

    async def publish_one_at_a_time(self, n: int) -> float:
        queue_name = self.work_queue("publish")
        jobs = [Job(**_fields(i)) for i in range(n)]
        async with new_faststream_broker(self.ctx.url) as fs:
            started = time.perf_counter()
            for job in jobs:
                await self._publish(fs, job, queue_name)
            return time.perf_counter() - started

    async def publish_concurrent(self, n: int, publishers: int) -> float:
        """`publishers` coroutines sharing one broker (its one publishing channel)."""
        queue_name = self.work_queue("publish")
        jobs = [Job(**_fields(i)) for i in range(n)]
        async with new_faststream_broker(self.ctx.url) as fs:
            return await _concurrently(
                lambda i: self._publish(fs, jobs[i], queue_name), n, publishers
            )

    async def publish_paced(self, workload: str, rate: float, count: int) -> float:
        queue_name = self.work_queue(workload)
        async with new_faststream_broker(self.ctx.url) as fs:

            async def send(i: int) -> None:
                await self._publish(fs, Job(**_fields(i, time.time())), queue_name)

            return await paced(send, rate, count)


@contextlib.contextmanager
def _disturbances() -> Iterator[None]:
    """Dramatiq's and pika's connection errors as the runner's `Disturbed` (measure again)."""
    try:
        yield
    except (dramatiq.errors.BrokerError, pika.exceptions.AMQPError) as exc:
        raise Disturbed(f"dramatiq: {type(exc).__name__}: {exc}") from exc


def _on_threads(threads: int, warm: Callable[[], None], work: Callable[[int], None]) -> float:
    """Seconds for `threads` threads to run `work(k)`, each after its own `warm()` and all
    started together once every one is warm. Blocking: call it off the loop."""
    warmed = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            warm()
            warmed.wait()
            work(k)
        except threading.BrokenBarrierError:
            pass  # another thread failed to warm; its error is reported
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)
            warmed.abort()

    pool = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(threads)]
    for thread in pool:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        warmed.wait()
    started = time.perf_counter()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed


class DramatiqSide:
    """Dramatiq's `RabbitmqBroker(confirm_delivery=True)`: `actor.send` of the fields, from
    threads; a `dramatiq.Worker` with a thread per unit of concurrency (`dramatiq_worker.py`)."""

    name = "dramatiq"
    title = f"Dramatiq {version('dramatiq')}"
    measures = MEASURES

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def work_queue(self, workload: str) -> str:
        return _queue_name(self.ctx, self.name, _role(workload))

    def queues(self, workload: str) -> list[str]:
        name = self.work_queue(workload)
        return [name, dq_name(name), xq_name(name)]

    def _all_queues(self) -> list[str]:
        return [q for role in ROLES for q in self.queues(role)]

    def _declare(self) -> None:
        with _disturbances():
            db = new_dramatiq_broker(self.ctx.url)
            try:
                for role in ROLES:
                    # the queue, its .DQ and .XQ, with Dramatiq's arguments
                    db.declare_queue(self.work_queue(role), ensure=True)
            finally:
                db.close()

    async def set_up(self) -> None:
        await asyncio.to_thread(self._declare)

    async def tear_down(self) -> None:
        await _delete_queues(self.ctx.url, self._all_queues())

    def _actor(
        self, workload: str, *, confirm: bool
    ) -> tuple[RabbitmqBroker, dramatiq.Actor[..., None]]:
        db = new_dramatiq_broker(self.ctx.url, confirm_delivery=confirm)
        return db, declare_actor(db, self.work_queue(workload), sender)

    async def fill(self, workload: str, count: int) -> None:
        """Messages built by Dramatiq, published as its `enqueue` does (persistent, to the
        default exchange) but with pipelined confirms; its default middleware adds nothing
        to a message on enqueue."""
        _, actor = self._actor(workload, confirm=False)  # never connects: only builds messages
        bodies = [actor.message(**json.loads(body(i))).encode() for i in range(count)]
        window = asyncio.Semaphore(broker.FILL_WINDOW)
        async with broker.connection(self.ctx.url, "bench filler") as conn:
            channel = await conn.channel(publisher_confirms=True)

            async def one(data: bytes) -> None:
                async with window:
                    message = aio_pika.Message(data, delivery_mode=PERSISTENT)
                    # Not mandatory: aiormq gives a mandatory message an id (to match returns),
                    # which Dramatiq's lack. The queue exists; a lost fill fails the count.
                    await channel.default_exchange.publish(
                        message, routing_key=actor.queue_name, mandatory=False
                    )

            await asyncio.gather(*(one(data) for data in bodies))

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
        queue_name = self.work_queue(workload)
        args = _worker_args(self.ctx, mode, queue_name, capacity, expect, idle, rss_at)
        return Worker("benchmarks.dramatiq_worker", args, label or f"dramatiq {mode} {workload}")

    def _publish_blocking(self, n: int, threads: int) -> float:
        db, actor = self._actor("publish", confirm=True)
        fields = [_fields(i) for i in range(n)]

        def warm() -> None:
            # this thread's connection and confirm channel (Dramatiq keeps one per thread),
            # and the queues, which the first send would declare
            db.declare_queue(actor.queue_name, ensure=True)
            assert db.channel.is_open

        def work(first: int) -> None:
            for i in range(first, n, threads):
                actor.send(**fields[i])

        with _disturbances():
            try:
                return _on_threads(threads, warm, work)
            finally:
                db.close()

    async def publish_one_at_a_time(self, n: int) -> float:
        return await asyncio.to_thread(self._publish_blocking, n, 1)

    async def publish_concurrent(self, n: int, publishers: int) -> float:
        """`publishers` threads, each with its own connection, as Dramatiq gives every thread."""
        return await asyncio.to_thread(self._publish_blocking, n, publishers)

    async def publish_paced(self, workload: str, rate: float, count: int) -> float:
        db, actor = self._actor(workload, confirm=True)
        loop = asyncio.get_running_loop()
        warmed = threading.Barrier(PACED_THREADS)

        def warm() -> None:
            db.declare_queue(actor.queue_name, ensure=True)
            assert db.channel.is_open
            warmed.wait()  # holds this thread, so each of the pool's threads warms once

        with _disturbances(), ThreadPoolExecutor(PACED_THREADS) as pool:
            try:
                await asyncio.gather(
                    *(loop.run_in_executor(pool, warm) for _ in range(PACED_THREADS))
                )

                async def send(i: int) -> None:
                    fields = _fields(i, time.time())
                    await loop.run_in_executor(pool, partial(actor.send, **fields))

                return await paced(send, rate, count)
            finally:
                await loop.run_in_executor(None, db.close)
