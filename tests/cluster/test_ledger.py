"""The ledger harness on the 3-node cluster: a quorum workload keeps every confirmed task.

Each test runs `rabbitq consume` processes with the whole cluster in `RABBITQ_URL`, each put on
a node of the test's choosing first (`LEDGER_FIRST_NODE`), and publishers in this process, one
per node, then breaks the cluster: the node holding the work queue's leader stopped and
restarted, or cut off from the others for 20 s (`pause_minority` pauses it) and healed. At the
end the ledger (tests/ledger.py) says what happened to every id, as Jepsen's total-queue
checker does: `lost` (confirmed, neither completed nor parked) must be 0; `duplicated` and
`unconfirmed` (the publisher was told the publish failed) are reported, `pytest -s` prints them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from rabbitq import _declare as declare
from rabbitq._connection import NODE_ORDER, node_of, nodes
from rabbitq._topology import Workload, parse_topology
from tests.broker.conftest import toml_for
from tests.cluster.harness import Cluster
from tests.cluster.test_cluster import Timed
from tests.helpers import wait_until
from tests.ledger import (
    ConsumerProcess,
    Ledger,
    LedgerPublisher,
    LedgerReport,
    check,
    task_ids,
)

ALL = [0, 1, 2]
WORKLOAD = "lg"
SPEC: dict[str, Any] = {
    "queue_type": "quorum",
    "parking_queue_type": "quorum",  # a classic lot would wait out its node's loss
    "replicas": 3,
    "capacity": 8,
    "max_redeliveries": 3,
    "retry": {"tiers": ["50ms"], "max_attempts": 3},
}
# Tasks per second the stream offers, over all publishers: well under what three consumers
# drain, so the queue stays short and a fault hits tasks that are running.
RATE = 150
# A consumer whose node went away must be consuming on another within this.
RECONNECT_SECONDS = 30.0


def cluster_url(cluster: Cluster, first: int = 0) -> str:
    """The whole cluster as one RABBITQ_URL, node `first` listed first."""
    urls = cluster.urls
    return ",".join(urls[first:] + urls[:first])


class Rig:
    """One test's workload on the cluster, its ledger, its consumers and publishers."""

    def __init__(self, cluster: Cluster, prefix: str, tmp_path: Path) -> None:
        self.cluster = cluster
        self.namespace = prefix.rstrip(".")
        self.tmp_path = tmp_path
        self.url = cluster_url(cluster)
        self.ledger = Ledger.create(tmp_path / "ledger.db")
        self.topology_dir = tmp_path / "topology"
        self.consumers: list[ConsumerProcess] = []
        self.publishers: list[LedgerPublisher] = []
        self.workload: Workload | None = None

    async def apply(self, **overrides: Any) -> Workload:
        """Declare the test's workload (SPEC with `overrides`; a None value drops a key)."""
        spec = {k: v for k, v in {**SPEC, **overrides}.items() if v is not None}
        text = toml_for({WORKLOAD: spec})
        self.topology_dir.mkdir(exist_ok=True)
        (self.topology_dir / "test.toml").write_text(text)
        topology = parse_topology({"test.toml": text}, self.namespace)
        connection = await aio_pika.connect(self.cluster.urls[0], timeout=10)
        try:
            await declare.apply(connection, topology)
        finally:
            await connection.close()
        self.workload = topology.workload(WORKLOAD)
        return self.workload

    def consumer(self, first: int, *, burst: bool = False, label: str = "") -> ConsumerProcess:
        """A consumer process that tries node `first` first (and fails over to the others)."""
        process = ConsumerProcess(
            WORKLOAD,
            self.topology_dir,
            self.namespace,
            self.url,
            self.tmp_path,
            burst=burst,
            label=label or f"consumer-on-{first}",
            env={"LEDGER_FIRST_NODE": str(first)},
        )
        self.consumers.append(process)
        return process

    def publisher(self, first: int, *, confirm_timeout: float = 5.0) -> LedgerPublisher:
        """A publisher in this process that connects to node `first` first.

        Each gets the node list in its own order (a string of its own), so that this process's
        node order holds one entry per publisher, and each starts from its own node.
        """
        url = cluster_url(self.cluster, first)
        NODE_ORDER.candidates(url)
        NODE_ORDER.answered(url, nodes(url)[0])
        publisher = LedgerPublisher(
            self.ledger,
            url,
            self.namespace,
            WORKLOAD,
            confirm_timeout=confirm_timeout,
            name=f"publisher-on-{first}",
        )
        self.publishers.append(publisher)
        return publisher

    async def check(self) -> LedgerReport:
        """The end state, read through a node that runs now."""
        assert self.workload is not None
        running = self.cluster.running_nodes(0) or self.cluster.running_nodes(1)
        return await check(self.ledger, self.cluster.urls[running[0]], self.workload)

    def leader(self) -> int:
        assert self.workload is not None
        leader = self.cluster.leader_of(self.workload.work_queue)
        assert leader is not None, "the work queue has no leader"
        return leader

    async def close(self) -> None:
        for process in self.consumers:
            process.close()
        for publisher in self.publishers:
            with contextlib.suppress(Exception):
                await publisher.close()
        self.ledger.close()


