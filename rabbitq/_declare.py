"""Carrying the declared topology to the broker: plan, apply, and check that it exists.

`apply` first plans: it looks at every exchange and queue without creating anything, and stops
with `TopologyDrift` if one exists with other arguments (nothing is touched then). Only a clean
plan is declared: durable, idempotent, never deleting a queue or a message.

RabbitMQ offers no read of a queue's arguments over AMQP, and a passive declare does not compare
them; an active declare with the expected arguments does (406 PRECONDITION_FAILED on a
difference, a no-op on equality), so drift is found with one active declare per existing queue,
each on a throwaway channel since a 406 closes the channel.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from rabbitq import _permissions as permissions
from rabbitq._errors import QueueUnavailable, TopologyDrift, TopologyMissing
from rabbitq._management import Management
from rabbitq._topology import Exchange, Queue, Topology, Workload

logger = logging.getLogger("rabbitq.declare")

# "extra": under the namespace on the broker but no longer declared (reported, never deleted).
Action = Literal["create", "unchanged", "drift", "extra"]

_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']+)'"
    r" in vhost '[^']*': received (?P<received>.+?) but current is (?P<current>.+?)\s*$"
)
_VALUE = re.compile(r"the value '(?P<value>.*)' of type '(?P<type>[^']+)'")


@dataclass(frozen=True, slots=True)
class PlanItem:
    """What `apply` does, or would do, to one object."""

    kind: Literal["exchange", "queue", "binding"]
    name: str
    action: Action
    argument: str = ""
    declared: str = ""
    found: str = ""


def _value(text: str) -> str:
    if text.strip() == "none":
        return "(not set)"
    match = _VALUE.search(text)
    return match["value"] if match else text.strip().strip("'")


def parse_inequivalent(kind: Literal["exchange", "queue"], name: str, reply: str) -> PlanItem:
    """A drift item from the broker's 406 reply text (format stable since RabbitMQ 3.x)."""
    match = _INEQUIVALENT.search(reply)
    if not match:
        return PlanItem(kind, name, "drift", "arguments", "(as declared)", reply)
    return PlanItem(
        kind, name, "drift", match["arg"], _value(match["received"]), _value(match["current"])
    )


async def exists(connection: AbstractConnection, kind: str, name: str) -> bool:
    """Whether an exchange or queue exists: a passive declare on a throwaway channel."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        if kind == "queue":
            await channel.declare_queue(name, passive=True)
        else:
            await channel.get_exchange(name, ensure=True)
        return True
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        # 404 is also what a queue whose node is down answers (a classic queue lives on one
        # node): "home node ... of durable queue ... is down or inaccessible"
        detail = unavailable_detail(exc)
        if kind == "queue" and detail:
            raise QueueUnavailable(name, detail) from None
        return False
    finally:
        if not channel.is_closed:
            await channel.close()


def unavailable_detail(exc: BaseException) -> str:
    """What a 404 says when its queue exists on a node that is down, or "" for a real 404."""
    text = str(exc)
    if "down or inaccessible" not in text:
        return ""
    start = text.find("home node")
    return text[start:].rstrip("')\" ") if start >= 0 else "its node is down or inaccessible"


async def _declare_exchange(channel: AbstractChannel, exchange: Exchange) -> None:
    await channel.declare_exchange(
        exchange.name, aio_pika.ExchangeType(exchange.type), durable=exchange.durable
    )


async def _declare_queue(channel: AbstractChannel, queue: Queue) -> None:
    # a copy: aio-pika's FieldTable type is invariant in its values
    await channel.declare_queue(queue.name, durable=queue.durable, arguments=dict(queue.arguments))


async def _plan_one(connection: AbstractConnection, obj: Exchange | Queue) -> PlanItem:
    kind: Literal["exchange", "queue"] = "queue" if isinstance(obj, Queue) else "exchange"
    if not await exists(connection, kind, obj.name):
        return PlanItem(kind, obj.name, "create")
    channel = await connection.channel(publisher_confirms=False)
    try:
        if isinstance(obj, Queue):
            await _declare_queue(channel, obj)
        else:
            await _declare_exchange(channel, obj)
        return PlanItem(kind, obj.name, "unchanged")
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        return parse_inequivalent(kind, obj.name, str(exc.args[0] if exc.args else exc))
    except aiormq.exceptions.ChannelAccessRefused as exc:
        # comparing arguments is an active declare: a user without configure cannot plan
        raise _refused(exc, "declare (to compare its arguments)") from None
    finally:
        if not channel.is_closed:
            await channel.close()


async def plan(connection: AbstractConnection, topology: Topology) -> list[PlanItem]:
    """What `apply` would do; creates nothing (existing equal objects are left as they are)."""
    objects: list[Exchange | Queue] = [*topology.exchanges(), *topology.queues()]
    items = [await _plan_one(connection, obj) for obj in objects]
    # AMQP cannot read a binding, so one between existing objects counts as there; `apply`
    # binds every one anyway, which is a no-op when it is.
    created = {i.name for i in items if i.action == "create"}
    for b in topology.bindings():
        action: Action = "create" if {b.exchange, b.queue} & created else "unchanged"
        items.append(PlanItem("binding", _binding_name(b.exchange, b.queue, b.routing_key), action))
    return items


def _under(namespace: str) -> re.Pattern[str]:
    """The names rabbitq derives for a namespace, and no other namespace's ("a" vs "a.b")."""
    ns = re.escape(namespace)
    return re.compile(
        rf"^{ns}\.(tasks|retry|parking|delay\.(\d\d|due)"
        rf"|[a-z0-9][a-z0-9_-]*\.(work|parking|retry\..+))$"
    )


