"""`rabbitq status` against the real broker (issue #11, point 5): with tasks in every place
(ready, running, each retry tier, parked) its counts are the broker's, through typer's runner
and as a subprocess; without the management API it says so and still counts over AMQP; the
parking lot is left as it was; `--watch` refreshes until Ctrl-C and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import select
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from typer.testing import CliRunner

from rabbitq import _wire as wire
from rabbitq._cli import cli
from rabbitq._errors import ParkReason
from rabbitq._management import Management
from rabbitq._topology import Workload
from tests.broker.test_declare import ROOT, rabbitq_cli
from tests.helpers import drain_queue, queue_depth, wait_until

READY, RUNNING = 7, 3
IN_TIERS = {"5m": 2, "1h": 4}  # long delays: nothing leaves a tier while the test runs
PARKED_AGO = (300.0, 120.0, 60.0)  # seconds since each parked copy was parked, oldest first
PUBLISHED_AGO = 1000.0  # their timestamp property: older than the park, so not the age
NO_API = "http://127.0.0.1:1"
STATS_TIMEOUT_SECONDS = 20.0  # the management API counts every 5 s


def spec(queue_type: str) -> dict[str, Any]:
    return {
        "queue_type": queue_type,
        "capacity": 4,
        "retry": {"tiers": list(IN_TIERS), "max_attempts": 3},
    }


def expected_counts(consumers: int = 1, running: int | None = RUNNING) -> dict[str, Any]:
    return {
        "ready": READY,
        "running": running,
        "consumers": consumers,
        "tiers": IN_TIERS,
        "parked": len(PARKED_AGO),
    }


def counts_of(document: dict[str, Any]) -> dict[str, Any]:
    jobs = document["workloads"]["jobs"]
    return {key: jobs[key] for key in expected_counts()}


async def put_tasks_everywhere(
    connection: AbstractConnection, workload: Workload
) -> tuple[float, list[str]]:
    """READY + RUNNING tasks in the work queue, IN_TIERS in the tiers, PARKED_AGO parked (as
    rabbitq writes parked copies); when the oldest was parked, and the parked ids in order."""
    channel = await connection.channel(publisher_confirms=True)
    now = time.time()

    async def send(queue: str, message_id: str, **kw: Any) -> None:
        headers = kw.pop("headers", {wire.HEADER_ATTEMPT: 1})
        message = aio_pika.Message(
            b'{"n": 1}', message_id=message_id, type="jobs.t", headers=headers, **kw
        )
        await channel.default_exchange.publish(message, routing_key=queue)

    for i in range(READY + RUNNING):
        await send(workload.work_queue, f"w{i}")
    for tier in workload.tiers:
        for i in range(IN_TIERS[tier.label]):
            await send(tier.queue, f"{tier.label}-{i}")
    parked = [f"p{i}" for i in range(len(PARKED_AGO))]
    for message_id, ago in zip(parked, PARKED_AGO, strict=True):
        headers = wire.park_headers(
            {wire.HEADER_ATTEMPT: 3},
            reason=ParkReason.RETRIES_EXHAUSTED,
            error_type="ValueError",
            error_message="no such address",
            traceback="",
            attempts=3,
            first_failure_ms=None,
            failed_at=now - ago,
            host="test",
            workload="jobs",
        )
        await send(
            workload.parking_queue, message_id, headers=headers, timestamp=now - PUBLISHED_AGO
        )
    await channel.close()
    return now - PARKED_AGO[0], parked


@contextlib.asynccontextmanager
async def holding(
    connection: AbstractConnection, queue: str, n: int
) -> AsyncIterator[list[AbstractIncomingMessage]]:
    """A consumer that takes `n` deliveries of `queue` and never acks them (tasks running)."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=n)
    held: list[AbstractIncomingMessage] = []

    async def hold(message: AbstractIncomingMessage) -> None:
        held.append(message)

    await (await channel.get_queue(queue, ensure=False)).consume(hold)
    await wait_until(lambda: len(held) == n, timeout=5, what=f"{n} deliveries to be held")
    try:
        yield held
    finally:
        await channel.close()  # unacked: back to the queue


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    """`rabbitq ARGS` through typer's runner (in a thread: the command runs its own loop)."""
    result = CliRunner(env={"RABBITQ_MANAGEMENT_URL": None}).invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


async def status_json(url: str, *args: str | Path) -> dict[str, Any]:
    code, out, err = await asyncio.to_thread(run_cli, "status", "--json", "--url", url, *args)
    assert code == 0, err
    document: dict[str, Any] = json.loads(out)
    return document


