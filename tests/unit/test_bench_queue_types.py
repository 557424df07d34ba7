"""The benchmark's classic-vs-quorum workloads and the cluster client node it picks."""

from __future__ import annotations

import pytest

from benchmarks.cluster import client_node
from benchmarks.names import QUEUE_TYPES, queue_type_workload, topology_toml
from rabbitq._topology import parse_topology


@pytest.mark.parametrize(
    ("homes", "size", "expected"),
    [
        ({"a.work": 0, "b.work": 0}, 3, 1),  # both declared through node 0: the usual case
        ({"a.work": 1, "b.work": 0}, 3, 2),
        ({"a.work": 2}, 3, 0),
        ({}, 1, 0),
    ],
)
def test_the_client_node_holds_none_of_the_measured_queues(
    homes: dict[str, int], size: int, expected: int
) -> None:
    """The clients connect to the first node that is no measured queue's leader or home."""
    assert client_node(homes, size) == expected


def test_no_client_node_when_every_node_holds_a_measured_queue() -> None:
    """With a queue on every node there is no realistic client node: say so, do not pick one."""
    with pytest.raises(ValueError, match="every one of the 2 nodes"):
        client_node({"a.work": 0, "b.work": 1}, 2)


@pytest.mark.parametrize(
    ("queue_type", "replicas", "expected"),
    [
        ("classic", None, {"x-queue-type": "classic", "x-max-priority": 4}),
        ("classic", 3, {"x-queue-type": "classic", "x-max-priority": 4}),
        ("quorum", None, {"x-queue-type": "quorum"}),
        ("quorum", 3, {"x-queue-type": "quorum", "x-quorum-initial-group-size": 3}),
    ],
)
def test_each_queue_type_work_queue_has_its_type_and_arguments(
    queue_type: str, replicas: int | None, expected: dict[str, object]
) -> None:
    """Each queue type's work queue has its type, classic priorities, and replicas if asked."""
    topology = parse_topology({"bench.toml": topology_toml("bench-t", replicas)})
    workload = topology.workload(queue_type_workload(queue_type))
    [work] = [q for q in workload.queues() if q.role == "work"]
    shown = {k: v for k, v in work.arguments.items() if k in expected or k.startswith("x-max")}
    assert shown == expected


def test_the_queue_type_workloads_are_the_same_workload_but_for_the_type() -> None:
    """Classic and quorum share capacity, retry and limits: only the queue type differs."""
    topology = parse_topology({"bench.toml": topology_toml("bench-t", 3)})
    specs = [topology.workload(queue_type_workload(t)).spec for t in QUEUE_TYPES]
    differing = {"queue_type", "replicas"}
    assert len({repr(s.model_dump(exclude=differing)) for s in specs}) == 1
    assert [s.queue_type for s in specs] == ["classic", "quorum"]
