"""A 3-node RabbitMQ cluster for one benchmark run (`run --cluster`), and where its queues live.

The cluster comes from the test harness (`tests/cluster/harness.py`: real nodes from the Debian
package, each in its own network namespace; it needs root and `ip netns`). The run declares its
topology through node 0, so every queue's leader (quorum) or home (classic) is there: RabbitMQ's
`queue_leader_locator` is `client-local` by default. The publishers and consumers then connect
to a node that holds none of the measured queues' leaders, as a client behind a load balancer
mostly does; their traffic crosses the inter-node link, and a quorum publish waits for a
majority of the replicas.

What it must not do: touch the default broker, or print a cluster URL (it holds the password).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tests.cluster.harness import Cluster
from tests.cluster.node import unavailable

__all__ = ["Cluster", "Placement", "client_node", "placement", "start", "unavailable"]

SIZE = 3
REPLICAS = 3
DECLARE_NODE = 0


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the measured queues live and which node the clients use, by node index."""

    homes: dict[str, int]  # queue -> its leader's (quorum) or its own (classic) node
    members: dict[str, tuple[int, ...]]  # quorum queue -> the nodes holding a replica
    client_node: int

    def describe(self) -> str:
        parts = []
        for queue, home in self.homes.items():
            replicas = self.members.get(queue)
            where = f"leader on node {home}" if replicas else f"on node {home}"
            if replicas:
                where += f", replicas on {','.join(map(str, replicas))}"
            parts.append(f"{queue} {where}")
        return f"clients on node {self.client_node}; " + "; ".join(parts)


def client_node(homes: Mapping[str, int], size: int) -> int:
    """The first node that is home to none of the queues: the realistic client's node.

    Raises:
        ValueError: every node is home to one of them (more queues than nodes).
    """
    taken = set(homes.values())
    for node in range(size):
        if node not in taken:
            return node
    raise ValueError(f"every one of the {size} nodes holds a measured queue: {dict(homes)}")


def start() -> Cluster:
    """Start the cluster (blocking, ~30 s on 2 cores); the caller must `down()` it."""
    cluster = Cluster(SIZE)
    cluster.up()
    return cluster


_NODE = re.compile(r"'?([^'\s]+@[^'\s]+?)'?\s*$")


def _home(cluster: Cluster, queue: str) -> int:
    """The node a queue's process runs on (a classic queue's only one, a quorum leader's)."""
    # `list_queues` names a classic queue's process only by a remote pid, without the node.
    expr = (
        f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{queue}">>)), '
        "case amqqueue:get_pid(Q) of {_, N} -> N; P -> node(P) end."
    )
    out = cluster.rabbitmqctl(DECLARE_NODE, "-q", "eval", expr).strip()
    found = _NODE.search(out)
    if found is None or found.group(1) not in cluster.node_names:
        raise RuntimeError(f"could not tell where queue {queue!r} lives from {out!r}")
    return cluster.node_names.index(found.group(1))


def placement(cluster: Cluster, queues: Sequence[str]) -> Placement:
    """Where `queues` live now, and the node the clients should use."""
    homes: dict[str, int] = {}
    members: dict[str, tuple[int, ...]] = {}
    for queue in queues:
        replicas = cluster.replicas(queue, via=DECLARE_NODE)
        if replicas is not None and replicas.leader is not None:
            homes[queue], members[queue] = replicas.leader, replicas.members
        else:
            homes[queue] = _home(cluster, queue)
    return Placement(homes, members, client_node(homes, cluster.size))
