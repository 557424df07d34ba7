"""Reading the parking lot (issue #11, first part): nothing moves, filters and groups select
exactly the right tasks, and the CLI prints them.

Tasks are parked by a real consumer whose handlers fail at three places: two call sites of
ValueError (in different functions) and a KeyError, with a different message per task.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel
from typer.testing import CliRunner, Result

from rabbitq import App
from rabbitq import _declare as declare
from rabbitq import _parking as parking
from rabbitq._cli import cli
from rabbitq._topology import PARKING_DELIVERY_LIMIT, Topology, Workload, parse_topology
from tests.broker.conftest import toml_for
from tests.broker.test_declare import rabbitq_cli
from tests.helpers import drain_queue, queue_depth, running_consumer, wait_until

PER_SITE = 40


class Item(BaseModel):
    n: int


def check_name(n: int) -> None:
    raise ValueError(f"name {n} is not valid")


def check_size(n: int) -> None:
    raise ValueError(f"size {n} is too big")


async def park_three_kinds(
    make_topology: Any,
    connection: AbstractConnection,
    url: str,
    namespace: str,
    **extra: Any,
) -> tuple[Topology, Workload, App]:
    spec = {"capacity": 16, "retry": {"tiers": ["50ms"], "max_attempts": 1}, **extra}
    topology = await make_topology(jobs=spec)
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)

    @app.task("jobs.name", workload="jobs")
    async def name(item: Item) -> None:
        check_name(item.n)

    @app.task("jobs.size", workload="jobs")
    async def size(item: Item) -> None:
        if item.n % 2:
            check_size(item.n)
        raise KeyError(f"missing {item.n}")

    messages = [name.message(Item(n=n)) for n in range(PER_SITE)]
    messages += [size.message(Item(n=n)) for n in range(2 * PER_SITE)]
    async with running_consumer(app, workload, url):
        await app.publish_many(messages)
        await wait_until(
            lambda: _depth(connection, workload.parking_queue, 3 * PER_SITE),
            timeout=20,
            what="every task to be parked",
        )
    await app.close()
    return topology, workload, app


async def _depth(connection: AbstractConnection, name: str, depth: int) -> bool:
    return await queue_depth(connection, name) == depth


async def test_browsing_leaves_the_parking_lot_as_it_was_and_groups_by_failure_site(
    make_topology, connection, url, namespace
):
    _, workload, _ = await park_three_kinds(make_topology, connection, url, namespace)
    first = await parking.browse(url, workload)
    second = await parking.browse(url, workload)
    assert len(first) == 3 * PER_SITE
    assert [t.message_id for t in first] == [t.message_id for t in second]

    found = parking.groups(first)
    assert sorted((g.task, g.error_type, g.count) for g in found) == [
        ("jobs.name", "ValueError", PER_SITE),
        ("jobs.size", "KeyError", PER_SITE),
        ("jobs.size", "ValueError", PER_SITE),
    ]
    by_site = {(g.task, g.error_type): g for g in found}
    assert by_site["jobs.name", "ValueError"].where.endswith(":check_name")
    assert by_site["jobs.size", "ValueError"].where.endswith(":check_size")

    now = time.time()
    size_errors = parking.Filter(task="jobs.size", error_type="ValueError")
    assert len(parking.select(first, size_errors, now)) == PER_SITE
    group = by_site["jobs.size", "KeyError"].fingerprint
    chosen = parking.select(first, parking.Filter(group=group), now)
    assert {t.error_type for t in chosen} == {"KeyError"} and len(chosen) == PER_SITE
    assert parking.select(first, parking.Filter(reason="retries_exhausted"), now) == first
    assert parking.select(first, parking.Filter(parked_within=3600), now) == first
    one = first[7].message_id
    assert [
        t.message_id for t in parking.select(first, parking.Filter(ids=frozenset({one})), now)
    ] == [one]

    # Nothing was taken or reordered: the copies come out in the order browsing saw.
    left = await drain_queue(connection, workload.parking_queue)
    assert [m.message_id for m in left] == [t.message_id for t in first]


async def test_the_cli_lists_groups_and_shows_a_parked_task(
    make_topology: Any, connection: AbstractConnection, url: str, namespace: str, tmp_path: Path
) -> None:
    spec = {"capacity": 16, "retry": {"tiers": ["50ms"], "max_attempts": 1}}
    await park_three_kinds(make_topology, connection, url, namespace)
    (tmp_path / "test.toml").write_text(toml_for({"jobs": spec}))
    where = ("--topology", tmp_path, "--namespace", namespace)

    listed = await rabbitq_cli(url, "parking", "list", "jobs", "--json", "--limit", "500", *where)
    assert listed.returncode == 0, listed.stderr
    tasks = json.loads(listed.stdout)
    assert len(tasks) == 3 * PER_SITE and tasks[0]["reason"] == "retries_exhausted"

    grouped = await rabbitq_cli(url, "parking", "list", "jobs", "--groups", *where)
    assert grouped.returncode == 0, grouped.stderr
    assert len(grouped.stdout.splitlines()) == 3

    shown = await rabbitq_cli(url, "parking", "show", "jobs", tasks[0]["message_id"], *where)
    assert shown.returncode == 0, shown.stderr
    assert "traceback:" in shown.stdout and '"n":' in shown.stdout

    missing = await rabbitq_cli(url, "parking", "show", "jobs", "no-such-id", *where)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no parked task")
    assert await queue_depth(connection, f"{namespace}.jobs.parking") == 3 * PER_SITE

    # The same commands through typer's runner (off the loop: the CLI runs its own).
    options = ["--url", url, "--topology", str(tmp_path), "--namespace", namespace]

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, [*args, *options])

    groups = await asyncio.to_thread(invoke, "parking", "list", "jobs", "--groups", "--json")
    assert groups.exit_code == 0, groups.output
    assert sorted(g["count"] for g in json.loads(groups.stdout)) == [PER_SITE] * 3
    fingerprint = json.loads(groups.stdout)[0]["fingerprint"]
    dry = await asyncio.to_thread(
        invoke, "parking", "replay", "jobs", "--group", fingerprint, "--dry-run", "--json"
    )
    assert dry.exit_code == 0, dry.output
    assert len(json.loads(dry.stdout)["would_replay"]) == PER_SITE
    refused = await asyncio.to_thread(invoke, "parking", "purge", "jobs", "--all")
    assert refused.exit_code == 2 and "--yes" in refused.stderr
    assert await queue_depth(connection, f"{namespace}.jobs.parking") == 3 * PER_SITE


async def test_a_task_whose_expiration_ran_out_in_the_work_queue_lists_as_expired(
    make_topology: Any, connection: AbstractConnection, url: str, namespace: str, tmp_path: Path
) -> None:
    """A publisher's own AMQP `expiration` runs out while the task waits (no consumer): the
    broker dead-letters it into the parking lot with `x-death` only, and `parking list` says
    what happened, not a blank reason."""
    spec: dict[str, Any] = {}
    topology = await make_topology(jobs=spec)
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)

    @app.task("jobs.quick", workload="jobs")
    async def quick(item: Item) -> None: ...

    message = quick.message(Item(n=1), idempotency_key="quick-1")
    channel = await connection.channel()
    try:
        exchange = await channel.get_exchange(message.exchange, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                message.body,
                message_id=message.message_id,
                type=message.task,
                headers=dict(message.headers),
                expiration=0.05,
            ),
            routing_key=message.routing_key,
        )
    finally:
        await channel.close()
    await wait_until(lambda: _depth(connection, workload.parking_queue, 1), what="the park")
    (tmp_path / "test.toml").write_text(toml_for({"jobs": spec}))
    where = ("--topology", tmp_path, "--namespace", namespace)
    listed = await rabbitq_cli(url, "parking", "list", "jobs", "--json", *where)
    assert listed.returncode == 0, listed.stderr
    [task] = json.loads(listed.stdout)
    assert (task["message_id"], task["reason"]) == ("quick-1", "expired")
    assert task["error"] == (
        f"its expiration of 50 ms ran out in {workload.work_queue} before a consumer took it"
    )


async def test_ten_thousand_parked_tasks_are_read_and_left_in_their_order(
    make_topology: Any, connection: AbstractConnection, url: str
) -> None:
    """Count and order of ids before and after, with 10,000 parked copies."""
    from benchmarks.parking_browse import fill

    workload = (await make_topology(w={})).workload("w")
    sent = await fill(connection, workload.parking_queue, 10_000)
    read = [t.message_id for t in await parking.browse(url, workload)]
    assert read == sent
    assert await queue_depth(connection, workload.parking_queue) == 10_000
    again = [t.message_id for t in await parking.browse(url, workload)]
    assert again == sent


async def test_readers_of_one_parking_lot_take_turns_and_each_sees_all_of_it(
    make_topology: Any, connection: AbstractConnection, url: str
) -> None:
    """Two lists, a dry run and a second replay at once: none sees only a part."""
    from benchmarks.parking_browse import fill

    workload = (await make_topology(w={})).workload("w")
    sent = await fill(connection, workload.parking_queue, 3_000)
    started = time.monotonic()
    reads = await asyncio.gather(*(parking.browse(url, workload) for _ in range(3)))
    assert [[t.message_id for t in read] for read in reads] == [sent] * 3
    assert time.monotonic() - started < 10 * parking.BROWSE_SECONDS_PER_1000 * 3  # no timeouts
    moved = await asyncio.gather(
        parking.purge(url, workload, parking.Filter(ids=frozenset(sent[:10]))),
        parking.browse(url, workload),
    )
    assert [t.message_id for t in moved[0]] == sent[:10]
    assert [t.message_id for t in moved[1]] in (sent, sent[10:])  # before or after, whole
    assert await queue_depth(connection, workload.parking_queue) == len(sent) - 10


SPEC = {"capacity": 16, "retry": {"tiers": ["50ms"], "max_attempts": 1}}


def files(tmp_path: Path, namespace: str) -> tuple[str | Path, ...]:
    (tmp_path / "test.toml").write_text(toml_for({"jobs": SPEC}))
    return ("--topology", tmp_path, "--namespace", namespace)


async def ids_in(connection: AbstractConnection, queue: str) -> list[str]:
    return [t.message_id or "" for t in await drain_queue(connection, queue)]


async def test_a_replayed_group_moves_exactly_that_group_and_fails_again_with_its_history(
    make_topology: Any, connection: AbstractConnection, url: str, namespace: str, tmp_path: Path
) -> None:
    _, workload, app = await park_three_kinds(make_topology, connection, url, namespace)
    where = files(tmp_path, namespace)
    before = await parking.browse(url, workload)
    [chosen] = [g for g in parking.groups(before) if g.error_type == "KeyError"]
    picked = [t.message_id for t in before if t.fingerprint == chosen.fingerprint]

    dry = await rabbitq_cli(
        url, "parking", "replay", "jobs", "--group", chosen.fingerprint, "--dry-run", *where
    )
    assert dry.returncode == 0, dry.stderr
    assert [t.message_id for t in await parking.browse(url, workload)] == [
        t.message_id for t in before
    ]
    assert await queue_depth(connection, workload.work_queue) == 0

    moved = await rabbitq_cli(
        url, "parking", "replay", "jobs", "--group", chosen.fingerprint, *where
    )
    assert moved.returncode == 0, moved.stderr
    rest = [t.message_id for t in await parking.browse(url, workload)]
    assert rest == [t.message_id for t in before if t.message_id not in set(picked)]
    assert await queue_depth(connection, workload.work_queue) == PER_SITE

    # They run again with a fresh budget, fail again, and are parked with their history.
    async with running_consumer(app, workload, url):
        await wait_until(
            lambda: _depth(connection, workload.parking_queue, 3 * PER_SITE),
            timeout=20,
            what="the replayed tasks to be parked again",
        )
    await app.close()
    again = [t for t in await parking.browse(url, workload) if t.message_id in set(picked)]
    assert len(again) == PER_SITE
    for t in again:
        [earlier] = t.headers[parking.HEADER_HISTORY]
        assert earlier["reason"] == "retries_exhausted" and earlier["error_type"] == "KeyError"
        assert t.attempts == 1  # the fresh budget: one attempt, as the workload allows


async def test_purge_asks_first_and_removes_only_what_was_chosen(
    make_topology: Any, connection: AbstractConnection, url: str, namespace: str, tmp_path: Path
) -> None:
    _, workload, _ = await park_three_kinds(make_topology, connection, url, namespace)
    where = files(tmp_path, namespace)
    before = [t.message_id for t in await parking.browse(url, workload)]

    refused = await rabbitq_cli(url, "parking", "purge", "jobs", "--all", *where)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    unspecified = await rabbitq_cli(url, "parking", "purge", "jobs", "--yes", *where)
    assert unspecified.returncode == 2
    assert [t.message_id for t in await parking.browse(url, workload)] == before

    purged = await rabbitq_cli(
        url, "parking", "purge", "jobs", "--task", "jobs.name", "--yes", *where
    )
    assert purged.returncode == 0, purged.stderr
    left = await parking.browse(url, workload)
    assert len(left) == 2 * PER_SITE and {t.task for t in left} == {"jobs.size"}
    assert [t.message_id for t in left] == [i for i in before if i in {t.message_id for t in left}]


async def test_a_replay_killed_midway_and_run_again_loses_nothing(
    make_topology: Any, connection: AbstractConnection, url: str, namespace: str, tmp_path: Path
) -> None:
    _, workload, _ = await park_three_kinds(make_topology, connection, url, namespace)
    where = [str(w) for w in files(tmp_path, namespace)]
    every = {t.message_id for t in await parking.browse(url, workload)}
    slow = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "rabbitq", "parking", "replay", "jobs", "--all", "--rate", "40/s", *where),
        env={**os.environ, "RABBITQ_URL": url},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_until(
            lambda: _at_least(connection, workload.work_queue, 10),
            timeout=20,
            what="the replay to be under way",
        )
    finally:
        slow.kill()  # SIGKILL: no clean-up of any kind
        await slow.wait()
    assert await queue_depth(connection, workload.work_queue) < 3 * PER_SITE  # killed mid-way
    rerun = await rabbitq_cli(url, "parking", "replay", "jobs", "--all", *where)
    assert rerun.returncode == 0, rerun.stderr
    assert await queue_depth(connection, workload.parking_queue) == 0
    sent = await ids_in(connection, workload.work_queue)
    assert set(sent) == every  # none lost
    # at most the one task in hand when it was killed went out twice
    assert len(sent) - len(every) <= 1, len(sent) - len(every)


async def _at_least(connection: AbstractConnection, name: str, depth: int) -> bool:
    return await queue_depth(connection, name) >= depth


async def test_a_quorum_parking_lot_survives_more_reads_than_a_default_limit(
    make_topology: Any, connection: AbstractConnection, url: str
) -> None:
    """parking_queue_type = "quorum": tasks parked by a real consumer, the lot read 25 times
    (more than 4.x's default delivery limit of 20, each read returning every copy), then a
    replay and a purge: nothing dropped, the order kept throughout."""
    spec = {**SPEC, "queue_type": "quorum", "parking_queue_type": "quorum"}
    topology = await make_topology(jobs=spec)
    workload = topology.workload("jobs")
    app = App(namespace=topology.namespace, url=url)

    @app.task("jobs.fail", workload="jobs")
    async def fail(item: Item) -> None:
        check_name(item.n)

    async with running_consumer(app, workload, url):
        await app.publish_many([fail.message(Item(n=n)) for n in range(30)])
        await wait_until(
            lambda: _depth(connection, workload.parking_queue, 30),
            timeout=20,
            what="every task to be parked",
        )
    await app.close()
    first = [t.message_id for t in await parking.browse(url, workload)]
    assert len(first) == 30
    for _ in range(24):
        assert [t.message_id for t in await parking.browse(url, workload)] == first
    assert await queue_depth(connection, workload.parking_queue) == 30

    replayed = await parking.replay(url, workload, parking.Filter(ids=frozenset(first[:5])))
    assert [t.message_id for t in replayed] == first[:5]
    purged = await parking.purge(url, workload, parking.Filter(ids=frozenset(first[5:10])))
    assert [t.message_id for t in purged] == first[5:10]
    assert await ids_in(connection, workload.work_queue) == first[:5]
    assert [t.message_id for t in await parking.browse(url, workload)] == first[10:]


# A quorum parking lot (issue #13) ---------------------------------------------------------------

# More reads than RabbitMQ 4's default delivery limit (20): with it, the lot would lose tasks.
READS = 25


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_quorum_parking_lot_keeps_count_and_order_over_many_reads(
    make_topology: Any,
    connection: AbstractConnection,
    url: str,
    namespace: str,
    queue_type: str,
) -> None:
    """25 reads of a quorum lot: every read sees every task in park order, and the broker
    counted each read (x-delivery-count), so only the lot's own limit keeps them."""
    _, workload, _ = await park_three_kinds(
        make_topology,
        connection,
        url,
        namespace,
        queue_type=queue_type,
        parking_queue_type="quorum",
    )
    first = [t.message_id for t in await parking.browse(url, workload)]
    assert len(first) == 3 * PER_SITE
    for _ in range(READS - 1):
        assert [t.message_id for t in await parking.browse(url, workload)] == first
        # ready again before the next read: a read returns its copies as it closes
        await wait_until(
            lambda: _depth(connection, workload.parking_queue, 3 * PER_SITE),
            timeout=10,
            what="the read copies to be back",
        )
    last = await parking.browse(url, workload)
    assert [t.message_id for t in last] == first
    assert {t.headers.get("x-delivery-count") for t in last} == {READS}

    # Nothing was taken: draining gives the same tasks in the same order.
    left = await drain_queue(connection, workload.parking_queue)
    assert [m.message_id for m in left] == first


async def test_replay_and_purge_work_on_a_quorum_parking_lot_after_many_reads(
    make_topology: Any, connection: AbstractConnection, url: str, namespace: str
) -> None:
    """After 25 reads, a group replays (without the broker's delivery count) and a task's
    parked copies are purged; what stays keeps its order."""
    _, workload, _ = await park_three_kinds(
        make_topology, connection, url, namespace, parking_queue_type="quorum"
    )
    for _ in range(READS):
        before = await parking.browse(url, workload)
        await wait_until(
            lambda: _depth(connection, workload.parking_queue, 3 * PER_SITE),
            timeout=10,
            what="the read copies to be back",
        )
    [chosen] = [g for g in parking.groups(before) if g.error_type == "KeyError"]
    replayed = await parking.replay(url, workload, parking.Filter(group=chosen.fingerprint))
    assert len(replayed) == PER_SITE
    sent = await drain_queue(connection, workload.work_queue)
    assert [m.message_id for m in sent] == [t.message_id for t in replayed]
    assert all("x-delivery-count" not in (m.headers or {}) for m in sent)

    purged = await parking.purge(url, workload, parking.Filter(task="jobs.name"))
    assert len(purged) == PER_SITE and {t.task for t in purged} == {"jobs.name"}
    gone = {t.message_id for t in [*replayed, *purged]}
    left = [t.message_id for t in await parking.browse(url, workload)]
    assert left == [t.message_id for t in before if t.message_id not in gone]
    assert len(left) == PER_SITE


async def test_a_classic_parking_lot_shows_as_drift_once_quorum_is_declared(
    make_topology: Any, connection: AbstractConnection, namespace: str
) -> None:
    """Changing parking_queue_type on an existing lot is drift on x-queue-type, and apply
    touches nothing."""
    await make_topology(jobs=SPEC)
    changed = parse_topology(
        {"test.toml": toml_for({"jobs": {**SPEC, "parking_queue_type": "quorum"}})}, namespace
    )
    lot = changed.workload("jobs").parking_queue
    items = [i for i in await declare.plan(connection, changed) if i.action == "drift"]
    assert [(i.name, i.argument, i.declared, i.found) for i in items] == [
        (lot, "x-queue-type", "quorum", "classic")
    ]
    assert changed.workload("jobs").queues()[-1].arguments["x-delivery-limit"] == (
        PARKING_DELIVERY_LIMIT
    )


@pytest.mark.parametrize("parking_queue_type", ["classic", "quorum"])
async def test_purging_many_scattered_tasks_removes_every_one(
    make_topology: Any, connection: AbstractConnection, url: str, parking_queue_type: str
) -> None:
    """120 acks of every other copy: on a quorum lot more than 32 acks before a close would
    have the broker drop the rest of them, and those tasks would stay parked."""
    from benchmarks.parking_browse import fill

    workload = (await make_topology(w={"parking_queue_type": parking_queue_type})).workload("w")
    sent = await fill(connection, workload.parking_queue, 240)
    purged = await parking.purge(url, workload, parking.Filter(ids=frozenset(sent[::2])))
    assert [t.message_id for t in purged] == sent[::2]
    assert [t.message_id for t in await parking.browse(url, workload)] == sent[1::2]
