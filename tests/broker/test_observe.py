"""What a consumer reports of its work: metric values, one log line per outcome, failure hooks.

One in-process consumer runs a known mix (successes, tasks that fail once, a task that always
fails, poison, an expired task, a task that waited two minutes) and every figure must match
what the test did.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from rabbitq import App, TaskContext
from rabbitq._handlers import Failure
from rabbitq._metrics import Metrics
from rabbitq._wire import HEADER_ATTEMPT, HEADER_PUBLISHED_AT
from tests.helpers import plain_message, running_consumer, wait_until


class Item(BaseModel):
    n: int


SUCCEEDING = 5
FLAKY = 2  # fail once, then succeed
POISON = 2  # not JSON; an unregistered task
WAITED_SECONDS = 120.0


async def test_metrics_logs_and_hooks_match_what_happened(
    make_topology: Callable[..., Any],
    connection: AbstractConnection,
    url: str,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topology = await make_topology(
        obs={"capacity": 4, "retry": {"tiers": ["50ms"], "max_attempts": 2}}
    )
    workload = topology.workload("obs")
    app = App(namespace=namespace, url=url)
    failures: list[Failure] = []

    @app.task("obs.ok", workload="obs")
    async def ok(item: Item) -> None:
        pass

    @app.task("obs.flaky", workload="obs")
    def flaky(item: Item, ctx: TaskContext) -> None:
        if ctx.attempt == 1:
            raise ConnectionError(f"flaky {item.n}")

    @app.task("obs.doomed", workload="obs")
    async def doomed(item: Item) -> None:
        raise RuntimeError("doomed always fails")

    app.on_failure(failures.append)

    @app.on_failure
    def broken_reporter(failure: Failure) -> None:
        raise RuntimeError("the reporter is down")

    registry = CollectorRegistry()
    caplog.set_level(logging.DEBUG, logger="rabbitq.settle")
    async with running_consumer(app, workload, url, metrics=Metrics(registry)) as consumer:
        for n in range(SUCCEEDING):
            await ok.publish(Item(n=n))
        for n in range(FLAKY):
            await flaky.publish(Item(n=n))
        await doomed.publish(Item(n=0))
        # a deadline already past: on loopback a task can arrive within a millisecond
        await ok.publish(Item(n=99), deadline=datetime.now(UTC) - timedelta(seconds=1))
        channel = await connection.channel()
        exchange = await channel.get_exchange(workload.task_exchange, ensure=False)
        waited = int((time.time() - WAITED_SECONDS) * 1000)
        await exchange.publish(
            plain_message(
                b'{"n": 7}',
                type="obs.ok",
                message_id="waited",
                headers={HEADER_ATTEMPT: 1, HEADER_PUBLISHED_AT: waited},
            ),
            routing_key=workload.routing_key,
        )
        await exchange.publish(
            plain_message(b"not json", type="obs.ok", message_id="p1", headers={HEADER_ATTEMPT: 1}),
            routing_key=workload.routing_key,
        )
        await exchange.publish(
            plain_message(b"{}", type="forged.task", message_id="p2", headers={HEADER_ATTEMPT: 1}),
            routing_key=workload.routing_key,
        )
        await channel.close()
        await wait_until(
            lambda: sum(consumer.counts.values()) == SUCCEEDING + 1 + 2 * FLAKY + 2 + 1 + POISON,
            what="every outcome settled",
            timeout=15,
        )

    def value(name: str, **labels: str) -> float:
        got = registry.get_sample_value(name, {"workload": "obs", **labels})
        return got or 0.0

    def outcome(task: str, name: str) -> float:
        return value("rabbitq_tasks_total", task=task, outcome=name)

    assert outcome("obs.ok", "succeeded") == SUCCEEDING + 1  # with the one that waited
    assert outcome("obs.flaky", "retried") == FLAKY
    assert outcome("obs.flaky", "succeeded") == FLAKY
    assert outcome("obs.doomed", "retried") == 1
    assert outcome("obs.doomed", "parked") == 1
    assert outcome("obs.ok", "expired") == 1
    assert outcome("obs.ok", "parked") == 1  # not JSON: the task is registered
    assert outcome("_unknown", "parked") == 1  # the forged name is not a label value
    parked = {
        reason: value("rabbitq_tasks_parked_total", task=task, reason=reason)
        for task, reason in [
            ("obs.doomed", "retries_exhausted"),
            ("obs.ok", "expired"),
            ("obs.ok", "undecodable"),
            ("_unknown", "unknown_task"),
        ]
    }
    assert parked == {"retries_exhausted": 1, "expired": 1, "undecodable": 1, "unknown_task": 1}
    # the handler ran for: successes, flaky twice each, doomed twice
    runs = SUCCEEDING + 1 + 2 * FLAKY + 2
    durations = sum(
        value("rabbitq_task_duration_seconds_count", task=t)
        for t in ("obs.ok", "obs.flaky", "obs.doomed")
    )
    assert durations == runs
    assert value("rabbitq_task_queue_latency_seconds_count", task="obs.ok") == SUCCEEDING + 1
    # only the task published two minutes ago waited more than a minute
    assert (
        value("rabbitq_task_queue_latency_seconds_count", task="obs.ok")
        - value("rabbitq_task_queue_latency_seconds_bucket", task="obs.ok", le="60.0")
        == 1
    )
    assert value("rabbitq_task_queue_latency_seconds_sum", task="obs.ok") >= WAITED_SECONDS
    confirmed = {
        k: registry.get_sample_value("rabbitq_publishes_total", {"kind": k, "outcome": "confirmed"})
        for k in ("retry", "park")
    }
    assert confirmed == {"retry": FLAKY + 1, "park": 1 + 1 + POISON}
    assert value("rabbitq_capacity") == 4
    assert value("rabbitq_running_handlers") == 0
    assert value("rabbitq_consumer_ready") == 0  # stopped

    # one line per outcome, with its facts; the traceback once, on the park of a failed run
    # the outcome fields are `extra` attributes, which LogRecord's type does not declare
    lines: list[Any] = [r for r in caplog.records if getattr(r, "outcome", None)]
    by_outcome: dict[str, list[Any]] = {}
    for record in lines:
        by_outcome.setdefault(record.outcome, []).append(record)
        assert record.workload == "obs"
        assert record.message_id and record.attempt is not None
    assert {k: len(v) for k, v in by_outcome.items()} == {
        "succeeded": SUCCEEDING + 1 + FLAKY,
        "retried": FLAKY + 1,
        "parked": 1 + POISON,
        "expired": 1,
    }
    assert all(r.duration_seconds is not None for r in by_outcome["succeeded"])
    assert all(r.tier == "50ms" for r in by_outcome["retried"])
    doomed_park = [r for r in by_outcome["parked"] if r.task == "obs.doomed"]
    assert len(doomed_park) == 1 and "RuntimeError: doomed always fails" in doomed_park[0].traceback
    assert sum("Traceback" in (getattr(r, "traceback", "") or "") for r in caplog.records) == 1
    assert any("a failure hook raised" in r.getMessage() for r in caplog.records)

    # the hook saw each failure once, with the error object
    seen = sorted((f.task or "", f.outcome, f.reason or "") for f in failures)
    assert seen == sorted(
        [("obs.flaky", "retried", "")] * FLAKY
        + [
            ("obs.doomed", "retried", ""),
            ("obs.doomed", "parked", "retries_exhausted"),
            ("obs.ok", "expired", "expired"),
            ("obs.ok", "parked", "undecodable"),
            ("forged.task", "parked", "unknown_task"),
        ]
    )
    assert all(isinstance(f.error, BaseException) for f in failures)
