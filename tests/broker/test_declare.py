"""Declaring the topology against the real broker: idempotent apply, drift, missing topology."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

from rabbitq import App, Consumer, TopologyDrift, TopologyMissing
from rabbitq import _declare as declare
from rabbitq._topology import Topology
from tests.helpers import queue_depth

ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_SECONDS = 20

WORKLOAD = {"max_priority": 5, "capacity": 2, "retry": {"tiers": ["50ms", "100ms"]}}


class Item(BaseModel):
    n: int


async def rabbitq_cli(url: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`python -m rabbitq ARGS` in a subprocess, as an operator would run it."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "rabbitq", *map(str, args)],
        cwd=ROOT,
        env={**os.environ, "RABBITQ_URL": url},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
    )


def names(topology: Topology) -> set[tuple[str, str]]:
    return {("exchange", e.name) for e in topology.exchanges()} | {
        ("queue", q.name) for q in topology.queues()
    }


def bindings(topology: Topology) -> set[tuple[str, str]]:
    """The binding items of a plan, as `topology show` draws them."""
    return {
        ("binding", f"{b.exchange} --{b.routing_key}--> {b.queue}") for b in topology.bindings()
    }


async def precreate_drifted_work_queue(
    connection: AbstractConnection, topology: Topology, workload: str
) -> str:
    """The work queue with the declared arguments but x-max-priority 9, holding one message."""
    work = topology.workload(workload).queues()[0]
    assert work.role == "work" and work.arguments["x-max-priority"] == 5
    channel = await connection.channel()
    try:
        await channel.declare_queue(
            work.name, durable=True, arguments={**work.arguments, "x-max-priority": 9}
        )
        await channel.default_exchange.publish(
            aio_pika.Message(b'{"n": 1}', delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=work.name,
        )
    finally:
        await channel.close()
    return work.name


async def test_apply_twice_changes_nothing(make_topology, connection, url, namespace):
    """A second apply reports every object unchanged and keeps the messages already queued."""
    topology = await make_topology(w=WORKLOAD)
    app = App(namespace=namespace, url=url)

    @app.task("declare.item", workload="w")
    async def item(payload: Item) -> None:
        pass

    try:
        await item.publish(Item(n=1))
    finally:
        await app.close()

    items = await declare.apply(connection, topology)

    assert {(i.kind, i.name) for i in items} == names(topology) | bindings(topology)
    assert [i for i in items if i.action != "unchanged"] == []
    assert await queue_depth(connection, topology.workload("w").work_queue) == 1


async def test_cli_apply_twice_then_plan_reports_only_unchanged(
    make_topology, topology_dir, connection, url, namespace
):
    """`topology apply` creates, a line per exchange, queue and binding; then all unchanged."""
    topology = await make_topology(apply=False, w=WORKLOAD)  # registered for cleanup only
    directory = topology_dir(w=WORKLOAD)
    expected = names(topology) | bindings(topology)
    assert len(bindings(topology)) == 4  # work queue, two tiers, parking lot

    first = await rabbitq_cli(
        url, "topology", "apply", "--topology", directory, "--namespace", namespace
    )
    assert first.returncode == 0, first.stderr
    assert {tuple(line.split(maxsplit=2)) for line in first.stdout.splitlines()} == {
        ("create", kind, name) for kind, name in expected
    }
    for kind, name in names(topology):
        assert await declare.exists(connection, kind, name), f"{kind} {name} was not created"
    app = App(namespace=namespace, url=url)

    @app.task("declare.item", workload="w")
    async def item(payload: Item) -> None:
        pass

    try:
        await item.publish(Item(n=1))
    finally:
        await app.close()

    for command in ("apply", "plan"):
        again = await rabbitq_cli(
            url, "topology", command, "--topology", directory, "--namespace", namespace
        )
        assert again.returncode == 0, again.stderr
        assert {tuple(line.split(maxsplit=2)) for line in again.stdout.splitlines()} == {
            ("unchanged", kind, name) for kind, name in expected
        }, f"topology {command}"
        assert "error" not in again.stderr
    assert await queue_depth(connection, topology.workload("w").work_queue) == 1


async def test_apply_stops_on_argument_drift_and_touches_nothing(
    make_topology, connection, namespace
):
    """A queue with another x-max-priority raises TopologyDrift naming it; nothing is declared."""
    topology = await make_topology(apply=False, w=WORKLOAD)
    queue = await precreate_drifted_work_queue(connection, topology, "w")

    with pytest.raises(TopologyDrift) as caught:
        await declare.apply(connection, topology)

    drift = caught.value
    assert (drift.kind, drift.name, drift.argument) == ("queue", queue, "x-max-priority")
    assert (drift.declared, drift.found) == ("5", "9")
    assert drift.more == 0
    assert drift.exit_code == 3
    text = str(drift)
    assert repr(queue) in text and "x-max-priority" in text
    assert "drain and delete" in text and "rabbitq topology apply" in text
    for kind, name in names(topology) - {("queue", queue)}:
        assert not await declare.exists(connection, kind, name), f"{kind} {name} was created"
    assert await queue_depth(connection, queue) == 1


async def test_cli_apply_and_plan_exit_3_on_drift(
    make_topology, topology_dir, connection, url, namespace
):
    """On drift, `topology apply` prints one `error:` line with the facts and exits 3; plan too."""
    topology = await make_topology(apply=False, w=WORKLOAD)
    queue = await precreate_drifted_work_queue(connection, topology, "w")
    directory = topology_dir(w=WORKLOAD)

    applied = await rabbitq_cli(
        url, "topology", "apply", "--topology", directory, "--namespace", namespace
    )

    assert applied.returncode == 3, applied.stderr
    lines = applied.stderr.splitlines()
    assert len(lines) == 1, applied.stderr
    assert lines[0].startswith("error: ")
    for fact in (queue, "x-max-priority", "5", "9"):
        assert fact in lines[0]
    assert applied.stdout == ""

    planned = await rabbitq_cli(
        url, "topology", "plan", "--topology", directory, "--namespace", namespace
    )

    assert planned.returncode == 3, planned.stderr
    drifted = [line.split() for line in planned.stdout.splitlines() if line.startswith("drift")]
    assert drifted == [
        ["drift", "queue", f"{queue}:", "x-max-priority", "declared", "5,", "found", "9"]
    ]
    assert len([line for line in planned.stderr.splitlines() if line.startswith("error: ")]) == 1
    for kind, name in names(topology) - {("queue", queue)}:
        assert not await declare.exists(connection, kind, name), f"{kind} {name} was created"
    assert await queue_depth(connection, queue) == 1


async def test_consumer_fails_fast_when_its_topology_is_missing(make_topology, url, namespace):
    """Consumer.run raises TopologyMissing, saying to run 'rabbitq topology apply'."""
    topology = await make_topology(apply=False, w=WORKLOAD)
    consumer = Consumer(App(), topology.workload("w"), url)

    with pytest.raises(TopologyMissing, match="run 'rabbitq topology apply'") as caught:
        await asyncio.wait_for(consumer.run(), timeout=10)

    assert (caught.value.kind, caught.value.name) == ("exchange", f"{namespace}.tasks")


async def test_consumer_fails_fast_when_only_its_queues_are_missing(make_topology, url):
    """With the namespace's exchanges but not the workload's queues, the work queue is named."""
    await make_topology(a=WORKLOAD)
    missing = await make_topology(apply=False, b=WORKLOAD)
    workload = missing.workload("b")
    consumer = Consumer(App(), workload, url)

    with pytest.raises(TopologyMissing, match="run 'rabbitq topology apply'") as caught:
        await asyncio.wait_for(consumer.run(), timeout=10)

    assert (caught.value.kind, caught.value.name) == ("queue", workload.work_queue)


async def test_cli_consume_exits_1_when_its_topology_is_missing(topology_dir, url, namespace):
    """`rabbitq consume` prints one `error:` line that says to apply the topology, and exits 1."""
    directory = topology_dir(proc=WORKLOAD)

    result = await rabbitq_cli(
        url,
        "consume",
        "proc",
        "--app",
        "tests.broker.apps:app",
        "--topology",
        directory,
        "--namespace",
        namespace,
    )

    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert f"{namespace}.tasks" in errors[0] and "rabbitq topology apply" in errors[0]
    assert "Traceback" not in result.stderr
