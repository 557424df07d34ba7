"""The consumer as a process: signals, the grace period, and a connection closed under it.

Consumers run as `python -m rabbitq consume` subprocesses with the App in tests/broker/apps.py;
the handlers write start/done lines to a marker file, so the test sees what ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

from rabbitq import App, TaskContext
from rabbitq._topology import Workload
from tests.broker.apps import WORKLOAD, Slow, read_marks
from tests.helpers import drain_queue, queue_depth, running_consumer, wait_until

ROOT = Path(__file__).resolve().parents[2]
SPEC = {"capacity": 3, "retry": {"tiers": ["50ms"], "max_attempts": 2}}
TASKS = 6
SHUTDOWN_SLACK_SECONDS = 2.0


@contextlib.contextmanager
def consumer_process(
    url: str, directory: Path, namespace: str, grace: float, logs: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m rabbitq consume proc` in the background; killed on exit if still running."""
    with (logs / "stdout").open("wb") as out, (logs / "stderr").open("wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rabbitq",
                "consume",
                WORKLOAD,
                "--app",
                "tests.broker.apps:app",
                "--topology",
                str(directory),
                "--namespace",
                namespace,
                "--grace",
                str(grace),
            ],
            cwd=ROOT,
            env={**os.environ, "RABBITQ_URL": url},
            stdout=out,
            stderr=err,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def stderr_of(logs: Path) -> str:
    return (logs / "stderr").read_text(errors="replace")


async def publish_slow(
    namespace: str, url: str, task: str, seconds: float, marker: Path
) -> set[str]:
    """Publish TASKS tasks that each sleep `seconds`; their message ids."""
    app = App(namespace=namespace, url=url)

    @app.task(task, workload=WORKLOAD)
    async def slow(payload: Slow) -> None:
        pass

    try:
        return set(
            await app.publish_many(
                [slow.message(Slow(seconds=seconds, marker=str(marker))) for _ in range(TASKS)]
            )
        )
    finally:
        await app.close()


async def exited(proc: subprocess.Popen[bytes], within: float) -> int:
    await wait_until(lambda: proc.poll() is not None, timeout=within, what="the consumer to exit")
    return proc.returncode


async def queued_ids(connection: AbstractConnection, workload: Workload) -> set[str]:
    return {m.message_id or "" for m in await drain_queue(connection, workload.work_queue)}


@pytest.mark.parametrize("task", ["slow", "slow_sync"])
async def test_sigterm_finishes_running_tasks_and_returns_the_rest(
    task, make_topology, topology_dir, connection, url, namespace, tmp_path
):
    """On SIGTERM running tasks finish within the grace, the rest stay queued, and it exits 0."""
    topology = await make_topology(**{WORKLOAD: SPEC})
    workload = topology.workload(WORKLOAD)
    marker = tmp_path / "marks"
    ids = await publish_slow(namespace, url, task, 1.0, marker)
    grace = 5.0

    with consumer_process(
        url, topology_dir(**{WORKLOAD: SPEC}), namespace, grace, tmp_path
    ) as proc:
        await wait_until(
            lambda: len(read_marks(marker)[0]) >= 3, timeout=15, what="3 tasks to start"
        )
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        returncode = await exited(proc, grace + 10)
        # the grace bounds the wait for handlers; closing takes well under a second more
        assert time.monotonic() - signalled < grace + SHUTDOWN_SLACK_SECONDS

    assert returncode == 0, stderr_of(tmp_path)
    started, done = read_marks(marker)
    assert len(started) >= 3
    assert done == started, "a task that started did not finish within the grace"
    assert await queue_depth(connection, workload.work_queue) == TASKS - len(done)
    assert await queue_depth(connection, workload.parking_queue) == 0
    assert await queued_ids(connection, workload) == ids - done


@pytest.mark.parametrize(
    "task",
    [
        "slow",
        "slow_sync",
    ],
)
async def test_sigterm_returns_tasks_still_running_after_the_grace(
    task, make_topology, topology_dir, connection, url, namespace, tmp_path
):
    """Tasks running past a short grace go back to the queue, and the consumer exits 0."""
    topology = await make_topology(**{WORKLOAD: SPEC})
    workload = topology.workload(WORKLOAD)
    marker = tmp_path / "marks"
    ids = await publish_slow(namespace, url, task, 30.0, marker)
    grace = 0.5

    with consumer_process(
        url, topology_dir(**{WORKLOAD: SPEC}), namespace, grace, tmp_path
    ) as proc:
        await wait_until(
            lambda: len(read_marks(marker)[0]) == 3, timeout=15, what="3 tasks to start"
        )
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        returncode = await exited(proc, grace + 10)
        # the grace bounds the wait for handlers; closing takes well under a second more
        assert time.monotonic() - signalled < grace + SHUTDOWN_SLACK_SECONDS

    assert returncode == 0, stderr_of(tmp_path)
    assert "did not finish within" in stderr_of(tmp_path)
    assert read_marks(marker)[1] == set()
    assert await queue_depth(connection, workload.work_queue) == TASKS
    assert await queue_depth(connection, workload.parking_queue) == 0
    assert await queued_ids(connection, workload) == ids


