"""The consumer against the real broker: outcomes of a delivery."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

import rabbitq
from rabbitq import App
from rabbitq._wire import (
    HEADER_ATTEMPT,
    HEADER_PARK_ATTEMPTS,
    HEADER_PARK_ERROR,
    HEADER_PARK_ERROR_TYPE,
    HEADER_PARK_REASON,
    HEADER_PUBLISHED_AT,
)
from tests.helpers import drain_queue, plain_message, queue_depth, running_consumer, wait_until
from tests.ledger import close_connections_named


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


# Reconnecting ------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_reconnect_backoff_starts_over_once_the_consumer_consumes_again(
    make_topology, url, namespace
):
    """Its connection closed 4 times, each once consuming again: every reconnect takes under
    2s (the backoff starts over each time; without that it would grow 0.5, 1, 2, 4s)."""
    name = f"w{namespace}"  # its connection's name is the test's alone
    topology = await make_topology(**{name: {"capacity": 4}})
    app = App(namespace=namespace, url=url)
    gaps: list[float] = []
    async with running_consumer(app, topology.workload(name), url) as consumer:
        for _ in range(4):
            lost = asyncio.create_task(when(lambda: not consumer.ready.is_set()))
            assert await close_connections_named(f"consumer {name} on ") == 1
            gaps.append(await when(consumer.ready.is_set, timeout=20) - await lost)
        assert consumer.reconnects == 4
    assert max(gaps) < 2, f"reconnects took {[round(g, 2) for g in gaps]}s"


async def when(predicate: Callable[[], bool], timeout: float = 5.0) -> float:  # noqa: ASYNC109
    """The monotonic time at which `predicate` was seen true."""
    await wait_until(predicate, timeout=timeout, interval=0.005)
    return time.monotonic()


# Poison messages ---------------------------------------------------------------------------------

ATTEMPT_1 = {HEADER_ATTEMPT: 1}
ORIGINAL_TIMESTAMP = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
MAX_MESSAGE_BYTES = 256
OVERSIZED = b'{"n": 1, "pad": "' + b"x" * MAX_MESSAGE_BYTES + b'"}'

POISON_CASES = [
    # (case, body, task type, headers, park reason, parked attempts)
    ("not_json", b"{not json", "jobs.record", ATTEMPT_1, "undecodable", 1),
    ("wrong_shape", b'{"m": "no n here"}', "jobs.record", ATTEMPT_1, "invalid_payload", 1),
    ("unknown_task", b'{"n": 1}', "jobs.nobody", ATTEMPT_1, "unknown_task", 1),
    ("no_attempt_header", b'{"n": 1}', "jobs.record", {"other": "kept"}, "bad_envelope", 0),
    ("no_type", b'{"n": 1}', None, ATTEMPT_1, "bad_envelope", 0),
    ("too_large", OVERSIZED, "jobs.record", ATTEMPT_1, "too_large", 0),
]


@pytest.mark.parametrize(
    ("body", "task_type", "headers", "reason", "attempts"),
    [pytest.param(*case[1:], id=case[0]) for case in POISON_CASES],
)
async def test_poison_message_is_parked_at_once_and_the_consumer_goes_on(
    make_topology, connection, url, namespace, body, task_type, headers, reason, attempts
):
    """A poison message is parked at once, untouched, with its reason; the next task still runs."""
    # A long tier: a poison message wrongly sent to retry would still sit there when we look.
    topology = await make_topology(
        jobs={
            "capacity": 2,
            "max_message_bytes": MAX_MESSAGE_BYTES,
            "retry": {"tiers": ["5s"], "max_attempts": 3},
        }
    )
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    valid_done = asyncio.Event()

    @app.task("jobs.record", workload="jobs")
    async def record(item: Item) -> None:
        valid_done.set()

    properties: dict[str, Any] = {
        "message_id": f"poison-{uuid.uuid4().hex}",
        "priority": 3,
        "content_type": "application/json",
        "timestamp": ORIGINAL_TIMESTAMP,
        "headers": dict(headers),
    }
    if task_type is not None:
        properties["type"] = task_type

    async with running_consumer(app, workload, url) as consumer:
        channel = await connection.channel()
        exchange = await channel.get_exchange(workload.task_exchange, ensure=False)
        await exchange.publish(plain_message(body, **properties), routing_key=workload.routing_key)
        await record.publish(Item(n=1))
        await asyncio.wait_for(valid_done.wait(), timeout=10)
        await wait_until(
            lambda: consumer.counts[f"parked:{reason}"] == 1,
            what=f"the poison message parked as {reason}",
        )
        await wait_until(lambda: consumer.counts["succeeded"] == 1, what="the valid task acked")
        await channel.close()
        assert consumer.counts["retried"] == 0

    parked = await drain_queue(connection, workload.parking_queue)
    assert len(parked) == 1
    copy = parked[0]
    assert copy.body == body
    assert copy.message_id == properties["message_id"]
    assert copy.type == task_type
    assert copy.priority == 3
    assert copy.content_type == "application/json"
    # the copy's timestamp is the park time (the broker reports the oldest parked task's age
    # from it); the publish time moves to a header
    assert copy.timestamp is not None and copy.timestamp > ORIGINAL_TIMESTAMP
    copy_headers = copy.headers or {}
    assert copy_headers[HEADER_PUBLISHED_AT] == ORIGINAL_TIMESTAMP.timestamp() * 1000
    assert copy_headers[HEADER_PARK_REASON] == reason
    assert copy_headers[HEADER_PARK_ATTEMPTS] == attempts
    assert copy_headers[HEADER_PARK_ERROR_TYPE] == "Poison"
    assert copy_headers[HEADER_PARK_ERROR]
    assert headers.items() <= copy_headers.items()
    assert await queue_depth(connection, workload.work_queue) == 0
    for tier in workload.tiers:
        assert await queue_depth(connection, tier.queue) == 0


async def test_task_past_its_deadline_is_parked_as_expired_without_running(
    make_topology, connection, url, namespace
):
    """A task whose deadline passed before delivery is parked as expired; its handler never runs."""
    topology = await make_topology(jobs={"capacity": 2, "retry": {"tiers": ["50ms"]}})
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    ran: list[int] = []

    @app.task("jobs.record", workload="jobs")
    async def record(item: Item) -> None:
        ran.append(item.n)

    message_id = await record.publish(Item(n=7), deadline=datetime.now(UTC) - timedelta(seconds=1))
    await app.close()
    async with running_consumer(app, workload, url) as consumer:
        await wait_until(lambda: consumer.counts["parked:expired"] == 1, what="the task parked")
    assert ran == []
    parked = await drain_queue(connection, workload.parking_queue)
    assert [m.message_id for m in parked] == [message_id]
    headers = parked[0].headers or {}
    assert headers[HEADER_PARK_REASON] == "expired"
    assert headers[HEADER_PARK_ATTEMPTS] == 1
    assert parked[0].body == Item(n=7).model_dump_json().encode()
    assert await queue_depth(connection, workload.work_queue) == 0


# Priority and capacity ---------------------------------------------------------------------------


async def test_high_priority_task_runs_before_an_older_low_priority_backlog(
    make_topology, connection, url, namespace
):
    """With capacity 1, a high-priority task published after a backlog runs first, then FIFO."""
    topology = await make_topology(jobs={"capacity": 1})
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    order: list[int] = []
    done = asyncio.Event()

    @app.task("jobs.record", workload="jobs")
    async def record(item: Item) -> None:
        order.append(item.n)
        if len(order) == 6:
            done.set()

    # The whole backlog is queued before the consumer attaches: priority only reorders what is
    # still in the queue, and prefetch 1 leaves everything there.
    for n in range(5):
        await record.publish(Item(n=n), priority=0)
    await record.publish(Item(n=99), priority=4)
    await app.close()
    assert await queue_depth(connection, workload.work_queue) == 6

    async with running_consumer(app, workload, url):
        await asyncio.wait_for(done.wait(), timeout=10)
    assert order == [99, 0, 1, 2, 3, 4]


CAPACITY = 3
TASKS = 20


async def test_running_async_handlers_reach_but_never_exceed_capacity(
    make_topology, connection, url, namespace
):
    """Async handlers run up to the capacity at once and never more."""
    topology = await make_topology(jobs={"capacity": CAPACITY})
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    running = 0
    peak = 0
    finished = 0
    full = asyncio.Event()
    done = asyncio.Event()

    @app.task("jobs.work", workload="jobs")
    async def work(item: Item) -> None:
        nonlocal running, peak, finished
        running += 1
        peak = max(peak, running)
        if running >= CAPACITY:
            full.set()
        try:
            # Hold until the capacity is filled (bounded), then simulate a little work.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(full.wait(), timeout=1)
            await asyncio.sleep(0.02)
        finally:
            running -= 1
        finished += 1
        if finished == TASKS:
            done.set()

    await work.publish_many([Item(n=n) for n in range(TASKS)])
    await app.close()
    async with running_consumer(app, workload, url) as consumer:
        await asyncio.wait_for(done.wait(), timeout=10)
        await wait_until(lambda: consumer.counts["succeeded"] == TASKS, what="every task acked")
    assert peak == CAPACITY
    assert await queue_depth(connection, workload.work_queue) == 0


async def test_running_sync_handlers_reach_but_never_exceed_capacity(
    make_topology, connection, url, namespace
):
    """Sync handlers (in threads) run up to the capacity at once and never more."""
    topology = await make_topology(jobs={"capacity": CAPACITY})
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    lock = threading.Lock()
    state = {"running": 0, "peak": 0, "finished": 0}
    full = threading.Event()

    @app.task("jobs.work", workload="jobs")
    def work(item: Item) -> None:
        with lock:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
            if state["running"] >= CAPACITY:
                full.set()
        try:
            full.wait(timeout=1)
            time.sleep(0.02)
        finally:
            with lock:
                state["running"] -= 1
                state["finished"] += 1

    await work.publish_many([Item(n=n) for n in range(TASKS)])
    await app.close()
    async with running_consumer(app, workload, url) as consumer:
        await wait_until(lambda: consumer.counts["succeeded"] == TASKS, what="every task acked")
    assert state["finished"] == TASKS
    assert state["peak"] == CAPACITY
    assert await queue_depth(connection, workload.work_queue) == 0


async def test_a_foreign_producers_message_is_held_to_the_documented_wire_format(
    make_topology, connection, url, namespace
):
    """What README's wire-format table says of `content_type` and `priority`, for a message from
    a producer that is not rabbitq: JSON (with or without parameters) or no content_type runs; a
    priority above the workload's maximum runs (the broker queues it at the maximum); any other
    content_type is parked as bad_envelope, naming it."""
    topology = await make_topology(jobs={"capacity": 4, "max_priority": 4})
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    ran: dict[str, int] = {}

    @app.task("jobs.record", workload="jobs")
    async def record(item: Item, ctx: rabbitq.TaskContext) -> None:
        ran[ctx.message_id] = ctx.priority

    runs: dict[str, dict[str, Any]] = {
        "no-type": {},
        "json-charset": {"content_type": "application/json; charset=utf-8"},
        "over-max-priority": {"content_type": "application/json", "priority": 200},
    }
    async with running_consumer(app, workload, url) as consumer:
        channel = await connection.channel()
        exchange = await channel.get_exchange(workload.task_exchange, ensure=False)
        for message_id, props in [*runs.items(), ("text", {"content_type": "text/plain"})]:
            message = plain_message(
                b'{"n": 1}',
                message_id=message_id,
                type="jobs.record",
                headers={HEADER_ATTEMPT: 1},
                **props,
            )
            await exchange.publish(message, routing_key=workload.routing_key)
        await wait_until(
            lambda: len(ran) == 3 and consumer.counts["parked:bad_envelope"] == 1,
            what="three run, one parked",
        )
        await channel.close()
    assert ran == {"no-type": 0, "json-charset": 0, "over-max-priority": 200}
    [parked] = await drain_queue(connection, workload.parking_queue)
    assert parked.message_id == "text"
    assert (parked.headers or {})[HEADER_PARK_ERROR] == (
        "content_type is 'text/plain'; a task body is application/json"
    )
