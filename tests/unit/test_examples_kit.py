"""`rabbitq.testing.run_task` on the examples' tasks and on per-task rules: what the consumer
would do with one attempt, decided by the consumer's own code, without a broker."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import rabbitq
from examples.demo_app import Flaky, Greeting, app, doomed, flaky, greet
from rabbitq import ConfigError, ParkReason, Poison
from rabbitq._topology import load_topology, parse_topology
from rabbitq.testing import Harness, TaskRun, for_test, run_task, run_task_sync
from tests.observability import ROOT

TOPOLOGY = ROOT / "topology"  # the examples' own: tiers 200ms, 1s, 5s; 3 attempts


@pytest.mark.parametrize(
    ("task", "payload", "attempt", "outcome", "tier", "reason"),
    [
        (greet, Greeting(name="ana"), 1, "succeeded", None, None),
        (flaky, Flaky(n=1), 1, "retried", "200ms", None),
        (flaky, Flaky(n=1), 2, "succeeded", None, None),
        (doomed, Greeting(name="bo"), 1, "retried", "200ms", None),
        (doomed, Greeting(name="bo"), 2, "retried", "1s", None),
        (doomed, Greeting(name="bo"), 3, "parked", None, ParkReason.RETRIES_EXHAUSTED),
        (greet, b'{"nom": "ana"}', 1, "parked", None, ParkReason.INVALID_PAYLOAD),
        (greet, b"not json", 1, "parked", None, ParkReason.UNDECODABLE),
        (greet, b'{"name": "' + b"x" * 70_000 + b'"}', 1, "parked", None, ParkReason.TOO_LARGE),
    ],
)
async def test_an_attempt_of_an_example_task_has_the_outcome_the_consumer_gives_it(
    task: rabbitq.Task[Any, Any],
    payload: Any,
    attempt: int,
    outcome: str,
    tier: str | None,
    reason: ParkReason | None,
) -> None:
    """Each attempt is acked, sent to the tier for its number, or parked with its reason."""
    run = await run_task(app, task, payload, attempt=attempt, topology=TOPOLOGY)
    assert (run.outcome, run.tier, run.reason) == (outcome, tier, reason), run
    assert run.attempt == attempt and run.task == task.name


async def test_a_success_carries_the_handlers_result_and_a_retry_its_delay() -> None:
    """greet's result comes back; flaky's first failure waits 0.2 s in tier 0, with its error."""
    ok = await run_task(app, "demo.greet", {"name": "ana"}, topology=TOPOLOGY)
    assert ok.succeeded and ok.result == "hello ana" and ok.error is None
    retry = await run_task(app, flaky, Flaky(n=7), topology=TOPOLOGY)
    assert retry.retried and (retry.tier_index, retry.delay_seconds) == (0, 0.2)
    assert isinstance(retry.error, ConnectionError) and "flaky #7" in str(retry.error)


async def test_a_task_past_its_deadline_is_parked_as_expired_without_running() -> None:
    """A deadline already past parks the task as `expired`; the handler never ran."""
    run = await run_task(app, doomed, Greeting(name="x"), deadline=timedelta(seconds=-1))
    assert run.parked and run.reason is ParkReason.EXPIRED
    assert isinstance(run.error, Poison)  # not the handler's RuntimeError: it did not run


def test_run_task_sync_runs_a_sync_handler_without_an_event_loop() -> None:
    """From a plain `def` test, `run_task_sync` gives the same outcome."""
    run = run_task_sync(app, flaky, Flaky(n=2), attempt=2, topology=TOPOLOGY)
    assert run == TaskRun("demo.flaky", 2, "succeeded")


async def test_run_task_sync_on_a_running_loop_says_to_await_run_task() -> None:
    with pytest.raises(ConfigError, match="use await run_task"):
        run_task_sync(app, greet, Greeting(name="a"), topology=TOPOLOGY)


async def test_an_unknown_task_or_workload_or_a_bad_payload_is_a_mistake_in_the_test() -> None:
    """A typo is refused, not reported as a parked task; a bad model fails as a publish does."""
    with pytest.raises(ConfigError, match="'demo.gret' is not registered"):
        await run_task(app, "demo.gret", {}, topology=TOPOLOGY)
    other = parse_topology({"t.toml": "[workloads.other]\n"})
    with pytest.raises(ConfigError, match="workload 'demo', which the topology does not declare"):
        await run_task(app, greet, Greeting(name="a"), topology=other)
    with pytest.raises(ConfigError, match="attempt=0"):
        await run_task(app, greet, Greeting(name="a"), attempt=0, topology=TOPOLOGY)
    with pytest.raises(ConfigError, match="takes Greeting, got Flaky"):
        await run_task(app, greet, Flaky(n=1), topology=TOPOLOGY)


# Per-task rules, on a small app of this test's own: the examples set none.
rules_app = rabbitq.App(namespace="kit")
RULES_TOPOLOGY = parse_topology(
    {
        "t.toml": '[workloads.mail]\n[workloads.mail.retry]\ntiers = ["1s", "10s", "1m", "10m"]\n'
        "max_attempts = 5\n"
    }
)


class Mail(BaseModel):
    error: str = ""
    delay: float = 0.0


class Refused(OSError):
    pass


ERRORS: dict[str, BaseException] = {
    "os": OSError("busy"),
    "refused": Refused("no such user"),
    "value": ValueError("bad address"),
    "timeout": TimeoutError("slow"),
}


def _raise(msg: Mail) -> None:
    if msg.error == "retry":
        raise rabbitq.Retry(delay_seconds=msg.delay)
    if msg.error == "park":
        raise rabbitq.Park("no")
    if msg.error:
        raise ERRORS[msg.error]


@rules_app.task("mail.send", workload="mail", max_attempts=3, retry_on=OSError, park_on=Refused)
async def send(msg: Mail) -> None:
    _raise(msg)


@rules_app.task("mail.slow", workload="mail", timeout_seconds=0.01)
async def slow(msg: Mail) -> None:
    await asyncio.sleep(1)


@pytest.mark.parametrize(
    ("mail", "attempt", "outcome", "tier", "reason", "detail"),
    [
        (Mail(error="os"), 1, "retried", "1s", None, ""),
        (Mail(error="os"), 2, "retried", "10s", None, ""),
        (Mail(error="os"), 3, "parked", None, ParkReason.RETRIES_EXHAUSTED, ""),  # max_attempts
        (Mail(error="timeout"), 1, "retried", "1s", None, ""),  # a TimeoutError is an OSError
        (Mail(error="value"), 1, "parked", None, ParkReason.NOT_RETRYABLE, "not in retry_on"),
        (Mail(error="refused"), 1, "parked", None, ParkReason.NOT_RETRYABLE, "(park_on)"),
        (Mail(error="retry", delay=60), 1, "retried", "1m", None, ""),
        (Mail(error="retry", delay=60), 3, "parked", None, ParkReason.RETRIES_EXHAUSTED, ""),
        (Mail(error="park"), 1, "parked", None, ParkReason.PARKED_BY_HANDLER, ""),
    ],
)
async def test_per_task_rules_decide_as_in_the_consumer(
    mail: Mail, attempt: int, outcome: str, tier: str | None, reason: ParkReason | None, detail: str
) -> None:
    """max_attempts caps the workload's 5; retry_on and park_on park at once; Retry and Park win."""
    run = await run_task(rules_app, send, mail, attempt=attempt, topology=RULES_TOPOLOGY)
    assert (run.outcome, run.tier, run.reason) == (outcome, tier, reason), run
    assert detail in run.detail


