"""A task's own retry rules against the real broker: how many attempts, and what is parked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

from rabbitq import App, TaskContext
from rabbitq._wire import (
    HEADER_PARK_ATTEMPTS,
    HEADER_PARK_ERROR,
    HEADER_PARK_ERROR_TYPE,
    HEADER_PARK_REASON,
    HEADER_PARK_TRACEBACK,
)
from tests.helpers import drain_queue, queue_depth, running_consumer, wait_until


class Item(BaseModel):
    n: int


@pytest.mark.parametrize(
    ("options", "raised", "reason", "attempts", "error"),
    [
        pytest.param(
            {"park_on": (ValueError,)},
            ValueError,
            "not_retryable",
            1,
            "item 7 failed; ValueError is not retried by task 'jobs.ruled' (park_on)",
            id="park-on-parks-at-once",
        ),
        pytest.param(
            {"retry_on": (TimeoutError,)},
            KeyError,
            "not_retryable",
            1,
            "'item 7 failed'; KeyError is not retried by task 'jobs.ruled' (not in retry_on)",
            id="retry-on-parks-anything-else-at-once",
        ),
        pytest.param(
            {"max_attempts": 2},
            KeyError,
            "retries_exhausted",
            2,
            "'item 7 failed'",
            id="max-attempts-below-the-workloads",
        ),
    ],
)
async def test_task_rules_decide_how_often_a_failing_task_runs_before_it_is_parked(
    make_topology: Callable[..., Any],
    connection: AbstractConnection,
    url: str,
    namespace: str,
    options: dict[str, Any],
    raised: type[Exception],
    reason: str,
    attempts: int,
    error: str,
) -> None:
    """In a workload of 4 attempts, the task runs as often as its rules allow, then is parked
    once with the rule's reason and the handler's own error and traceback."""
    topology = await make_topology(
        jobs={"capacity": 2, "retry": {"tiers": ["20ms", "40ms"], "max_attempts": 4}}
    )
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    seen: list[int] = []

    @app.task("jobs.ruled", workload="jobs", **options)
    async def ruled(item: Item, ctx: TaskContext) -> None:
        seen.append(ctx.attempt)
        raise raised(f"item {item.n} failed")

    async with running_consumer(app, workload, url) as consumer:
        message_id = await ruled.publish(Item(n=7))
        await wait_until(lambda: consumer.counts[f"parked:{reason}"] == 1, what="the task parked")
        assert consumer.counts["retried"] == attempts - 1

    assert seen == list(range(1, attempts + 1))
    parked = await drain_queue(connection, workload.parking_queue)
    assert [m.message_id for m in parked] == [message_id]
    headers: dict[str, Any] = dict(parked[0].headers or {})
    assert headers[HEADER_PARK_REASON] == reason
    assert headers[HEADER_PARK_ATTEMPTS] == attempts
    assert headers[HEADER_PARK_ERROR_TYPE] == raised.__name__
    assert headers[HEADER_PARK_ERROR] == error
    assert "in ruled" in headers[HEADER_PARK_TRACEBACK]
    for queue in (workload.work_queue, *(t.queue for t in workload.tiers)):
        assert await queue_depth(connection, queue) == 0
