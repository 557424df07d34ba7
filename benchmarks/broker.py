"""The runner's side of the broker: set up a run's queues, fill them, empty them, remove them.

Set-up work here is never timed. Every call opens its own short connection, so a broker that
was restarted or a connection that was force-closed by someone else's fault-injection test
costs one failed measurement (which the runner repeats), not the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from benchmarks.names import RawQueue
from benchmarks.wire import body, task_properties
from rabbitq import _declare as declare
from rabbitq._topology import Topology

CONNECT_TIMEOUT_SECONDS = 10.0
# Set-up publishing keeps this many confirms in flight: as fast as the broker syncs, and
# never the thing being measured.
FILL_WINDOW = 1000
UP_POLL_SECONDS = 1.0


@contextlib.asynccontextmanager
async def connection(url: str, name: str = "bench runner") -> AsyncIterator[AbstractConnection]:
    conn = await aio_pika.connect(
        url, timeout=CONNECT_TIMEOUT_SECONDS, client_properties={"connection_name": name}
    )
    try:
        yield conn
    finally:
        if not conn.is_closed:
            await conn.close()


async def wait_until_up(url: str, within_seconds: float) -> bool:
    """Whether the broker accepts a connection within `within_seconds` (polling)."""
    deadline = time.monotonic() + within_seconds
    while True:
        try:
            async with connection(url, "bench probe"):
                return True
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, TimeoutError):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(UP_POLL_SECONDS)


async def server_version(url: str) -> str:
    """RabbitMQ's version, from the server properties of the AMQP handshake."""
    async with connection(url) as conn:
        underlay = conn.transport.connection  # type: ignore[union-attr]  # open: has a transport
        props = underlay.server_properties
        version = props.get("version", b"?")
        return version.decode() if isinstance(version, bytes) else str(version)


async def set_up(url: str, topology: Topology, raw: list[RawQueue]) -> None:
    """Declare the rabbitq topology (through rabbitq) and the raw queues."""
    async with connection(url) as conn:
        await declare.apply(conn, topology)
        channel = await conn.channel()
        for queue in raw:
            await channel.declare_queue(queue.name, durable=True, arguments=dict(queue.arguments()))


async def fill(
    url: str,
    queue_or_exchange: tuple[str, str],
    workload: str,
    count: int,
    first_id: int = 0,
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish `count` rabbitq-format tasks with pipelined confirms (set-up, not timed).

    Args:
        queue_or_exchange: (exchange, routing key): ("", queue) for a raw queue, or
            (NS.tasks, workload) for rabbitq.
        headers: more headers on every task (the tracing scenario's `traceparent`).
    """
    exchange_name, routing_key = queue_or_exchange
    async with connection(url, "bench filler") as conn:
        channel = await conn.channel(publisher_confirms=True)
        exchange = (
            channel.default_exchange
            if not exchange_name
            else await channel.get_exchange(exchange_name, ensure=False)
        )
        window = asyncio.Semaphore(FILL_WINDOW)

        async def one(i: int) -> None:
            async with window:
                properties = task_properties(workload)
                if headers:
                    properties["headers"] = properties["headers"] | headers
                message = aio_pika.Message(body(i), **properties)
                await exchange.publish(message, routing_key=routing_key, mandatory=True)

        await asyncio.gather(*(one(first_id + i) for i in range(count)))


async def message_count(url: str, queue: str) -> int:
    async with connection(url) as conn:
        channel = await conn.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        return int(count or 0)


async def purge(url: str, queues: list[str]) -> None:
    async with connection(url) as conn:
        channel = await conn.channel()
        for name in queues:
            await (await channel.get_queue(name, ensure=False)).purge()


async def delete_everything(url: str, queues: Sequence[str], exchanges: Sequence[str]) -> list[str]:
    """Delete what a run made; returns what could not be deleted (and why)."""
    failed: list[str] = []
    async with connection(url, "bench cleanup") as conn:
        channel: AbstractChannel = await conn.channel()
        for kind, names in (("queue", queues), ("exchange", exchanges)):
            for name in names:
                try:
                    if kind == "queue":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
                except aiormq.exceptions.AMQPError as exc:
                    failed.append(f"{kind} {name}: {exc}")
                if channel.is_closed:  # an error closes the channel; carry on with a new one
                    channel = await conn.channel()
    return failed