def reconcile(
    topology: Topology,
    items: list[PlanItem],
    queues: list[dict[str, Any]],
    exchanges: list[dict[str, Any]],
    bindings: list[dict[str, Any]],
) -> list[PlanItem]:
    """`plan`'s items corrected by what the broker lists, and the objects it no longer declares.

    `queues`, `exchanges` and `bindings` are as the management API lists them. AMQP cannot read
    a binding, so `plan` counts one between existing objects as there; the listing says. A
    queue no longer declared but still holding tasks says how many: an old tier's tasks still
    flow back to the work queue.
    """
    under = _under(topology.namespace)
    listed_b = {(b["source"], b["destination"], b["routing_key"]) for b in bindings}
    declared_b = {_binding_name(b.exchange, b.queue, b.routing_key): b for b in topology.bindings()}
    out: list[PlanItem] = []
    for item in items:
        declared = declared_b.get(item.name) if item.kind == "binding" else None
        if declared and (declared.exchange, declared.queue, declared.routing_key) not in listed_b:
            item = PlanItem("binding", item.name, "create")
        out.append(item)
    declared_q = {q.name for q in topology.queues()}
    declared_x = {x.name for x in topology.exchanges()}
    for x in sorted(exchanges, key=lambda x: str(x["name"])):
        if under.match(x["name"]) and x["name"] not in declared_x:
            out.append(PlanItem("exchange", x["name"], "extra"))
    for q in sorted(queues, key=lambda q: str(q["name"])):
        if under.match(q["name"]) and q["name"] not in declared_q:
            count = q.get("messages")
            out.append(PlanItem("queue", q["name"], "extra", found=f"{count or 0} messages"))
    for listed in bindings:
        name = _binding_name(listed["source"], listed["destination"], listed["routing_key"])
        if under.match(listed["source"]) and name not in declared_b:
            out.append(PlanItem("binding", name, "extra"))
    return out


def _binding_name(exchange: str, queue: str, routing_key: str) -> str:
    return f"{exchange} --{routing_key}--> {queue}"


async def reconcile_listed(
    api: Management, topology: Topology, items: list[PlanItem]
) -> list[PlanItem]:
    """`reconcile` with what the management API lists (one request per kind)."""
    prefix = f"{topology.namespace}."
    return reconcile(
        topology,
        items,
        await api.queues(prefix, ("messages",)),
        await api.exchanges(prefix),
        await api.bindings(),
    )


def short_of_replicas(topology: Topology, running: int) -> list[str]:
    """What to say of each workload declaring more replicas than the cluster runs nodes."""
    return [
        f"workload {w.name} declares replicas = {w.spec.replicas} but {running} node(s) run: "
        f"its new quorum queues get {running}; add nodes, then 'rabbitmq-queues grow NODE all'"
        for w in topology.workloads.values()
        if w.spec.replicas is not None and w.spec.replicas > running
    ]


def raise_on_drift(items: list[PlanItem]) -> None:
    drifted = [i for i in items if i.action == "drift"]
    if drifted:
        first = drifted[0]
        raise TopologyDrift(
            first.kind, first.name, first.argument, first.declared, first.found, len(drifted) - 1
        )


async def apply(connection: AbstractConnection, topology: Topology) -> list[PlanItem]:
    """Declare everything, durable and idempotent; returns what was created or unchanged.

    Raises:
        TopologyDrift: an object exists with other arguments; nothing was declared.
    """
    items = await plan(connection, topology)
    raise_on_drift(items)
    channel = await connection.channel(publisher_confirms=False)
    try:
        await _declare_all(channel, topology)
    except aiormq.exceptions.ChannelAccessRefused as exc:
        # a declare with a dead-letter exchange and a binding need write and read too
        raise _refused(exc, "declare or bind", "configure, write and read") from None
    finally:
        if not channel.is_closed:
            await channel.close()
    for item in items:
        if item.action == "create":
            logger.info("created %s %s", item.kind, item.name)
    return items


def _refused(
    exc: aiormq.exceptions.ChannelAccessRefused, action: str, needs: str = "configure"
) -> Exception:
    """A declare's 403 in our words (a refusal we cannot read stays the broker's error)."""
    refused = permissions.refusal(str(exc), needs, action)
    return refused if refused is not None else exc


async def _declare_all(channel: AbstractChannel, topology: Topology) -> None:
    for exchange in topology.exchanges():
        await _declare_exchange(channel, exchange)
    for queue in topology.queues():
        await _declare_queue(channel, queue)
    for binding in topology.bindings():
        if binding.destination_type == "exchange":
            x = await channel.get_exchange(binding.queue, ensure=False)
            await x.bind(binding.exchange, routing_key=binding.routing_key)
        else:
            q = await channel.get_queue(binding.queue, ensure=False)
            await q.bind(binding.exchange, routing_key=binding.routing_key)


async def check_exists(connection: AbstractConnection, workload: Workload) -> None:
    """Fail fast when a queue or exchange the consumer needs is missing.

    The consumer never declares: a consumer that re-creates what an operator deleted, with
    arguments from its own copy of the topology, hides drift.

    Raises:
        TopologyMissing: naming the first missing object.
        QueueUnavailable: a queue exists but its node is down.
    """
    exchanges = [workload.task_exchange, workload.retry_exchange, workload.parking_exchange]
    for kind, names in (("exchange", exchanges), ("queue", [q.name for q in workload.queues()])):
        for name in names:
            if not await exists(connection, kind, name):
                raise TopologyMissing(kind, name)
