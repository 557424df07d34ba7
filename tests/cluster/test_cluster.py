"""Smoke tests of the 3-node test cluster: what later cluster tests stand on.

They check the harness and the broker facts rabbitq relies on (RABBITMQ.md 4.2, 10.2): quorum
queues replicate to three nodes, survive the loss of their leader's node, and a node cut off
from the others pauses under `pause_minority` (closing its clients' connections and refusing
new ones) while the majority serves on. Each step's duration is printed (`pytest -s`) and
listed under "cluster timings" at the end of the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractContextManager

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from pamqp.commands import Basic

from rabbitq._connection import is_open
from rabbitq._management import Management
from tests.cluster.harness import Cluster
from tests.cluster.node import AMQP_PORT, port_open, wait_for

Timed = Callable[[str], AbstractContextManager[list[str]]]
ALL = [0, 1, 2]


async def connect(cluster: Cluster, i: int, name: str) -> AbstractConnection:
    return await aio_pika.connect(
        cluster.urls[i], timeout=10, client_properties={"connection_name": name}
    )


async def declare_quorum(channel: AbstractChannel, name: str) -> AbstractQueue:
    return await channel.declare_queue(
        name, durable=True, arguments={"x-queue-type": "quorum", "x-quorum-initial-group-size": 3}
    )


async def publish_confirmed(cluster: Cluster, i: int, queue: str, bodies: list[bytes]) -> None:
    """Publish through node i; every message must be confirmed (acked) by the broker."""
    connection = await connect(cluster, i, f"publisher {queue}")
    try:
        channel = await connection.channel(publisher_confirms=True)
        for body in bodies:
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            confirmation = await channel.default_exchange.publish(message, routing_key=queue)
            assert isinstance(confirmation, Basic.Ack), f"{body!r} was not confirmed"
    finally:
        await connection.close()


async def take_all(cluster: Cluster, i: int, queue: str) -> list[bytes]:
    """Every message now in the queue, read (and acked) through node i."""
    connection = await connect(cluster, i, f"reader {queue}")
    try:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        bodies = []
        while (message := await q.get(no_ack=True, fail=False)) is not None:
            bodies.append(message.body)
        return bodies
    finally:
        await connection.close()


async def eventually(
    predicate: Callable[[], bool],
    what: str,
    timeout: float = 60,  # noqa: ASYNC109 - a polling deadline, not a cancellation scope
) -> float:
    """Poll a blocking predicate (CLI calls) off the event loop; the seconds it took."""
    return await asyncio.to_thread(wait_for, predicate, timeout, what, 0.2)


def bodies_for(queue: str, count: int, start: int = 0) -> list[bytes]:
    return [f"{queue}-{n}".encode() for n in range(start, start + count)]


def test_three_nodes_run_and_each_answers(cluster: Cluster) -> None:
    """Every node sees all three running, and its AMQP and management ports answer."""
    for i in ALL:
        assert cluster.running_nodes(i) == ALL
        assert port_open(cluster.nodes[i].address, AMQP_PORT)
    assert len(set(cluster.node_names)) == 3


async def test_every_node_takes_the_admin_user(cluster: Cluster, namespace: str) -> None:
    """The URLs log in on every node, and each node's management API lists 3 running nodes."""
    for i in ALL:
        connection = await connect(cluster, i, f"login {namespace}")
        await connection.close()
        nodes = await Management.from_urls(cluster.urls[i]).nodes()
        assert sorted(n["name"] for n in nodes if n["running"]) == sorted(cluster.node_names)


async def test_quorum_queue_has_three_members_and_a_leader(
    cluster: Cluster, namespace: str
) -> None:
    """x-quorum-initial-group-size 3 puts a replica on every node, one of them the leader."""
    queue = f"{namespace}qq"
    connection = await connect(cluster, 0, f"declare {queue}")
    try:
        await declare_quorum(await connection.channel(), queue)
    finally:
        await connection.close()
    replicas = cluster.replicas(queue, via=1)
    assert replicas is not None
    assert replicas.members == (0, 1, 2)
    assert replicas.online == (0, 1, 2)
    assert replicas.leader in ALL
    assert cluster.leader_of(queue, via=2) == replicas.leader


async def test_publish_through_one_node_consume_through_another(
    cluster: Cluster, namespace: str, timed: Timed
) -> None:
    """Confirmed publishes through node 1 are all consumed through node 2."""
    queue = f"{namespace}qq"
    sent = bodies_for(queue, 50)
    connection = await connect(cluster, 2, f"consumer {queue}")
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=10)
        q = await declare_quorum(channel, queue)
        with timed("publish 50 with confirms through node 1"):
            await publish_confirmed(cluster, 1, queue, sent)
        received = []
        with timed("consume 50 through node 2"):
            async with q.iterator() as messages:
                async for message in messages:
                    received.append(message.body)
                    await message.ack()
                    if len(received) == len(sent):
                        break
    finally:
        await connection.close()
    assert sorted(received) == sorted(sent)
    assert await take_all(cluster, 0, queue) == []


