"""Fault injection with the ledger: whatever breaks, every confirmed task completes or is parked.

Each test publishes tasks with unique ids through `tests.ledger.LedgerPublisher`, runs consumers
(`python -m rabbitq consume --app tests.ledger_app:app`, mostly as subprocesses), injects one
kind of fault, then reads the ledger and the broker: `lost` must be 0, the work queue and tiers
empty, and the report line (`tasks=... faults={...} lost=0 duplicated=... parked=...`) is
printed (`pytest -s` shows it). Faults that stop the broker or raise an alarm always restore it
in a `finally`: other test runs share the broker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rabbitq import ConnectionFailed, NotConfirmed
from rabbitq._topology import Topology, Workload
from tests.helpers import wait_until
from tests.ledger import (
    TASK,
    TASK_SHORT,
    TASK_SYNC,
    ConsumerProcess,
    Ledger,
    LedgerPublisher,
    LedgerReport,
    QueueProbe,
    actl,
    broker_stopped,
    check,
    close_all_connections,
    close_connections_named,
    memory_alarm,
    task_ids,
)

SPEC: dict[str, Any] = {"capacity": 8, "retry": {"tiers": ["50ms"], "max_attempts": 3}}


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger.create(tmp_path / "ledger.db")
    yield ledger
    ledger.close()


@pytest.fixture
def name(namespace: str) -> str:
    """A workload name unique to the test, so its connections can be found by name."""
    return f"lg-{namespace}"


@pytest.fixture
async def setup(
    make_topology: Callable[..., Any], topology_dir: Callable[..., Path], name: str
) -> Callable[..., Any]:
    """`await setup(**spec)`: applies the workload and writes its topology directory."""

    async def make(**spec: Any) -> tuple[Workload, Path]:
        topology: Topology = await make_topology(**{name: spec})
        return topology.workload(name), topology_dir(**{name: spec})

    return make


@pytest.fixture
async def publisher(
    ledger: Ledger, url: str, namespace: str, name: str
) -> AsyncIterator[LedgerPublisher]:
    publisher = LedgerPublisher(ledger, url, namespace, name, confirm_timeout=5.0)
    yield publisher
    await publisher.close()


@pytest.fixture
def consumers(
    name: str, namespace: str, url: str, tmp_path: Path
) -> Iterator[Callable[..., ConsumerProcess]]:
    """`consumers(topology_dir, **options)` makes a ConsumerProcess, killed at the end."""
    made: list[ConsumerProcess] = []

    def make(topology: Path, **options: Any) -> ConsumerProcess:
        options.setdefault("label", f"consumer{len(made) + 1}")
        process = ConsumerProcess(
            name, topology, namespace, options.pop("url", url), tmp_path, **options
        )
        made.append(process)
        return process

    yield make
    for process in made:
        process.close()


def completed(ledger: Ledger, count: int) -> Callable[[], bool]:
    """A condition: at least `count` ids completed."""
    return lambda: ledger.completed_ids() >= count


def lost_connection(consumer: ConsumerProcess, times: int) -> Callable[[], bool]:
    """A condition: the consumer has logged `times` lost connections."""
    return lambda: consumer.stderr().count("connection lost") >= times


def report_line(test: str, report: LedgerReport) -> None:
    print(f"\n{test}: {report}")


async def drain(consumer: ConsumerProcess, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    """Run a `--burst` consumer until it has emptied the queues; it must exit 0."""
    consumer.start()
    code = await consumer.exited(timeout)
    assert code == 0, consumer.stderr()[-3000:]


async def stop_and_drain(
    running: list[ConsumerProcess], make: Callable[..., ConsumerProcess], directory: Path
) -> None:
    """The consumers survived the fault: SIGTERM each (it must exit 0), then drain what is left.

    Every id completed does not mean every copy was settled: a copy of a completed task may
    still be queued (it came back unsettled); the `--burst` consumer runs it, as a duplicate.
    """
    for consumer in running:
        assert consumer.alive, f"{consumer.label} died: {consumer.stderr()[-3000:]}"
        assert await consumer.stop() == 0, consumer.stderr()[-3000:]
    await drain(make(directory, burst=True, label="final"))


@pytest.mark.slow
async def test_sigkill_of_a_running_consumer_repeatedly_loses_nothing(
    setup, ledger, publisher, consumers, url
):
    """A consumer SIGKILLed 3 times mid-run, restarted each time: every task completes."""
    workload, directory = await setup(**SPEC)
    total = 240
    messages = [
        publisher.message(
            i,
            task=TASK_SYNC if n % 3 == 0 else TASK,
            sleep_ms=40,
            fail_first_attempts=1 if n % 7 == 0 else 0,
        )
        for n, i in enumerate(task_ids("kill", total))
    ]
    assert await publisher.publish(messages) == []
    consumer = consumers(directory)
    kills = 3
    for k in range(1, kills + 1):
        consumer.start()
        # Mid-run: a share of the tasks done, and many more queued or running.
        target = total * k // (kills + 2)
        await wait_until(completed(ledger, target), timeout=15, what=f"{target} tasks to complete")
        assert consumer.kill() == -9
        ledger.fault("sigkill")
    await drain(consumers(directory, burst=True, label="final"))

    report = await check(ledger, url, workload)
    report_line("sigkill", report)
    assert report.lost == 0, report.details()
    assert report.ok, report.details()
    assert report.completed == total
    assert report.parked == 0, report.details()
    assert ledger.cut_off(), "no kill hit a running handler"
    assert len(ledger.pids()) == kills + 1
    # Only a task running (or done but not yet acked) when its process died runs twice.
    assert report.duplicated <= kills * workload.capacity * 2, report.details()


async def publish_stream(
    publisher: LedgerPublisher,
    probe: QueueProbe,
    prefix: str,
    *,
    after_failure: int = 60,
    cap: int = 3000,
    window: int = 150,
    chunk: int = 10,
    **fields: Any,
) -> int:
    """Publish new tasks chunk by chunk, retrying what raises, until `after_failure` more were
    confirmed after the first failure (or `cap` in all); at most about `window` stay queued.

    Returns how many were published.
    """
    published = 0
    confirmed_at_failure: int | None = None
    while published < cap:
        if confirmed_at_failure is None and publisher.stats.raised:
            confirmed_at_failure = publisher.stats.confirmed
        if (
            confirmed_at_failure is not None
            and publisher.stats.confirmed - confirmed_at_failure >= after_failure
        ):
            break
        await wait_until(lambda: probe.below(window), timeout=60, what="the backlog to shrink")
        messages = [
            publisher.message(i, fail_first_attempts=1 if n % 9 == 0 else 0, **fields)
            for n, i in enumerate(task_ids(prefix, chunk, start=published), start=published)
        ]
        unconfirmed = await publisher.publish(messages, deadline_seconds=60)
        assert unconfirmed == [], f"{len(unconfirmed)} tasks were never confirmed"
        published += chunk
    return published


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_rabbitmq_restart_mid_load_loses_nothing(setup, ledger, publisher, consumers, url):
    """stop_app/start_app with two consumers and a publisher running: every task completes."""
    workload, directory = await setup(**{**SPEC, "capacity": 4})
    running = [consumers(directory), consumers(directory)]
    for consumer in running:
        consumer.start()
    probe = QueueProbe(url, workload.work_queue)
    stream = asyncio.create_task(publish_stream(publisher, probe, "restart", sleep_ms=25))
    try:
        await wait_until(completed(ledger, 60), timeout=20, what="60 tasks to complete")
        async with broker_stopped(url, ledger):
            # stop_app has returned: every handler was cut off, so any completion from now on
            # happens after the restart.
            stopped = time.time()
            await wait_until(
                lambda: sum(publisher.stats.raised.values()) > 0,
                timeout=20,
                what="a publish to fail while the broker is away",
            )
            await wait_until(
                lambda: all("connection lost" in c.stderr() for c in running),
                timeout=20,
                what="both consumers to see their connection lost",
            )
        total = await asyncio.wait_for(stream, timeout=60)
    finally:
        stream.cancel()
        await probe.close()
    await wait_until(
        lambda: all(c.stderr().count(f"consuming {workload.work_queue}") >= 2 for c in running),
        timeout=30,
        what="both consumers to consume again",
    )
    await wait_until(
        lambda: any(done_since(ledger, c.pid, stopped) for c in running),
        timeout=30,
        what="the consumers to complete tasks again",
    )
    await stop_and_drain(running, consumers, directory)

    report = await check(ledger, url, workload)
    report_line("rabbitmq restart", report)
    assert report.lost == 0, report.details()
    assert report.ok, report.details()
    assert report.completed == total
    assert publisher.stats.raised, "no publish met the outage"


@pytest.mark.slow
async def test_all_connections_force_closed_mid_run_loses_nothing(
    setup, ledger, publisher, consumers, url, tmp_path
):
    """close_all_connections mid-run: the consumer reconnects and every task completes."""
    workload, directory = await setup(**SPEC)
    total, ungated = 200, 50
    gate = tmp_path / "gate"
    # After the first 50, tasks wait at the gate: some are surely running when the close comes.
    messages = [
        publisher.message(
            i,
            sleep_ms=30,
            fail_first_attempts=1 if n % 7 == 0 else 0,
            gate=str(gate) if n >= ungated else "",
        )
        for n, i in enumerate(task_ids("closeall", total))
    ]
    assert await publisher.publish(messages) == []
    consumer = consumers(directory)
    consumer.start()
    await wait_until(
        lambda: len(running_now(ledger)) >= workload.capacity,
        timeout=15,
        what="the consumer to fill its capacity at the gate",
    )
    try:
        await close_all_connections(ledger)
        closed = time.time()
        await wait_until(
            lambda: "connection lost" in consumer.stderr(),
            timeout=10,
            what="the consumer to see its connection closed",
        )
    finally:
        gate.touch()
    await wait_until(
        lambda: done_since(ledger, consumer.pid, closed),
        timeout=20,
        what="the consumer to complete tasks again",
    )
    await stop_and_drain([consumer], consumers, directory)
    summary = consumer.summary()

    report = await check(ledger, url, workload)
    report_line("close_all_connections", report)
    assert report.lost == 0, report.details()
    assert report.ok, report.details()
    assert report.completed == total
    assert summary["reconnects"] >= 1, summary
    # Deliveries in flight when the connection closed came back, and ran again.
    assert summary["outcomes"].get("redelivered", 0) >= 1, summary


@pytest.mark.slow
async def test_publishing_while_the_broker_is_away_raises_and_never_confirms(
    setup, ledger, publisher, consumers, url, namespace, name
):
    """With the broker stopped a publish raises within seconds; afterwards it works again."""
    workload, directory = await setup(**SPEC)
    assert await publisher.publish([publisher.message(i) for i in task_ids("before", 20)]) == []
    away = [publisher.message(i) for i in task_ids("away", 20)]
    fresh = LedgerPublisher(ledger, url, namespace, name, confirm_timeout=2.0, name="fresh")
    try:
        async with broker_stopped(url, ledger):
            # A publisher that was connected, one that never was, and the App's own publish.
            for sender in (publisher, fresh):
                started = time.monotonic()
                errors = await sender.send(away)
                assert all(isinstance(e, ConnectionFailed | NotConfirmed) for e in errors), errors
                assert time.monotonic() - started < 15
            started = time.monotonic()
            with pytest.raises((ConnectionFailed, NotConfirmed)):
                await fresh.app.publish_many(away[:1])
            assert time.monotonic() - started < 15
            assert ledger.published(confirmed=False) == {m.message_id for m in away}
    finally:
        await fresh.close()
    # The same publishers work again once the broker is back.
    assert await fresh.publish(away[:10], deadline_seconds=30) == []
    assert await publisher.publish(away[10:], deadline_seconds=30) == []
    await drain(consumers(directory, burst=True))

    report = await check(ledger, url, workload)
    report_line("publish while away", report)
    assert report.lost == 0, report.details()
    assert report.ok, report.details()
    assert report.tasks == report.completed == 40
    # Nothing sent while the broker was away landed: no task ran twice.
    assert report.duplicated == 0, report.details()


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_memory_alarm_blocks_publishing_and_loses_nothing(
    setup, ledger, publisher, consumers, url, name, tmp_path
):
    """Under a memory alarm publishes raise NotConfirmed and consuming goes on; all complete."""
    workload, directory = await setup(**{**SPEC, "capacity": 4})
    gate = tmp_path / "gate"
    # The running tasks wait at the gate until the alarm is on; the first ones succeed (so
    # consuming is seen to go on), then some fail (so retry copies meet the alarm).
    first = [
        publisher.message(
            i, sleep_ms=10, gate=str(gate), fail_first_attempts=1 if n >= 20 and n % 5 == 0 else 0
        )
        for n, i in enumerate(task_ids("first", 60))
    ]
    assert await publisher.publish(first) == []
    consumer = consumers(directory)
    consumer.start()
    await wait_until(
        lambda: ledger.count("start") >= workload.capacity,
        timeout=15,
        what="the consumer to start its first tasks",
    )
    blocked = LedgerPublisher(
        ledger,
        url,
        publisher.app.require_namespace(),
        name,
        confirm_timeout=1.0,
        name="blocked-publisher",
    )
    during = [publisher.message(i) for i in task_ids("alarm", 20)]
    try:
        await blocked.publisher.start()
        async with memory_alarm(ledger):
            alarm_at = time.time()
            started = time.monotonic()
            errors = await blocked.send(during)
            assert all(isinstance(e, NotConfirmed) for e in errors), errors
            assert time.monotonic() - started < 10
            assert ledger.count("done") == 0
            gate.touch()
            # Consuming goes on (a connection that only consumes is not blocked) ...
            await wait_until(
                lambda: ledger.count("done") > 0,
                timeout=10,
                what="a task to complete during the alarm",
            )
            # ... but a failed task's retry copy cannot be confirmed. Cut the consumer's
            # blocked publishing connection under it: the copy is gone, the original must stay.
            await wait_until(
                lambda: failed_since(ledger, alarm_at),
                timeout=10,
                what="a task to fail during the alarm",
            )
            assert await close_connections_named(f"consumer-publisher {name} on ") == 1
            await wait_until(
                lambda: "could not be moved" in consumer.stderr(),
                timeout=10,
                what="the consumer to return the task it could not forward",
            )
        # Once the alarm is over, send again what was never confirmed (same ids).
        cleared = time.time()
        assert await publisher.publish(during, deadline_seconds=30) == []
    finally:
        gate.touch()
        await blocked.close()
    total = len(first) + len(during)
    await wait_until(
        lambda: done_since(ledger, consumer.pid, cleared),
        timeout=20,
        what="the consumer to complete tasks after the alarm",
    )
    await stop_and_drain([consumer], consumers, directory)

    report = await check(ledger, url, workload)
    report_line("memory alarm", report)
    assert report.lost == 0, report.details()
    assert report.ok, report.details()
    assert report.completed == total


def done_since(ledger: Ledger, pid: int, since: float) -> bool:
    """Process `pid` completed a task at or after `since` (it works again)."""
    return any(e.pid == pid and e.at >= since for e in ledger.executions("done"))


def running_now(ledger: Ledger) -> set[str]:
    """Ids with a run started and not ended (waiting at a gate, say)."""
    return ledger.cut_off() - set(ledger.completed())


def failed_since(ledger: Ledger, since: float) -> bool:
    return any(e.at >= since for e in ledger.executions("failed"))


async def test_a_hanging_handler_is_timed_out_and_retried(setup, ledger, publisher, consumers, url):
    """A handler that hangs is ended by its timeout: retried, then parked with HandlerTimeout."""
    workload, directory = await setup(**SPEC)
    max_attempts = SPEC["retry"]["max_attempts"]
    messages = [publisher.message(i, sleep_ms=10) for i in task_ids("valid", 20)]
    messages += [
        publisher.message("hangs-always", task=TASK_SHORT, behaviour="hang"),
        publisher.message("hangs-once", task=TASK_SHORT, behaviour="hang", behaviour_attempts=1),
    ]
    assert await publisher.publish(messages) == []
    consumer = consumers(directory, burst=True)
    await drain(consumer)

    report = await check(ledger, url, workload)
    report_line("hanging handler", report)
    assert report.lost == 0, report.details()
    assert report.ok, report.details()
    assert report.completed == 21
    assert [(p.id, p.reason, p.error_type) for p in report.parked_copies] == [
        ("hangs-always", "retries_exhausted", "HandlerTimeout")
    ]
    hangs = [(e.id, e.attempt) for e in ledger.executions("hang")]
    assert sorted(hangs) == [("hangs-always", a) for a in range(1, max_attempts + 1)] + [
        ("hangs-once", 1)
    ]
    assert [e.attempt for e in ledger.executions("done") if e.id == "hangs-once"] == [2]
    assert len(ledger.pids()) == 1, "the consumer process was replaced"


@pytest.mark.slow
async def test_an_async_handler_blocking_the_loop_past_the_heartbeat_loses_nothing(
    setup, ledger, publisher, consumers, url
):
    """A loop blocked past the heartbeat: the consumer logs, counts, reconnects, loses none."""
    workload, directory = await setup(**{**SPEC, "capacity": 4})
    messages = [publisher.message(i, sleep_ms=20) for i in task_ids("valid", 40)]
    # 5s without a heartbeat: the broker gives up on a 1s-heartbeat connection after 2-3s.
    messages.insert(
        10, publisher.message("blocker", behaviour="block_loop", block_ms=5000, behaviour_once=True)
    )
    assert await publisher.publish(messages) == []
    consumer = consumers(directory, burst=True, url=f"{url}?heartbeat=1")
    await drain(consumer, timeout=25)
    summary = consumer.summary()
    ledger.fault("loop_blocked")

    report = await check(ledger, url, workload)
    report_line("blocked event loop", report)
    assert report.lost == 0, report.details()
    assert report.ok, report.details()
    assert report.completed == 41
    log = consumer.stderr()
    assert "the event loop was blocked for" in log
    assert summary["outcomes"].get("loop_blocked", 0) >= 1, summary
    assert summary["reconnects"] >= 1, f"the broker did not drop the connection: {summary}"
    assert "connection lost" in log


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_consumer_stopped_past_its_heartbeat_resumes_without_an_unretrieved_error(
    setup, ledger, publisher, consumers, url, name
):
    """SIGSTOP past the heartbeat with acks due, then SIGCONT, 3 times: no error, none lost."""
    workload, directory = await setup(**{**SPEC, "capacity": 16})
    total, pauses = 900, 3
    messages = [publisher.message(i, sleep_ms=5) for i in task_ids("paused", total)]
    assert await publisher.publish(messages) == []
    consumer = consumers(directory, url=f"{url}?heartbeat=1")
    consumer.start()
    for pause in range(1, pauses + 1):
        # Mid-run: handlers finishing all the time, so acks are due when the process stops.
        target = total * pause // (pauses + 2)
        await wait_until(completed(ledger, target), timeout=20, what=f"{target} tasks to complete")
        os.kill(consumer.pid, signal.SIGSTOP)
        try:
            await wait_until(
                lambda: _not_listed(f"consumer {name} on "),
                timeout=20,
                what="the broker to drop the stopped consumer's connection",
            )
        finally:
            os.kill(consumer.pid, signal.SIGCONT)
        ledger.fault("sigstop")
        await wait_until(
            lost_connection(consumer, times=pause),
            timeout=15,
            what="the resumed consumer to see its connection lost",
        )
    await wait_until(completed(ledger, total), timeout=30, what="every task to complete")
    await stop_and_drain([consumer], consumers, directory)

    report = await check(ledger, url, workload)
    report_line("sigstop past the heartbeat", report)
    assert report.lost == 0, report.details()
    assert report.ok, report.details()
    assert report.completed == total
    log = consumer.stderr()
    assert "Task exception was never retrieved" not in log, log[-3000:]
    assert " ERROR asyncio" not in log, log[-3000:]


async def _not_listed(fragment: str) -> bool:
    listing = await actl("list_connections", "client_properties", "-q", "--no-table-headers")
    return fragment not in listing


@pytest.mark.slow
async def test_a_handler_outliving_its_channel_is_never_acked_on_the_next_one(
    setup, ledger, publisher, consumers, url, name, tmp_path
):
    """A handler that ignores its cancellation returns after the reconnect: its ack is dropped."""
    # Capacity 1 makes the delivery tags known. First channel: n0 is tag 1, the stubborn task
    # tag 2. Second channel: the stubborn task (redelivered, recounted, acked) is tag 1 and
    # gated-000000 tag 2, so an ack of the old tag 2 sent there would settle gated-000000.
    workload, directory = await setup(**{**SPEC, "capacity": 1})
    stubborn_gate, gate = tmp_path / "stubborn-gate", tmp_path / "gate"
    messages = [
        publisher.message("n0"),
        publisher.message(
            "stubborn", behaviour="stubborn", behaviour_once=True, gate=str(stubborn_gate)
        ),
    ]
    messages += [publisher.message(i, gate=str(gate)) for i in task_ids("gated", 3)]
    assert await publisher.publish(messages) == []
    consumer = consumers(directory)
    consumer.start()
    try:
        await wait_until(
            lambda: has_event(ledger, "stubborn", "stubborn"),
            timeout=15,
            what="the stubborn task to start",
        )
        assert await close_connections_named(f"consumer {name} on ") == 1
        ledger.fault("connection_closed")
        await wait_until(
            lambda: has_event(ledger, "stubborn", "ignored_cancel"),
            timeout=10,
            what="the stubborn task to ignore its cancellation",
        )
        await wait_until(
            lambda: has_event(ledger, "gated-000000", "start"),
            timeout=15,
            what="the next task to run on the new channel",
        )
        stubborn_gate.touch()  # the old handler returns now, and its delivery is settled
        await wait_until(
            lambda: has_event(ledger, "stubborn", "done"),
            timeout=10,
            what="the stubborn task to return",
        )
        await wait_until(
            lambda: stale_settled(consumer, ledger),
            timeout=15,
            what="the stubborn task's ack to be dropped (or sent on the new channel)",
        )
        # Kill the consumer while gated-000000 runs: if the old ack settled it, it is gone.
        consumer.kill()
        ledger.fault("sigkill")
    finally:
        stubborn_gate.touch()
        gate.touch()
    await drain(consumers(directory, burst=True, label="final"))

    report = await check(ledger, url, workload)
    report_line("handler outliving its channel", report)
    assert report.lost == 0, report.details()
    assert report.ok, report.details()
    assert report.completed == 5
    assert "message stubborn not acked: its channel is closed" in consumer.stderr()


def has_event(ledger: Ledger, task_id: str, event: str) -> bool:
    return any(e.id == task_id for e in ledger.executions(event))


def stale_settled(consumer: ConsumerProcess, ledger: Ledger) -> bool:
    """The consumer dropped the old delivery's ack and said so; or that ack settled
    gated-000000 on the new channel, which let the broker send the next task (prefetch 1)."""
    return "message stubborn not acked" in consumer.stderr() or has_event(
        ledger, "gated-000001", "start"
    )


@pytest.mark.slow
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_task_that_kills_its_consumer_is_parked_as_crash_loop(
    queue_type, setup, ledger, publisher, consumers, url
):
    """A task that exits its process is parked as crash_loop after max_redeliveries runs."""
    max_redeliveries = 3
    # Capacity 1: no other task is running when the process dies, so none shares the blame.
    workload, directory = await setup(
        queue_type=queue_type,
        capacity=1,
        max_redeliveries=max_redeliveries,
        retry={"tiers": ["50ms"], "max_attempts": 3},
    )
    messages = [publisher.message(i) for i in task_ids("before", 5)]
    messages.append(publisher.message("poison", behaviour="exit"))
    messages += [publisher.message(i) for i in task_ids("after", 5)]
    assert await publisher.publish(messages) == []

    # A supervisor: restart the consumer whenever it dies, a bounded number of times.
    consumer = consumers(directory, burst=True)
    for _ in range(max_redeliveries + 3):
        consumer.start()
        if await consumer.exited(20) == 0:
            break
        ledger.fault("crash")
    else:
        pytest.fail(f"the consumer kept dying: exit codes {consumer.exit_codes}")

    report = await check(ledger, url, workload)
    report_line(f"crash loop ({queue_type})", report)
    assert report.lost == 0, report.details()
    assert report.ok, report.details()
    assert report.completed == 10
    assert consumer.exit_codes == [1] * max_redeliveries + [0]
    assert [e.id for e in ledger.executions("exit")] == ["poison"] * max_redeliveries
    [parked] = report.parked_copies
    assert (parked.id, parked.reason) == ("poison", "crash_loop")
    assert parked.headers["rabbitq-park-reason"] == "crash_loop"
