"""Test helpers: waiting on conditions with a deadline, and reading broker state."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from rabbitq import App, Consumer
from rabbitq._topology import Workload


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline, not a cancellation scope
    what: str = "the condition",
    interval: float = 0.02,
) -> None:
    """Poll `predicate` until it is true; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(interval)


async def queue_depth(connection: AbstractConnection, name: str) -> int:
    """Ready messages in a queue (passive declare; unacked ones are not counted)."""
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await channel.close()


async def drain_queue(connection: AbstractConnection, name: str) -> list[AbstractIncomingMessage]:
    """Take (and ack) every message now in a queue."""
    channel = await connection.channel()
    try:
        queue = await channel.get_queue(name, ensure=False)
        out = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            out.append(message)
        return out
    finally:
        await channel.close()


@contextlib.asynccontextmanager
async def running_consumer(
    app: App, workload: Workload, url: str, **kwargs: Any
) -> AsyncIterator[Consumer]:
    """A consumer running in this event loop; stopped (gracefully) on exit."""
    consumer = Consumer(app, workload, url, **kwargs)
    task = asyncio.create_task(consumer.run())
    ready = asyncio.create_task(consumer.ready.wait())
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises what stopped it
        raise AssertionError("the consumer stopped before it was ready")
    if not ready.done():
        ready.cancel()
        task.cancel()
        raise AssertionError("the consumer was not ready within 10s")
    try:
        yield consumer
    finally:
        consumer.stop()
        await asyncio.wait_for(task, timeout=consumer.grace_seconds + 10)
        await app.close()


def plain_message(body: bytes, **properties: Any) -> aio_pika.Message:
    return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties)


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path; (status, body), or (0, b"") if nothing answers."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0, b""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    except (OSError, TimeoutError):
        return 0, b""
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body
    except (IndexError, ValueError):
        return 0, b""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
