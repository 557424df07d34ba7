"""Retry tiers against the real broker: delays, attempts, and what a parked task carries."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

from rabbitq import App, Park, Retry, TaskContext
from rabbitq._wire import (
    HEADER_ATTEMPT,
    HEADER_FIRST_FAILURE,
    HEADER_LAST_FAILURE,
    HEADER_PARK_ATTEMPTS,
    HEADER_PARK_ERROR,
    HEADER_PARK_ERROR_TYPE,
    HEADER_PARK_HOST,
    HEADER_PARK_REASON,
    HEADER_PARK_TRACEBACK,
    HEADER_PARK_WORKLOAD,
    HEADER_PARKED_AT,
)
from tests.helpers import drain_queue, queue_depth, running_consumer, wait_until


class Item(BaseModel):
    n: int


class Boom(Exception):
    """The handler's own failure."""


async def empty(connection: AbstractConnection, names: list[str]) -> bool:
    """Every named queue has no ready message."""
    return all([await queue_depth(connection, name) == 0 for name in names])


async def test_failing_task_waits_each_tier_then_succeeds_with_priority_and_id_kept(
    make_topology, connection, url, namespace
):
    """Attempts 1, 2, 3 are spaced by each tier's TTL; retried copies keep priority and id."""
    topology = await make_topology(
        jobs={"capacity": 2, "retry": {"tiers": ["200ms", "400ms"], "max_attempts": 3}}
    )
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    attempts: list[tuple[int, float, int, str]] = []
    done = asyncio.Event()

    @app.task("jobs.flaky", workload="jobs")
    async def flaky(item: Item, ctx: TaskContext) -> None:
        attempts.append((ctx.attempt, time.monotonic(), ctx.priority, ctx.message_id))
        if len(attempts) < 3:
            raise Boom(f"failure {len(attempts)}")
        done.set()

    async with running_consumer(app, workload, url) as consumer:
        await flaky.publish(Item(n=1), priority=3, idempotency_key="flaky-1")
        await asyncio.wait_for(done.wait(), timeout=10)
        await wait_until(lambda: consumer.counts["succeeded"] == 1, what="the final ack")
        assert consumer.counts["retried"] == 2
        assert not any(k.startswith("parked:") for k in consumer.counts)

    assert [a[0] for a in attempts] == [1, 2, 3]
    starts = [a[1] for a in attempts]
    assert starts[1] - starts[0] >= 0.2
    assert starts[2] - starts[1] >= 0.4
    assert [a[2] for a in attempts] == [3, 3, 3]
    assert [a[3] for a in attempts] == ["flaky-1"] * 3
    queues = [workload.work_queue, workload.parking_queue, *(t.queue for t in workload.tiers)]
    assert await empty(connection, queues)


async def test_task_that_always_fails_is_parked_with_every_failure_detail(
    make_topology, connection, url, namespace
):
    """After max_attempts the task is parked with its error, traceback, attempts and times."""
    topology = await make_topology(
        jobs={"capacity": 2, "retry": {"tiers": ["50ms", "100ms"], "max_attempts": 3}}
    )
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    seen: list[int] = []

    @app.task("jobs.doomed", workload="jobs")
    async def always_fails(item: Item, ctx: TaskContext) -> None:
        seen.append(ctx.attempt)
        raise Boom(f"item {item.n} cannot be done")

    before_ms = time.time() * 1000
    async with running_consumer(app, workload, url) as consumer:
        message_id = await always_fails.publish(Item(n=42), priority=2)
        await wait_until(
            lambda: consumer.counts["parked:retries_exhausted"] == 1, what="the task parked"
        )
        assert consumer.counts["retried"] == 2
    after_ms = time.time() * 1000

    assert seen == [1, 2, 3]
    parked = await drain_queue(connection, workload.parking_queue)
    assert [m.message_id for m in parked] == [message_id]
    copy = parked[0]
    assert copy.body == Item(n=42).model_dump_json().encode()
    assert copy.priority == 2
    assert copy.type == "jobs.doomed"
    headers: dict[str, Any] = dict(copy.headers or {})
    assert headers[HEADER_PARK_REASON] == "retries_exhausted"
    assert headers[HEADER_PARK_ERROR_TYPE] == "Boom"
    assert headers[HEADER_PARK_ERROR] == "item 42 cannot be done"
    assert "always_fails" in headers[HEADER_PARK_TRACEBACK]
    assert "Boom: item 42 cannot be done" in headers[HEADER_PARK_TRACEBACK]
    assert headers[HEADER_PARK_ATTEMPTS] == 3
    assert headers[HEADER_ATTEMPT] == 3
    first, last = headers[HEADER_FIRST_FAILURE], headers[HEADER_LAST_FAILURE]
    assert before_ms - 1 <= first <= last <= after_ms + 1
    # attempt 1 failed, then at least two tier delays passed before the last failure
    assert last - first >= 150
    assert before_ms - 1 <= headers[HEADER_PARKED_AT] <= after_ms + 1
    assert headers[HEADER_PARK_HOST] == socket.gethostname()
    assert headers[HEADER_PARK_WORKLOAD] == "jobs"
    # The copy came back from a tier by dead-lettering (which adds x-death); we strip it.
    assert not [k for k in headers if k.startswith("x-")]
    queues = [workload.work_queue, *(t.queue for t in workload.tiers)]
    assert await empty(connection, queues)


