"""The `rabbitq_harness` fixture (`rabbitq.testing`) on the examples' app and topology: each
task's final outcome on a real broker, in a namespace of the test's own, and agreeing with
`run_task`'s attempt by attempt."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection

from examples import feed
from examples.demo_app import Flaky, Greeting, app, doomed, flaky, greet
from rabbitq import ConfigError, ParkReason, Unroutable
from rabbitq._declare import exists
from rabbitq.testing import Harness, run_task
from tests.helpers import wait_until
from tests.observability import ROOT

TOPOLOGY = ROOT / "topology"


async def test_each_example_task_settles_with_its_outcome_retries_and_result(
    connection: AbstractConnection, rabbitq_harness: Harness
) -> None:
    """greet succeeds with its result, flaky after one retry, doomed is parked after two."""
    await rabbitq_harness.start(app)
    ok, retried, parked = await rabbitq_harness.settle(
        greet.message(Greeting(name="ana")),
        flaky.message(Flaky(n=1)),
        doomed.message(Greeting(name="bo")),
    )
    assert (ok.outcome, ok.result, ok.attempts, ok.tiers) == ("succeeded", "hello ana", 1, ())
    assert (retried.outcome, retried.attempts, retried.tiers) == ("succeeded", 2, ("200ms",))
    assert isinstance(retried.error, ConnectionError)  # the failure it got over
    assert (parked.outcome, parked.reason) == ("parked", ParkReason.RETRIES_EXHAUSTED)
    assert (parked.attempts, parked.retries) == (3, 2) and parked.tiers == ("200ms", "1s")
    assert isinstance(parked.error, RuntimeError) and "cannot greet bo" in str(parked.error)


async def test_the_broker_outcome_is_the_chain_of_run_task_attempts(
    connection: AbstractConnection, rabbitq_harness: Harness
) -> None:
    """Attempt by attempt, `run_task` sends each task to the tiers the consumer did, and ends
    it the same way."""
    await rabbitq_harness.start(app)
    cases: list[tuple[Any, Any]] = [
        (greet, Greeting(name="a")),
        (flaky, Flaky(n=2)),
        (doomed, Greeting(name="b")),
    ]
    reports = await rabbitq_harness.settle(*(task.message(payload) for task, payload in cases))
    for (task, payload), report in zip(cases, reports, strict=True):
        tiers: list[str] = []
        attempt = 1
        while (
            run := await run_task(app, task, payload, attempt=attempt, topology=TOPOLOGY)
        ).retried:
            assert run.tier is not None
            tiers.append(run.tier)
            attempt += 1
        assert (run.outcome, run.reason, run.result) == (
            report.outcome,
            report.reason,
            report.result,
        )
        assert (attempt, tuple(tiers)) == (report.attempts, report.tiers)


async def test_the_feeders_stream_settles_in_the_tests_namespace(
    connection: AbstractConnection, rabbitq_harness: Harness
) -> None:
    """examples/feed.py's stream, published by the app, runs in the harness and nowhere else."""
    await rabbitq_harness.start(app)
    assert app.namespace == rabbitq_harness.namespace
    stop = asyncio.Event()
    feeding = asyncio.create_task(feed.feed(rate=200, stop=stop, seed=3))
    await wait_until(lambda: len(rabbitq_harness.reports) >= 30, what="30 tasks to settle")
    stop.set()
    published = await feeding
    await wait_until(lambda: len(rabbitq_harness.reports) == published, what="every task to settle")
    outcomes = {(r.task, r.outcome, r.retries) for r in rabbitq_harness.reports.values()}
    assert ("demo.greet", "succeeded", 0) in outcomes
    assert outcomes <= {
        ("demo.greet", "succeeded", 0),
        ("demo.flaky", "succeeded", 1),
        ("demo.doomed", "parked", 2),
    }


async def test_the_namespace_is_deleted_and_the_app_given_back_after_close(
    connection: AbstractConnection, url: str, namespace: str
) -> None:
    """close() deletes every queue and exchange it declared and restores the app."""
    before = (app.namespace, app.url)
    harness = Harness(url, namespace, TOPOLOGY)
    try:
        await harness.start(app)
        assert harness.topology is not None
        queues = [q.name for q in harness.topology.queues()]
        assert all([await exists(connection, "queue", q) for q in queues])
        [report] = await harness.settle(greet.message(Greeting(name="c")))
        assert report.succeeded
    finally:
        await harness.close()
    assert (app.namespace, app.url) == before
    assert not any([await exists(connection, "queue", q) for q in queues])
    assert not await exists(connection, "exchange", f"{namespace}.tasks")


async def test_tiers_are_short_but_keep_their_labels_and_no_ladder_is_declared(
    connection: AbstractConnection, rabbitq_harness: Harness
) -> None:
    """The 5 s tier waits 50 ms in the test, under its own name; the ladder is left out."""
    await rabbitq_harness.start(app)
    topology = rabbitq_harness.topology
    assert topology is not None and not topology.ladder_queues()
    tiers = topology.workload("demo").tiers
    assert [(t.label, t.delay_seconds) for t in tiers] == [
        ("200ms", 0.05),
        ("1s", 0.05),
        ("5s", 0.05),
    ]
    assert tiers[-1].queue == f"{rabbitq_harness.namespace}.demo.retry.5s"


async def test_a_message_built_for_the_apps_own_namespace_is_refused(
    connection: AbstractConnection, rabbitq_harness: Harness
) -> None:
    """A message built before start() would go to the real namespace: settle refuses it."""
    early = greet.message(Greeting(name="early"))
    await rabbitq_harness.start(app)
    with pytest.raises(ConfigError, match="outside the test's namespace"):
        await rabbitq_harness.settle(early)


async def test_a_task_that_never_settles_fails_saying_where_it_was_last_seen(
    connection: AbstractConnection, rabbitq_harness: Harness
) -> None:
    """A wait that runs out names each unsettled task and its last place."""
    await rabbitq_harness.start(app, tier_seconds=30)  # the real wait would be longer
    with pytest.raises(
        AssertionError,
        match=r"within 1.0s: \w+ \(demo.flaky\): retried 1 times, last in tier 200ms",
    ):
        await rabbitq_harness.settle(flaky.message(Flaky(n=3)), timeout=1.0)


async def test_a_delayed_task_needs_the_ladder_which_delays_true_declares(
    connection: AbstractConnection, rabbitq_harness: Harness
) -> None:
    """Without the ladder a delayed publish is unroutable; with it, the task runs after its
    delay (a real one: the ladder is not shortened)."""
    await rabbitq_harness.start(app, delays=True)
    loop = asyncio.get_running_loop()
    started = loop.time()
    [report] = await rabbitq_harness.settle(greet.message(Greeting(name="later"), delay=1))
    assert report.succeeded and loop.time() - started >= 0.5  # rounded to the whole second


async def test_without_the_ladder_a_delayed_publish_is_unroutable(
    connection: AbstractConnection, rabbitq_harness: Harness
) -> None:
    await rabbitq_harness.start(app)
    with pytest.raises(Unroutable):
        await rabbitq_harness.settle(greet.message(Greeting(name="later"), delay=1))
