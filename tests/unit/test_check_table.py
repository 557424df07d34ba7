"""`rabbitq check`'s judgements, plan's reading of the broker's listing, and export, as tables."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from rabbitq import App
from rabbitq._check import (
    DEFAULT_CONSUMER_TIMEOUT_MS,
    Facts,
    Finding,
    Timeout,
    judge,
    longest_timeouts,
    parse_consumer_timeout,
)
from rabbitq._declare import PlanItem, reconcile
from rabbitq._definitions import definitions
from rabbitq._topology import PARKING_DELIVERY_LIMIT, Topology, parse_topology

TOML = """
namespace = "ns"
[workloads.q]
queue_type = "quorum"
max_redeliveries = 5
[workloads.c]
"""


@pytest.fixture
def topo() -> Topology:
    return parse_topology({"t.toml": TOML})


def found(findings: list[Finding], check: str) -> list[tuple[str, str]]:
    return [(f.status, f.subject) for f in findings if f.check == check]


def facts(**kw: Any) -> Facts:
    base: dict[str, Any] = {"version": "3.13.7", "plan": [], "task_timeouts": None}
    return Facts(**(base | kw))


@pytest.mark.parametrize(
    ("node", "longest", "version", "expected"),
    [
        (60_000, 120.0, "3.13.7", "fail"),  # shorter than the task's timeout
        (120_000, 120.0, "3.13.7", "fail"),  # equal is too short: the check runs late
        (1_800_000, 120.0, "3.13.7", "ok"),
        ("disabled", 120.0, "3.13.7", "ok"),
        (None, 120.0, "3.13.7", "warn"),  # unknown: say how to read it
        (1_800_000, None, "3.13.7", "warn"),  # a task without timeout
    ],
)
def test_consumer_timeout_against_the_longest_task(
    topo: Topology, node: Timeout, longest: float | None, version: str, expected: str
) -> None:
    timeouts = {"q": ("long", longest), "c": ("short", 1.0)}
    findings = judge(topo, facts(version=version, node_timeout=node, task_timeouts=timeouts))
    assert ("ns.q.work" in [s for _, s in found(findings, "consumer_timeout")]) is True
    assert dict((s, st) for st, s in found(findings, "consumer_timeout"))["ns.q.work"] == expected


def test_a_queues_own_consumer_timeout_wins_over_the_node(topo: Topology) -> None:
    queues = {"ns.q.work": {"effective_policy_definition": {"consumer-timeout": 10_000}}}
    findings = judge(
        topo,
        facts(node_timeout=3_600_000, task_timeouts={"q": ("t", 60.0)}, queues=queues, nodes=[]),
    )
    assert ("fail", "ns.q.work") in found(findings, "consumer_timeout")


def test_rabbitmq_43_does_not_time_out_classic_queues(topo: Topology) -> None:
    findings = judge(
        topo,
        facts(
            version="4.3.0", node_timeout=1000, task_timeouts={"c": ("t", 60.0), "q": ("t", 60.0)}
        ),
    )
    statuses = dict((s, st) for st, s in found(findings, "consumer_timeout"))
    assert statuses == {"ns.c.work": "ok", "ns.q.work": "fail"}


def test_without_an_app_the_timeout_is_shown_with_a_warning(topo: Topology) -> None:
    findings = judge(topo, facts(node_timeout=DEFAULT_CONSUMER_TIMEOUT_MS))
    assert {st for st, _ in found(findings, "consumer_timeout")} == {"warn"}
    assert all("--app" in f.message for f in findings if f.check == "consumer_timeout")


@pytest.mark.parametrize(
    ("arguments", "policy", "version", "expected"),
    [
        ({"x-delivery-limit": 20}, {}, "3.13.7", "ok"),
        ({"x-delivery-limit": 20}, {"delivery-limit": 2}, "3.13.7", "fail"),  # the lower wins
        ({"x-delivery-limit": 4}, {}, "3.13.7", "fail"),
        ({"x-delivery-limit": 5}, {}, "3.13.7", "ok"),  # equal: rabbitq parks first
        ({}, {}, "3.13.7", "ok"),  # no limit before 4.0
        ({}, {"delivery-limit": 3}, "4.1.0", "fail"),
    ],
)
def test_quorum_delivery_limit_against_max_redeliveries(
    topo: Topology,
    arguments: dict[str, int],
    policy: dict[str, int],
    version: str,
    expected: str,
) -> None:
    listing = {"ns.q.work": {"arguments": arguments, "effective_policy_definition": policy}}
    findings = judge(topo, facts(version=version, queues=listing, nodes=[]))
    assert found(findings, "delivery_limit") == [(expected, "ns.q.work")]


@pytest.mark.parametrize(
    ("definition", "expected"),
    [
        ({"expires": 60000}, [("fail", "ns.c.work")]),
        ({"max-length": 10}, [("warn", "ns.c.work")]),
        ({"ha-mode": "all"}, []),
    ],
)
def test_policies_that_touch_tasks_are_named(
    topo: Topology, definition: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    listing = {"ns.c.work": {"policy": "p", "effective_policy_definition": definition}}
    assert found(judge(topo, facts(queues=listing, nodes=[])), "policy") == expected


def test_alarms_fail_and_their_absence_is_said(topo: Topology) -> None:
    nodes = [{"name": "a", "running": True, "mem_alarm": True, "disk_free_alarm": False}]
    assert found(judge(topo, facts(nodes=nodes)), "alarm") == [("fail", "a")]
    clear = [{"name": "a", "running": True, "mem_alarm": False, "disk_free_alarm": False}]
    assert found(judge(topo, facts(nodes=clear)), "alarm") == [("ok", "cluster")]


@pytest.mark.parametrize(
    ("version", "status", "words"),
    [
        ("3.9.29", "fail", "3.10 or later"),
        ("3.10.8", "ok", "node-wide only"),
        ("4.0.5", "ok", "delivery limit of 20"),
        ("4.3.0", "ok", "quorum queues only"),
    ],
)
def test_the_version_says_what_differs(
    topo: Topology, version: str, status: str, words: str
) -> None:
    [finding] = [f for f in judge(topo, facts(version=version)) if f.check == "version"]
    assert finding.status == status and words in finding.message


def test_missing_objects_are_one_finding_drift_and_extras_one_each(topo: Topology) -> None:
    plan = [
        PlanItem("queue", "ns.q.work", "create"),
        PlanItem("queue", "ns.c.work", "create"),
        PlanItem("queue", "ns.q.parking", "drift", "x-queue-type", "classic", "quorum"),
        PlanItem("queue", "ns.old.work", "extra", found="3 messages"),
    ]
    got = [(f.status, f.subject) for f in judge(topo, facts(plan=plan)) if f.check == "topology"]
    assert got == [("fail", "ns.q.work"), ("fail", "ns.q.parking"), ("warn", "ns.old.work")]
    assert found(judge(topo, facts()), "topology") == [("ok", "namespace")]


def test_no_management_is_a_warning_naming_what_was_not_checked(topo: Topology) -> None:
    findings = judge(topo, facts(management_error="no management API"))
    [warning] = [f for f in findings if f.check == "management"]
    assert warning.status == "warn" and "policies" in warning.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{ok,1800000}\n", 1_800_000),
        ("{ok,undefined}", "disabled"),
        ("undefined", DEFAULT_CONSUMER_TIMEOUT_MS),
        ("Error: unable to perform an operation on node", None),
    ],
)
def test_parse_consumer_timeout(text: str, expected: Timeout) -> None:
    assert parse_consumer_timeout(text) == expected


class P(BaseModel):
    n: int


def test_longest_timeouts_counts_no_timeout_as_the_longest() -> None:
    app = App(namespace="ns")

    @app.task("a", workload="w", timeout_seconds=10)
    async def a(p: P) -> None: ...

    @app.task("b", workload="w", timeout_seconds=30)
    async def b(p: P) -> None: ...

    @app.task("c", workload="v", timeout_seconds=5)
    async def c(p: P) -> None: ...

    @app.task("d", workload="v")
    async def d(p: P) -> None: ...

    assert longest_timeouts(app) == {"w": ("b", 30), "v": ("d", None)}


def listed(topo: Topology) -> tuple[list[dict[str, Any]], ...]:
    queues = [{"name": q.name, "messages": 0} for q in topo.queues()]
    exchanges = [{"name": x.name} for x in topo.exchanges()]
    bindings = [
        {"source": b.exchange, "destination": b.queue, "routing_key": b.routing_key}
        for b in topo.bindings()
    ]
    return queues, exchanges, bindings


def unchanged(topo: Topology) -> list[PlanItem]:
    items = [PlanItem("exchange", x.name, "unchanged") for x in topo.exchanges()]
    items += [PlanItem("queue", q.name, "unchanged") for q in topo.queues()]
    items += [
        PlanItem("binding", f"{b.exchange} --{b.routing_key}--> {b.queue}", "unchanged")
        for b in topo.bindings()
    ]
    return items


def test_reconcile_in_sync_changes_nothing(topo: Topology) -> None:
    assert reconcile(topo, unchanged(topo), *listed(topo)) == unchanged(topo)


def test_reconcile_reports_what_is_no_longer_declared_and_leaves_other_namespaces(
    topo: Topology,
) -> None:
    queues, exchanges, bindings = listed(topo)
    queues += [
        {"name": "ns.old.work", "messages": 7},
        {"name": "ns.q.retry.5s", "messages": 0},
        {"name": "ns.b.c.work", "messages": 0},  # namespace "ns.b", not ours
        {"name": "nsx.c.work", "messages": 0},
        {"name": "ns.notes", "messages": 0},  # not a name rabbitq derives
    ]
    exchanges += [{"name": "ns.b.tasks"}, {"name": "amq.direct"}]
    bindings += [{"source": "ns.tasks", "destination": "ns.old.work", "routing_key": "old"}]
    extra = [
        i
        for i in reconcile(topo, unchanged(topo), queues, exchanges, bindings)
        if i.action == "extra"
    ]
    assert [(i.kind, i.name, i.found) for i in extra] == [
        ("queue", "ns.old.work", "7 messages"),
        ("queue", "ns.q.retry.5s", "0 messages"),
        ("binding", "ns.tasks --old--> ns.old.work", ""),
    ]


def test_reconcile_marks_a_missing_binding_to_create(topo: Topology) -> None:
    queues, exchanges, bindings = listed(topo)
    gone = bindings.pop(0)
    items = reconcile(topo, unchanged(topo), queues, exchanges, bindings)
    name = f"{gone['source']} --{gone['routing_key']}--> {gone['destination']}"
    assert [i.name for i in items if i.action == "create"] == [name]


def test_definitions_hold_every_declared_object_in_the_vhost(topo: Topology) -> None:
    doc = definitions(topo, "prod")
    assert {q["name"] for q in doc["queues"]} == {q.name for q in topo.queues()}
    assert {x["name"] for x in doc["exchanges"]} == {x.name for x in topo.exchanges()}
    assert len(doc["bindings"]) == len(topo.bindings())
    assert {o["vhost"] for kind in ("queues", "exchanges", "bindings") for o in doc[kind]} == {
        "prod"
    }
    work = next(q for q in doc["queues"] if q["name"] == "ns.q.work")
    assert work["arguments"]["x-dead-letter-exchange"] == "ns.parking"
    assert work["durable"] is True and work["auto_delete"] is False


@pytest.mark.parametrize(
    ("members", "online", "leader", "expected"),
    [
        (["a", "b", "c"], ["a", "b", "c"], "a", []),
        (["a", "b", "c"], ["a", "c"], "a", [("warn", "ns.q.work")]),
        (["a", "b", "c"], ["a"], "a", [("fail", "ns.q.work")]),  # no majority
        (["a", "b", "c"], ["a", "b", "c"], None, [("fail", "ns.q.work")]),
    ],
)
def test_a_quorum_queue_needs_a_leader_and_its_replicas(
    topo: Topology, members: list[str], online: list[str], leader: str | None, expected: Any
) -> None:
    listing = {"ns.q.work": {"members": members, "online": online, "leader": leader}}
    assert found(judge(topo, facts(queues=listing, nodes=[])), "replicas") == expected


def test_fewer_replicas_than_declared_are_named() -> None:
    declared = parse_topology({"t.toml": TOML.replace("max_redeliveries = 5", "replicas = 3")})
    one = {"members": ["a"], "online": ["a"], "leader": "a"}
    listing = {q.name: one for q in declared.workload("q").queues()}
    findings = judge(declared, facts(queues=listing, nodes=[]))
    names = [s for st, s in found(findings, "replicas") if st == "warn"]
    # the work queue and its tiers (quorum), not the classic parking lot
    assert names == [q.name for q in declared.workload("q").queues()][:-1]
    assert "3 declared" in next(f.message for f in findings if f.check == "replicas")


def test_a_cluster_short_of_the_declared_replicas_is_said() -> None:
    from rabbitq._declare import short_of_replicas

    declared = parse_topology({"t.toml": TOML.replace("max_redeliveries = 5", "replicas = 3")})
    assert short_of_replicas(declared, 3) == []
    [note] = short_of_replicas(declared, 1)
    assert "workload q declares replicas = 3 but 1 node(s) run" in note


@pytest.mark.parametrize(
    ("arguments", "policy", "expected"),
    [
        ({"x-delivery-limit": PARKING_DELIVERY_LIMIT}, {}, "ok"),
        ({"x-delivery-limit": PARKING_DELIVERY_LIMIT}, {"delivery-limit": 20}, "fail"),
        ({}, {}, "fail"),  # 4.x's default of 20: the 21st read would drop a parked task
    ],
)
def test_a_quorum_parking_lot_must_have_no_limit_a_read_can_reach(
    arguments: dict[str, int], policy: dict[str, int], expected: str
) -> None:
    topo = parse_topology(
        {"t.toml": TOML.replace("[workloads.c]", 'parking_queue_type = "quorum"\n[workloads.c]')}
    )
    listing = {"ns.q.parking": {"arguments": arguments, "effective_policy_definition": policy}}
    findings = judge(topo, facts(version="4.1.0", queues=listing, nodes=[]))
    assert found(findings, "delivery_limit") == [(expected, "ns.q.parking")]