async def caught_up(
    url: str, where: tuple[str | Path, ...], done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """`status --json` once `done` holds for it: the management API counts every 5 s."""
    seen: list[dict[str, Any]] = []

    async def check() -> bool:
        seen.append(await status_json(url, *where))
        return done(seen[-1])

    try:
        await wait_until(check, timeout=STATS_TIMEOUT_SECONDS, interval=0.5, what="stats")
    except AssertionError:
        raise AssertionError(f"status never matched the broker; last: {seen[-1]}") from None
    return seen[-1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_status_matches_the_broker_with_tasks_in_every_place(
    make_topology: Any,
    connection: AbstractConnection,
    url: str,
    namespace: str,
    topology_dir: Callable[..., Path],
    management: Management,
    queue_type: str,
) -> None:
    """Ready, running, consumers, each tier, parked and the oldest parked task's park time."""
    workload = (await make_topology(jobs=spec(queue_type))).workload("jobs")
    where = ("jobs", "--topology", topology_dir(jobs=spec(queue_type)), "--namespace", namespace)
    oldest, parked = await put_tasks_everywhere(connection, workload)
    async with holding(connection, workload.work_queue, RUNNING):
        document = await caught_up(
            url,
            where,
            lambda d: (
                counts_of(d) == expected_counts()
                and d["workloads"]["jobs"]["rates"] is not None
                and None not in d["workloads"]["jobs"]["rates"].values()
            ),
        )
        assert document["management"] is True
        jobs = document["workloads"]["jobs"]
        assert jobs["work_queue"] == workload.work_queue
        assert set(jobs["rates"]) == {
            "published_per_second",
            "delivered_per_second",
            "acked_per_second",
            "parked_per_second",
        }
        assert document["note"] is None
        # the head's park time (headers, to the ms), not its timestamp nor a later copy's
        assert jobs["oldest_parked_at"] == pytest.approx(oldest, abs=0.002)
        assert PARKED_AGO[0] <= jobs["oldest_parked_age_seconds"] < PARKED_AGO[0] + 30

        # as an operator runs it
        shell = await rabbitq_cli(url, "status", "--json", *where)
        assert shell.returncode == 0, shell.stderr
        assert counts_of(json.loads(shell.stdout)) == expected_counts()
        shown = await rabbitq_cli(url, "status", *where)
        assert shown.returncode == 0 and shown.stderr == "", shown.stderr
        lines = shown.stdout.splitlines()
        assert lines[0] == f"namespace {namespace}"
        table = [line.split() for line in lines[2:]]
        [work] = [row for row in table if row[1] == "work"]
        assert work[2:5] == [str(READY), str(RUNNING), "1"]
        tiers = [row for row in table if row[1] == "retry"]
        assert tiers == [["jobs", "retry", label, str(n)] for label, n in IN_TIERS.items()]
        [parking] = [row for row in table if row[1] == "parking"]
        assert parking[2] == str(len(PARKED_AGO))
        assert parking[3].startswith("5m")  # 300 s ago

    # Reading took nothing and moved nothing. (A quorum queue returns the held deliveries
    # through its log, a moment after their consumer has gone.)
    async def all_back() -> bool:
        return await queue_depth(connection, workload.work_queue) == READY + RUNNING

    await wait_until(all_back, timeout=10, what="the held tasks to be back in the work queue")
    assert [m.message_id for m in await drain_queue(connection, workload.parking_queue)] == parked


async def test_without_the_management_api_it_says_so_and_counts_over_amqp(
    make_topology: Any,
    connection: AbstractConnection,
    url: str,
    namespace: str,
    topology_dir: Callable[..., Path],
) -> None:
    """Ready, consumers, tiers and parked still come; running and rates are unknown, not 0."""
    workload = (await make_topology(jobs=spec("classic"))).workload("jobs")
    where = ("--topology", topology_dir(jobs=spec("classic")), "--namespace", namespace)
    oldest, _ = await put_tasks_everywhere(connection, workload)
    async with holding(connection, workload.work_queue, RUNNING):
        document = await status_json(url, "--management-url", NO_API, *where)
        assert document["management"] is False
        assert document["note"].startswith("running counts and rates are unknown: ")
        assert f"no management API at {NO_API}" in document["note"]
        assert counts_of(document) == expected_counts(running=None)
        jobs = document["workloads"]["jobs"]
        assert jobs["rates"] is None
        assert jobs["oldest_parked_at"] == pytest.approx(oldest, abs=0.002)

        shown = await rabbitq_cli(url, "status", "--management-url", NO_API, *where)
        assert shown.returncode == 0, shown.stderr
        [work] = [line.split() for line in shown.stdout.splitlines() if " work " in line]
        assert work == ["jobs", "work", str(READY), "?", "1", "?", "?", "?"]
        assert shown.stdout.splitlines()[-1].startswith("note: running counts and rates")


async def test_a_topology_not_applied_is_one_line_naming_topology_apply(
    url: str, namespace: str, topology_dir: Callable[..., Path]
) -> None:
    where = ("--topology", topology_dir(jobs=spec("classic")), "--namespace", namespace)
    shown = await rabbitq_cli(url, "status", "--management-url", NO_API, *where)
    assert shown.returncode == 1 and shown.stdout == ""
    assert shown.stderr == (
        f"error: queue '{namespace}.jobs.work' does not exist; run 'rabbitq topology apply' first\n"
    )


async def test_an_unknown_workload_is_a_usage_error(
    make_topology: Any, url: str, namespace: str, topology_dir: Callable[..., Path]
) -> None:
    await make_topology(jobs=spec("classic"))
    where = ("--topology", topology_dir(jobs=spec("classic")), "--namespace", namespace)
    code, out, err = await asyncio.to_thread(run_cli, "status", "nope", "--url", url, *where)
    assert code == 2 and out == ""
    assert err == "error: topology: workload = 'nope': no such workload (declared: jobs)\n"


async def _read_until(fd: int, done: Callable[[bytes], bool], timeout: float) -> bytes:  # noqa: ASYNC109 - a polling deadline
    """What the process wrote to `fd` until `done` holds for all of it."""

    def read() -> bytes:
        got = b""
        deadline = time.monotonic() + timeout
        while not done(got):
            if time.monotonic() > deadline:
                raise AssertionError(f"never got the output; got {got[-400:]!r}")
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    got += os.read(fd, 65536)
                except OSError:  # the pty closed: the process is gone
                    raise AssertionError(f"the output ended; got {got[-400:]!r}") from None
        return got

    return await asyncio.to_thread(read)


async def _spawn(url: str, *args: str | Path, stdout: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "rabbitq", *map(str, args)),
        cwd=ROOT,
        env={**os.environ, "RABBITQ_URL": url},
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_watch_on_a_terminal_redraws_in_place_until_ctrl_c(
    make_topology: Any,
    connection: AbstractConnection,
    url: str,
    namespace: str,
    topology_dir: Callable[..., Path],
) -> None:
    """Each frame starts at the cursor's home; Ctrl-C exits 0 with nothing on stderr."""
    workload = (await make_topology(jobs=spec("classic"))).workload("jobs")
    await put_tasks_everywhere(connection, workload)
    where = ("--topology", topology_dir(jobs=spec("classic")), "--namespace", namespace)
    terminal, child_side = pty.openpty()
    args = ("status", "--watch", "--interval", "0.2", "--management-url", NO_API, *where)
    watching = await _spawn(url, *args, stdout=child_side)
    os.close(child_side)
    try:
        seen = await _read_until(terminal, lambda got: got.count(b"\x1b[H") >= 3, timeout=20)
    finally:
        watching.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(watching.communicate(), timeout=10)
        os.close(terminal)
    assert watching.returncode == 0 and err == b"", err
    frames = seen.split(b"\x1b[H")[1:]
    assert seen.startswith(b"\x1b[2J\x1b[H")  # the first frame clears the screen
    assert b"every 0.2s, Ctrl-C to stop" in frames[1]
    [work] = [line for line in frames[1].split(b"\n") if b" work " in line]
    assert work.split()[:4] == [b"jobs", b"work", str(READY + RUNNING).encode(), b"?"]


async def test_watch_into_a_pipe_prints_a_document_per_interval_until_ctrl_c(
    make_topology: Any,
    connection: AbstractConnection,
    url: str,
    namespace: str,
    topology_dir: Callable[..., Path],
) -> None:
    """With --json one document a line, no escape codes; Ctrl-C exits 0 quietly."""
    workload = (await make_topology(jobs=spec("classic"))).workload("jobs")
    await put_tasks_everywhere(connection, workload)
    where = ("--topology", topology_dir(jobs=spec("classic")), "--namespace", namespace)
    args = ("status", "--watch", "--json", "--interval", "0.2", "--management-url", NO_API)
    watching = await _spawn(url, *args, *where, stdout=asyncio.subprocess.PIPE)
    assert watching.stdout is not None
    try:
        lines = [await asyncio.wait_for(watching.stdout.readline(), timeout=20) for _ in range(3)]
    finally:
        watching.send_signal(signal.SIGINT)
        rest, err = await asyncio.wait_for(watching.communicate(), timeout=10)
    assert watching.returncode == 0 and err == b"", err
    for line in lines:
        assert b"\x1b" not in line
        assert json.loads(line)["workloads"]["jobs"]["ready"] == READY + RUNNING
    assert all(json.loads(line) for line in rest.splitlines())  # whole documents only