async def test_stopping_the_leaders_node_keeps_confirmed_messages(
    cluster: Cluster, namespace: str, timed: Timed
) -> None:
    """Leader's node stopped: a new leader is elected, every confirmed message is still there."""
    queue = f"{namespace}qq"
    connection = await connect(cluster, 0, f"declare {queue}")
    await declare_quorum(await connection.channel(), queue)
    await connection.close()
    leader = cluster.leader_of(queue)
    assert leader is not None
    publisher, reader = (leader + 1) % 3, (leader + 2) % 3
    sent = bodies_for(queue, 100)
    await publish_confirmed(cluster, publisher, queue, sent)

    with timed(f"stop the leader's node {leader}"):
        await asyncio.to_thread(cluster.stop, leader)
    with timed("a new leader is elected"):
        await eventually(
            lambda: cluster.leader_of(queue, via=reader) not in (None, leader),
            "a leader on a running node",
        )
    after = bodies_for(queue, 10, start=100)
    with timed("publish 10 more with confirms on two nodes"):
        await publish_confirmed(cluster, publisher, queue, after)
    with timed(f"read all 110 through node {reader}"):
        received = await take_all(cluster, reader, queue)
    assert sorted(received) == sorted(sent + after)

    with timed(f"restart node {leader} until it has rejoined"):
        await asyncio.to_thread(cluster.start, leader)
    assert all(cluster.running_nodes(i) == ALL for i in ALL)
    with timed("its replica is back online"):
        await eventually(
            lambda: getattr(cluster.replicas(queue, via=leader), "online", ()) == (0, 1, 2),
            "three online replicas",
        )


async def test_isolated_node_pauses_and_the_majority_serves_on(
    cluster: Cluster, namespace: str, timed: Timed
) -> None:
    """pause_minority: the cut-off leader closes its clients and refuses; 2 nodes keep serving."""
    queue = f"{namespace}qq"
    connection = await connect(cluster, 0, f"declare {queue}")
    await declare_quorum(await connection.channel(), queue)
    await connection.close()
    isolated = cluster.leader_of(queue)
    assert isolated is not None
    majority = [i for i in ALL if i != isolated]
    sent = bodies_for(queue, 20)
    await publish_confirmed(cluster, majority[0], queue, sent)

    client = await connect(cluster, isolated, f"minority client {queue}")
    closed: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def on_close(_: object, exc: BaseException | None = None) -> None:
        if not closed.done():
            closed.set_result(exc)

    client.close_callbacks.add(on_close)
    try:
        cluster.isolate(isolated, keep_client=True)
        assert cluster.reachable(isolated)
        with timed(f"node {isolated} cut off: the broker closes its client's connection"):
            reason = await asyncio.wait_for(closed, timeout=60)
        assert not is_open(client)
        assert "CONNECTION_FORCED" in str(reason), reason
        with timed("the majority sees 2 running nodes"):
            await asyncio.to_thread(cluster.wait_running, majority)
        with timed(f"node {isolated} refuses new connections"):
            await eventually(
                lambda: not port_open(cluster.nodes[isolated].address, AMQP_PORT),
                f"node {isolated} to stop listening",
            )
        with timed(f"node {isolated} has paused (its app is stopped)"):
            await asyncio.to_thread(cluster.wait_running, [], seen_from=[isolated])
        with timed("the majority elects a leader"):
            await eventually(
                lambda: cluster.leader_of(queue, via=majority[0]) in majority,
                "a leader in the majority",
            )
        after = bodies_for(queue, 10, start=20)
        with timed("publish 10 with confirms to the majority"):
            await publish_confirmed(cluster, majority[1], queue, after)
        received = await take_all(cluster, majority[0], queue)
        assert sorted(received) == sorted(sent + after)
    finally:
        await client.close()

    with timed(f"heal node {isolated} until all 3 run") as notes:
        notes.append(await asyncio.to_thread(cluster.heal, isolated))
    assert all(cluster.running_nodes(i) == ALL for i in ALL)
    connection = await connect(cluster, isolated, f"after heal {queue}")
    await connection.close()


async def test_a_full_cut_hides_the_node_from_the_client_too(
    cluster: Cluster, namespace: str, timed: Timed
) -> None:
    """keep_client=False: the client's packets vanish too; the node pauses, heal brings it back."""
    node = 2
    cluster.isolate(node, keep_client=False)
    assert not cluster.reachable(node)
    assert not port_open(cluster.nodes[node].address, AMQP_PORT, timeout=1)
    with timed("full cut: the other two see 2 running"):
        await asyncio.to_thread(cluster.wait_running, [0, 1])
    with timed(f"full cut: node {node} pauses"):
        await asyncio.to_thread(cluster.wait_running, [], seen_from=[node])
    with timed(f"heal node {node} until all 3 run") as notes:
        notes.append(await asyncio.to_thread(cluster.heal, node))
    assert cluster.reachable(node)
    assert all(cluster.running_nodes(i) == ALL for i in ALL)


def test_cutting_the_client_link_leaves_the_cluster_whole(cluster: Cluster, namespace: str) -> None:
    """cut_client: this process no longer reaches the node, which stays in the cluster."""
    node = 1
    cluster.cut_client(node)
    try:
        assert not cluster.reachable(node)
        assert not port_open(cluster.nodes[node].address, AMQP_PORT, timeout=1)
        assert cluster.running_nodes(node) == ALL
        assert cluster.running_nodes(0) == ALL
    finally:
        cluster.heal(node)
    assert port_open(cluster.nodes[node].address, AMQP_PORT)


@pytest.mark.parametrize("i", ALL)
def test_cli_runs_against_its_own_node(cluster: Cluster, i: int) -> None:
    """rabbitmqctl(i, ...) talks to node i, never to the default broker."""
    assert cluster.rabbitmqctl(i, "-q", "eval", "node().").strip() == f"'{cluster.node_names[i]}'"