async def test_a_second_signal_exits_at_once_and_loses_nothing(
    make_topology, topology_dir, connection, url, namespace, tmp_path
):
    """A second signal during the grace exits at once; the running tasks return to the queue."""
    topology = await make_topology(**{WORKLOAD: SPEC})
    workload = topology.workload(WORKLOAD)
    marker = tmp_path / "marks"
    ids = await publish_slow(namespace, url, "slow", 30.0, marker)
    grace = 30.0

    with consumer_process(
        url, topology_dir(**{WORKLOAD: SPEC}), namespace, grace, tmp_path
    ) as proc:
        await wait_until(
            lambda: len(read_marks(marker)[0]) == 3, timeout=15, what="3 tasks to start"
        )
        proc.send_signal(signal.SIGTERM)
        await wait_until(
            lambda: "SIGTERM: stopping" in stderr_of(tmp_path),
            timeout=5,
            what="the consumer to log the first signal",
        )
        proc.send_signal(signal.SIGINT)
        returncode = await exited(proc, 5)

    assert returncode != 0
    assert "second signal" in stderr_of(tmp_path)
    assert read_marks(marker)[1] == set()
    # Unacked deliveries return once the broker sees the socket close.
    await wait_until(
        lambda: _depth_is(connection, workload.work_queue, TASKS),
        timeout=10,
        what=f"all {TASKS} tasks to be back in the work queue",
    )
    assert await queue_depth(connection, workload.parking_queue) == 0
    assert await queued_ids(connection, workload) == ids


async def _depth_is(connection: AbstractConnection, queue: str, expected: int) -> bool:
    return await queue_depth(connection, queue) == expected


class Item(BaseModel):
    n: int


async def close_connections_named(fragment: str) -> int:
    """Force-close (as an operator would) every connection whose name contains `fragment`.

    Only this test's connections: `close_all_connections` would also cut the connections of
    other test runs sharing the broker.
    """
    listing = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "-q", "--no-table-headers"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    pids = [line.split("\t", 1)[0] for line in listing.stdout.splitlines() if fragment in line]
    for pid in pids:
        await asyncio.to_thread(
            subprocess.run,
            ["rabbitmqctl", "close_connection", pid, "test"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    return len(pids)


@pytest.mark.parametrize(
    "closed_connections",
    [
        pytest.param(["consumer"], id="consuming"),
        pytest.param(["consumer-publisher", "consumer"], id="consuming-and-publishing"),
        pytest.param(["all"], id="close_all_connections"),
    ],
)
async def test_a_forced_connection_close_mid_run_loses_nothing(
    closed_connections, make_topology, connection, url, namespace
):
    """After the broker closes the consumer's connections mid-run, it reconnects; all tasks run."""
    name = f"fc-{namespace}"  # unique: the consumer's connections are found by this name
    topology = await make_topology(
        **{name: {"capacity": 4, "retry": {"tiers": ["50ms"], "max_attempts": 3}}}
    )
    workload = topology.workload(name)
    total = 30
    app = App(namespace=namespace, url=url)
    completed: Counter[str] = Counter()
    redelivered: set[str] = set()
    closed = asyncio.Event()

    @app.task("record", workload=name)
    async def record(item: Item, ctx: TaskContext) -> None:
        if ctx.redelivered:
            redelivered.add(ctx.message_id)
        await asyncio.sleep(0.05)  # the handler's work
        if len(completed) >= 10:
            # Hold the in-flight deliveries until the connections are gone: the close is
            # then sure to hit a consumer with unacked deliveries.
            await closed.wait()
        completed[ctx.message_id] += 1

    flaky_attempts: list[int] = []

    @app.task("flaky", workload=name)
    async def flaky(item: Item, ctx: TaskContext) -> None:
        flaky_attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("fails on its first attempt")

    publisher = App(namespace=namespace, url=url)

    @publisher.task("record", workload=name)
    async def publish_record(item: Item) -> None:
        pass

    try:
        ids = set(
            await publisher.publish_many([publish_record.message(Item(n=n)) for n in range(total)])
        )
    finally:
        await publisher.close()

    async with running_consumer(app, workload, url) as consumer:
        await wait_until(lambda: len(completed) >= 10, what="10 tasks to complete")
        # The publishing connection (if closed) goes first and is seen closed before the
        # consuming one goes: a fixed order, so the outcome does not depend on a race.
        for kind in closed_connections:
            if kind == "all":
                # What an operator would run; it cuts this test's own connection too.
                await asyncio.to_thread(
                    subprocess.run,
                    ["rabbitmqctl", "close_all_connections", "test"],
                    capture_output=True,
                    timeout=30,
                    check=True,
                )
                connection = await reopen(url)
                continue
            assert await close_connections_named(f"{kind} {name} on ") == 1
            if kind == "consumer-publisher":
                await wait_until(
                    lambda: not consumer.publisher.is_connected,
                    what="the consumer's publisher to see its connection closed",
                )
        closed.set()
        await wait_until(
            lambda: consumer.reconnects >= 1 and consumer.ready.is_set(),
            timeout=5,
            what="the consumer to reconnect and consume again",
        )
        await wait_until(
            lambda: set(completed) == ids, timeout=15, what=f"all {total} tasks to complete"
        )
        # Its publishing connection works again: the publish below and the forward of the
        # failed attempt to the retry tier both go over it.
        await flaky.publish(Item(n=-1))
        await wait_until(lambda: flaky_attempts == [1, 2], what="the failed task to be retried")
        await wait_until(
            lambda: _depth_is(connection, workload.work_queue, 0), what="the work queue to empty"
        )

    duplicates = sum(completed.values()) - total
    if closed_connections == ["all"]:
        await connection.close()
        connection = await reopen(url)
    assert redelivered, "no delivery was in flight when the connections closed"
    assert 0 <= duplicates <= workload.capacity * consumer.reconnects, completed
    assert await queue_depth(connection, workload.work_queue) == 0
    assert await queue_depth(connection, workload.parking_queue) == 0
    for tier in workload.tiers:
        assert await queue_depth(connection, tier.queue) == 0
    if closed_connections == ["all"]:
        await connection.close()


async def reopen(url: str) -> AbstractConnection:
    """A new connection for the test's own checks after its first one was force-closed."""
    return await aio_pika.connect(url)