@pytest.fixture
async def rig(cluster: Cluster, namespace: str, tmp_path: Path) -> AsyncIterator[Rig]:
    made = Rig(cluster, namespace, tmp_path)
    yield made
    await made.close()


class Stream:
    """Publishes ledger tasks at `RATE` round-robin over the publishers until stopped.

    `retry`: a publish that raised is sent again (same id) until confirmed, as an application
    would; without it each id is tried once, so what the broker never confirmed stays counted
    as unconfirmed.
    """

    def __init__(self, publishers: list[LedgerPublisher], prefix: str, *, retry: bool) -> None:
        self.publishers = publishers
        self.prefix = prefix
        self.retry = retry
        self.sent = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _run(self, index: int, publisher: LedgerPublisher) -> None:
        batch = 10
        period = batch * len(self.publishers) / RATE
        n = 0
        while not self._stop.is_set():
            started = time.monotonic()
            ids = task_ids(f"{self.prefix}{index}", batch, start=n)
            n += batch
            messages = [publisher.message(i, sleep_ms=20) for i in ids]
            await publisher.publish(messages, deadline_seconds=60.0 if self.retry else None)
            self.sent += batch
            # pacing of a load generator, not a synchronisation
            await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(i, p)) for i, p in enumerate(self.publishers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


def done_after(ledger: Ledger, pid: int, since: float) -> Callable[[], bool]:
    return lambda: any(e.pid == pid and e.at >= since for e in ledger.executions("done"))


def completed_since(ledger: Ledger, since: float, count: int) -> Callable[[], bool]:
    return lambda: sum(e.at >= since for e in ledger.executions("done")) >= count


def node_line(consumer: ConsumerProcess, cluster: Cluster, i: int) -> bool:
    """The consumer logged that it is on node i."""
    return f"on node {node_of(cluster.urls[i])}" in consumer.stderr()


async def all_confirmed_done(rig: Rig, timeout: float = 60) -> None:  # noqa: ASYNC109
    """Every confirmed id has completed (the consumers still run)."""
    confirmed = rig.ledger.published(True)
    await wait_until(
        lambda: confirmed <= set(rig.ledger.completed()),
        timeout=timeout,
        what=f"all {len(confirmed)} confirmed tasks to complete",
        interval=0.2,
    )


async def finish(rig: Rig, running: list[ConsumerProcess]) -> LedgerReport:
    """SIGTERM every consumer (each must exit 0), drain what is left, and check."""
    for consumer in running:
        assert consumer.alive, f"{consumer.label} died: {consumer.stderr()[-3000:]}"
        assert await consumer.stop(timeout=30) == 0, consumer.stderr()[-3000:]
    final = rig.consumer(0, burst=True, label="final")
    final.start()
    assert await final.exited(60) == 0, final.stderr()[-3000:]
    return await rig.check()


@pytest.mark.timeout(300)
async def test_the_leaders_node_stopped_and_restarted_loses_nothing(
    rig: Rig, cluster: Cluster, timed: Timed
) -> None:
    """Leader's node stopped under load, later restarted: lost = 0, its consumer moves on."""
    await rig.apply()
    running = [rig.consumer(i) for i in ALL]
    for consumer in running:
        consumer.start()
    for i, consumer in enumerate(running):
        await wait_until(
            lambda c=consumer, i=i: node_line(c, cluster, i),  # type: ignore[misc]
            timeout=30,
            what=f"{consumer.label} to consume on node {i}",
        )
    stream = Stream([rig.publisher(i, confirm_timeout=5.0) for i in ALL], "stop", retry=True)
    stream.start()
    try:
        await wait_until(lambda: rig.ledger.completed_ids() >= 300, timeout=60, what="300 tasks")
        leader = rig.leader()
        on_leader = running[leader]
        stopping = time.time()  # the node closes its connections as it begins to stop
        with timed(f"stop node {leader}, the work queue's leader"):
            await asyncio.to_thread(cluster.stop, leader)
        stopped = time.time()
        rig.ledger.fault("leader_node_stop")
        with timed(f"the consumer on node {leader} completes a task through another node"):
            await wait_until(
                done_after(rig.ledger, on_leader.pid, stopped),
                timeout=RECONNECT_SECONDS,
                what=f"{on_leader.label} to run tasks again",
                interval=0.1,
            )
        moved = time.time() - stopping
        assert any(node_line(on_leader, cluster, j) for j in ALL if j != leader)
        await wait_until(
            completed_since(rig.ledger, stopped, 300), timeout=60, what="300 tasks on 2 nodes"
        )
        with timed(f"restart node {leader} until it has rejoined"):
            await asyncio.to_thread(cluster.start, leader)
        rig.ledger.fault("leader_node_restart")
        restarted = time.time()
        await wait_until(
            completed_since(rig.ledger, restarted, 300), timeout=60, what="300 tasks after"
        )
    finally:
        await stream.stop()
    await all_confirmed_done(rig)
    report = await finish(rig, running)
    print(
        f"\nleader node stopped and restarted: {report.jepsen()}; its consumer ran tasks "
        f"through another node {moved:.1f}s after the stop began"
    )
    assert report.lost == 0, report.details()
    assert report.ok, report.details()
    assert report.tasks >= 900
    assert all(c.exit_codes == [0] for c in running), [c.exit_codes for c in running]


@pytest.mark.timeout(300)
async def test_a_partition_that_isolates_the_leader_loses_no_confirmed_task(
    rig: Rig, cluster: Cluster, timed: Timed
) -> None:
    """The leader's node cut off for 20 s under load, then healed: lost = 0 of the confirmed.

    Each id is published once: what the broker did not confirm (the minority cannot commit,
    then pauses and drops its connections) is reported as failed, never as confirmed; some of
    those land anyway ("recovered"), as Jepsen's checker allows.
    """
    await rig.apply()
    running = [rig.consumer(i) for i in ALL]
    for consumer in running:
        consumer.start()
    publishers = [rig.publisher(i, confirm_timeout=3.0) for i in ALL]
    stream = Stream(publishers, "part", retry=False)
    stream.start()
    try:
        await wait_until(lambda: rig.ledger.completed_ids() >= 300, timeout=60, what="300 tasks")
        isolated = rig.leader()
        cluster.isolate(isolated, keep_client=True)
        rig.ledger.fault("partition")
        cut = time.time()
        with timed(f"node {isolated} (the leader's) cut off, tasks flowing for 20 s"):
            # the fault's duration, as the issue asks; nothing waits on it
            await asyncio.sleep(20)
        await wait_until(
            completed_since(rig.ledger, cut + 10, 100), timeout=30, what="tasks on the majority"
        )
        with timed(f"heal node {isolated}") as notes:
            notes.append(await asyncio.to_thread(cluster.heal, isolated))
        rig.ledger.fault("heal")
        healed = time.time()
        await wait_until(
            completed_since(rig.ledger, healed, 300), timeout=60, what="300 tasks after the heal"
        )
    finally:
        await stream.stop()
    await all_confirmed_done(rig)
    report = await finish(rig, running)
    raised = sum(sum(p.stats.raised.values()) for p in publishers)
    print(f"\npartition of the leader's node, 20 s: {report.jepsen()}")
    assert report.lost == 0, report.details()
    assert report.ok, report.details()
    # every publish that raised is counted unconfirmed, never as confirmed
    assert report.unconfirmed == raised
    assert report.tasks + report.unconfirmed == stream.sent
    assert publishers[isolated].stats.raised, "the minority's publisher never failed"


async def test_two_consumers_on_two_nodes_drain_one_workload(
    rig: Rig, cluster: Cluster, timed: Timed
) -> None:
    """2,000 tasks published through node 0, drained by consumers on nodes 1 and 2."""
    await rig.apply()
    publisher = rig.publisher(0)
    messages = [publisher.message(i, sleep_ms=5) for i in task_ids("two", 2000)]
    with timed("publish 2,000 through node 0"):
        assert await publisher.publish(messages) == []
    pair = [rig.consumer(1, burst=True), rig.consumer(2, burst=True)]
    with timed("drain with consumers on nodes 1 and 2"):
        for consumer in pair:
            consumer.start()
        for consumer in pair:
            assert await consumer.exited(90) == 0, consumer.stderr()[-3000:]
    report = await rig.check()
    print(f"\ntwo consumers on two nodes: {report.jepsen()}")
    assert report.lost == 0, report.details()
    assert report.ok, report.details()
    assert report.completed == 2000
    assert node_line(pair[0], cluster, 1) and node_line(pair[1], cluster, 2)
    per_pid = {e.pid for e in rig.ledger.executions("done")}
    assert {c.exit_codes[0] for c in pair} == {0}
    assert len(per_pid) == 2, "one consumer did all the work"


async def test_a_crash_looping_task_is_parked_as_crash_loop_on_the_cluster(
    rig: Rig, cluster: Cluster
) -> None:
    """A task that kills its consumer every time ends parked as crash_loop after 3 deliveries."""
    max_redeliveries = SPEC["max_redeliveries"]
    await rig.apply(capacity=1)
    publisher = rig.publisher(0)
    messages = [publisher.message(i) for i in task_ids("before", 3)]
    messages.append(publisher.message("poison", behaviour="exit"))
    messages += [publisher.message(i) for i in task_ids("after", 3)]
    assert await publisher.publish(messages) == []

    consumer = rig.consumer(1, burst=True)
    for _ in range(max_redeliveries + 3):  # a supervisor restarting what died
        consumer.start()
        if await consumer.exited(30) == 0:
            break
        rig.ledger.fault("crash")
    else:
        pytest.fail(f"the consumer kept dying: exit codes {consumer.exit_codes}")
    report = await rig.check()
    print(f"\ncrash loop on the cluster: {report}")
    assert report.lost == 0, report.details()
    assert report.ok, report.details()
    assert report.completed == 6
    assert consumer.exit_codes == [1] * max_redeliveries + [0]
    [parked] = report.parked_copies
    assert (parked.id, parked.reason) == ("poison", "crash_loop")


def test_cluster_url_lists_every_node_once(cluster: Cluster) -> None:
    for first in ALL:
        listed = nodes(cluster_url(cluster, first))
        assert listed[0] == cluster.urls[first]
        assert sorted(listed) == sorted(cluster.urls)


async def test_a_consumer_waits_while_its_classic_queues_node_is_down(
    rig: Rig, cluster: Cluster, timed: Timed
) -> None:
    """A classic workload's queues live on node 0: node 0 stopped, its consumer on node 1
    says the queue is unavailable and waits (it does not exit); node 0 back, it runs on."""
    await rig.apply(queue_type="classic", parking_queue_type="classic", replicas=None)
    publisher = rig.publisher(0)
    assert await publisher.publish([publisher.message(i) for i in task_ids("a", 20)]) == []
    consumer = rig.consumer(1)
    consumer.start()
    await wait_until(lambda: rig.ledger.completed_ids() >= 20, timeout=30, what="20 tasks")
    with timed("stop node 0, home of the classic queues"):
        await asyncio.to_thread(cluster.stop, 0)
    await wait_until(
        lambda: "is unavailable: home node" in consumer.stderr(),
        timeout=60,
        what="the consumer to say its queue is unavailable",
    )
    assert consumer.alive, consumer.stderr()[-3000:]
    with timed("start node 0 again"):
        await asyncio.to_thread(cluster.start, 0)
    publisher = rig.publisher(1)
    assert await publisher.publish([publisher.message(i) for i in task_ids("b", 20)]) == []
    await wait_until(lambda: rig.ledger.completed_ids() >= 40, timeout=60, what="20 more tasks")
    report = await finish(rig, [consumer])
    assert report.lost == 0, report.details()
    assert report.ok, report.details()