async def test_a_handler_past_its_timeout_is_retried_as_a_handler_timeout() -> None:
    run = await run_task(rules_app, slow, Mail(), topology=RULES_TOPOLOGY)
    assert run.retried and isinstance(run.error, rabbitq.HandlerTimeout)


def test_the_kits_public_names_are_its_all_and_readme_lists_them() -> None:
    """`rabbitq.testing.__all__` is sorted, complete, and in README's "Public API" section."""
    import rabbitq.testing as kit

    public = {n for n, v in vars(kit).items() if not n.startswith("_") and callable(v)}
    fixtures = {"rabbitq_harness", "rabbitq_namespace", "rabbitq_url", "pytest_addoption"}
    imported = {"AsyncIterator", "Path"}
    assert kit.__all__ == sorted(set(kit.__all__))
    assert set(kit.__all__) == public - fixtures - imported
    section = (ROOT / "README.md").read_text().split("## Public API", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"`rabbitq\.testing\.(\w+)`", section)) == set(kit.__all__)


def test_for_test_renames_the_namespace_and_shortens_the_tiers_under_their_own_names() -> None:
    """The test's topology: its namespace, 50 ms tiers named as the real ones, the real policy."""
    real = load_topology(TOPOLOGY)
    test = for_test(real, "rqt-x")
    [workload] = test.workloads.values()
    assert (test.namespace, workload.work_queue, test.has_ladder) == (
        "rqt-x",
        "rqt-x.demo.work",
        False,
    )
    assert [(t.label, t.delay_seconds) for t in workload.tiers] == [
        ("200ms", 0.05),
        ("1s", 0.05),
        ("5s", 0.05),
    ]
    assert [q.arguments["x-message-ttl"] for q in workload.queues() if q.role == "tier"] == [50] * 3
    assert workload.spec == real.workload("demo").spec  # the decisions' policy: 0.2, 1, 5 s
    kept = for_test(real, "rqt-y", delays=True, tier_seconds=None).workload("demo")
    assert [t.delay_seconds for t in kept.tiers] == [0.2, 1.0, 5.0]
    with pytest.raises(rabbitq.TopologyInvalid, match="no such workload"):
        for_test(real, "rqt-z", workloads=["nope"])


async def test_a_harness_without_its_topology_says_where_to_point_it(tmp_path: Path) -> None:
    """No broker is needed to hear that the topology directory is missing."""
    harness = Harness("amqp://guest:guest@127.0.0.1:1/", "rqt-x", tmp_path / "topology")
    with pytest.raises(ConfigError, match="set rabbitq_topology in the pytest ini"):
        await harness.start(app)
    await harness.close()