async def test_handler_raising_park_is_parked_at_once(make_topology, connection, url, namespace):
    """`Park("bad data")` parks on attempt 1 with reason parked_by_handler, without retrying."""
    topology = await make_topology(
        jobs={"capacity": 2, "retry": {"tiers": ["50ms"], "max_attempts": 5}}
    )
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    seen: list[int] = []

    @app.task("jobs.refuse", workload="jobs")
    async def refuse(item: Item, ctx: TaskContext) -> None:
        seen.append(ctx.attempt)
        raise Park("bad data")

    async with running_consumer(app, workload, url) as consumer:
        await refuse.publish(Item(n=1))
        await wait_until(
            lambda: consumer.counts["parked:parked_by_handler"] == 1, what="the task parked"
        )
        assert consumer.counts["retried"] == 0

    assert seen == [1]
    parked = await drain_queue(connection, workload.parking_queue)
    assert len(parked) == 1
    headers: dict[str, Any] = dict(parked[0].headers or {})
    assert headers[HEADER_PARK_REASON] == "parked_by_handler"
    assert headers[HEADER_PARK_ERROR_TYPE] == "Park"
    assert headers[HEADER_PARK_ERROR] == "bad data"
    assert headers[HEADER_PARK_ATTEMPTS] == 1


@pytest.mark.parametrize(
    ("delay_seconds", "tier_label", "tier_seconds"),
    [(0.01, "50ms", 0.05), (0.2, "300ms", 0.3), (5.0, "300ms", 0.3)],
    ids=["short-delay-first-tier", "between-tiers-next-tier", "beyond-tiers-longest-tier"],
)
async def test_handler_raising_retry_uses_the_tier_chosen_by_its_delay(
    make_topology, connection, url, namespace, caplog, delay_seconds, tier_label, tier_seconds
):
    """`Retry(delay_seconds=X)` waits in the shortest tier of at least X (else the longest)."""
    topology = await make_topology(
        jobs={"capacity": 2, "retry": {"tiers": ["50ms", "300ms"], "max_attempts": 3}}
    )
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    starts: list[float] = []
    done = asyncio.Event()

    @app.task("jobs.later", workload="jobs")
    async def later(item: Item, ctx: TaskContext) -> None:
        starts.append(time.monotonic())
        if ctx.attempt == 1:
            raise Retry(delay_seconds=delay_seconds)
        done.set()

    caplog.set_level(logging.INFO, logger="rabbitq.settle")
    async with running_consumer(app, workload, url) as consumer:
        await later.publish(Item(n=1))
        await asyncio.wait_for(done.wait(), timeout=10)
        await wait_until(lambda: consumer.counts["succeeded"] == 1, what="the final ack")
        assert consumer.counts["retried"] == 1

    assert starts[1] - starts[0] >= tier_seconds
    # Which tier, not just how long: the consumer names it when it forwards the copy.
    retries = [r for r in caplog.records if r.name == "rabbitq.settle" and "retrying" in r.msg]
    assert [r.args[-1] for r in retries] == [tier_label]


async def test_handler_timeout_takes_the_retry_path_and_parks_as_timeout_error(
    make_topology, connection, url, namespace
):
    """A handler past its timeout_seconds is retried, then parked with error type TimeoutError."""
    topology = await make_topology(
        jobs={"capacity": 2, "retry": {"tiers": ["50ms"], "max_attempts": 2}}
    )
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    never = asyncio.Event()
    seen: list[int] = []

    @app.task("jobs.stuck", workload="jobs", timeout_seconds=0.2)
    async def stuck(item: Item, ctx: TaskContext) -> None:
        seen.append(ctx.attempt)
        await never.wait()

    async with running_consumer(app, workload, url) as consumer:
        await stuck.publish(Item(n=1))
        await wait_until(
            lambda: consumer.counts["parked:retries_exhausted"] == 1, what="the task parked"
        )
        assert consumer.counts["retried"] == 1

    assert seen == [1, 2]
    parked = await drain_queue(connection, workload.parking_queue)
    assert len(parked) == 1
    headers: dict[str, Any] = dict(parked[0].headers or {})
    assert headers[HEADER_PARK_REASON] == "retries_exhausted"
    assert headers[HEADER_PARK_ERROR_TYPE] == "HandlerTimeout"
    assert "0.2" in headers[HEADER_PARK_ERROR]
    assert headers[HEADER_PARK_ATTEMPTS] == 2
