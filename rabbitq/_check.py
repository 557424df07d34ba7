"""`rabbitq check`: the broker-side facts that bite in production, each with what to do.

The judgements are pure functions of what was read (`Facts`); `gather` does the reading: the
AMQP handshake (version), `topology plan`, the management API (arguments, policies, alarms) and,
where it can reach the node, `rabbitmqctl` for the node-wide consumer_timeout, which no API
shows.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from rabbitq import _declare as declare
from rabbitq._connection import connect, current_node
from rabbitq._declare import PlanItem
from rabbitq._management import Management, ManagementUnavailable
from rabbitq._topology import PARKING_DELIVERY_LIMIT, Topology, Workload, format_duration

if TYPE_CHECKING:
    from rabbitq._app import App

Status = Literal["ok", "warn", "fail"]
Timeout = int | Literal["disabled"] | None  # ms; "disabled"; None when it could not be read

DEFAULT_CONSUMER_TIMEOUT_MS = 30 * 60 * 1000
# Policy keys that change what happens to a task in a queue rabbitq declared.
RISKY_POLICY_KEYS = {
    "expires": "deletes the queue, and every task in it, once it has no consumer for that long",
    "message-ttl": "expires tasks (in a tier: shortens its delay)",
    "max-length": "drops or dead-letters tasks beyond that many",
    "max-length-bytes": "drops or dead-letters tasks beyond that size",
    "overflow": "changes what happens to tasks when the queue is full",
    "dead-letter-strategy": "changes how dead-lettering is confirmed",
}


@dataclass(frozen=True, slots=True)
class Finding:
    status: Status
    check: str
    subject: str
    message: str


@dataclass(slots=True)
class Facts:
    """What `gather` read; None where it could not."""

    version: str
    plan: list[PlanItem]
    task_timeouts: dict[str, tuple[str, float | None]] | None  # workload -> longest task
    node_timeout: Timeout = None
    queues: dict[str, dict[str, Any]] | None = None  # name -> management listing
    nodes: list[dict[str, Any]] | None = None
    management_error: str = ""


def version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def judge(topology: Topology, facts: Facts) -> list[Finding]:
    """Every finding, in the order an operator reads them."""
    workloads = list(topology.workloads.values())
    out = [
        *_version(facts.version),
        *_topology(facts.plan),
        *_consumer_timeout(workloads, facts),
        *_delivery_limit(workloads, facts),
        *_replicas(workloads, facts),
        *_policies(workloads, facts),
        *_alarms(facts),
    ]
    if facts.management_error:
        out.append(
            Finding(
                "warn",
                "management",
                "broker",
                f"{facts.management_error}; policies, delivery limits, alarms and objects no "
                "longer declared were not checked",
            )
        )
    return out


def _version(version: str) -> list[Finding]:
    v = version_tuple(version)
    if v < (3, 10):
        return [
            Finding(
                "fail",
                "version",
                "broker",
                f"RabbitMQ {version}: rabbitq needs 3.10 or later (quorum-queue TTL and "
                "at-least-once dead-lettering); upgrade the broker",
            )
        ]
    notes = []
    if v < (3, 12):
        notes.append("consumer_timeout is node-wide only (per queue from 3.12)")
    if v < (4, 0):
        notes.append("quorum queues have no priorities")
    else:
        notes.append("quorum queues default to a delivery limit of 20 (rabbitq sets its own)")
    if v >= (4, 3):
        notes.append("consumer_timeout applies to quorum queues only")
    return [Finding("ok", "version", "broker", f"RabbitMQ {version}: {'; '.join(notes)}")]


def _topology(plan: list[PlanItem]) -> list[Finding]:
    out = []
    missing = [i for i in plan if i.action == "create"]
    if missing:
        names = ", ".join(i.name for i in missing[:3]) + (", ..." if len(missing) > 3 else "")
        out.append(
            Finding(
                "fail",
                "topology",
                missing[0].name,
                f"{len(missing)} declared objects missing ({names}): run 'rabbitq topology apply'",
            )
        )
    for item in plan:
        if item.action == "drift":
            out.append(
                Finding(
                    "fail",
                    "topology",
                    item.name,
                    f"{item.argument} is {item.found}, declared {item.declared}: see "
                    "'rabbitq topology plan' (arguments cannot change; a new queue is needed)",
                )
            )
        elif item.action == "extra":
            held = f", {item.found}" if item.found else ""
            out.append(
                Finding(
                    "warn",
                    "topology",
                    item.name,
                    f"{item.kind} no longer declared{held}: delete it once empty",
                )
            )
    if not out:
        out.append(
            Finding("ok", "topology", "namespace", "every exchange, queue and binding as declared")
        )
    return out


def _queue_timeout_ms(listing: dict[str, Any] | None) -> int | None:
    """A queue's own consumer timeout (3.12+): argument or policy, the shorter."""
    if not listing:
        return None
    values = [
        (listing.get("arguments") or {}).get("x-consumer-timeout"),
        (listing.get("effective_policy_definition") or {}).get("consumer-timeout"),
    ]
    found = [int(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return min(found) if found else None


def _consumer_timeout(workloads: list[Workload], facts: Facts) -> list[Finding]:
    out = []
    v = version_tuple(facts.version)
    for w in workloads:
        own = _queue_timeout_ms((facts.queues or {}).get(w.work_queue))
        timeout: Timeout = own if own is not None else facts.node_timeout
        if v >= (4, 3) and w.spec.queue_type == "classic":
            out.append(
                Finding(
                    "ok",
                    "consumer_timeout",
                    w.work_queue,
                    "RabbitMQ 4.3 does not time out consumers of classic queues",
                )
            )
            continue
        if timeout == "disabled":
            out.append(Finding("ok", "consumer_timeout", w.work_queue, "disabled on the broker"))
            continue
        if facts.task_timeouts is None:
            seen = "unknown" if timeout is None else format_duration(timeout / 1000)
            out.append(
                Finding(
                    "warn",
                    "consumer_timeout",
                    w.work_queue,
                    f"consumer_timeout {seen}; give --app to compare it with the task timeouts",
                )
            )
            continue
        task, longest = facts.task_timeouts.get(w.name, ("", 0.0))
        if not task:
            continue
        if timeout is None:
            out.append(
                Finding(
                    "warn",
                    "consumer_timeout",
                    w.work_queue,
                    "could not read the broker's consumer_timeout (default 30m); on a broker "
                    "node run: rabbitmqctl eval 'application:get_env(rabbit, consumer_timeout).'",
                )
            )
            continue
        where = "x-consumer-timeout or policy" if own is not None else "consumer_timeout"
        if longest is None:
            out.append(
                Finding(
                    "warn",
                    "consumer_timeout",
                    w.work_queue,
                    f"task {task!r} has no timeout: a run longer than {where} "
                    f"{format_duration(timeout / 1000)} closes the channel and returns every "
                    "task on it; give it timeout_seconds",
                )
            )
        elif timeout <= longest * 1000:
            need = round(longest * 1000 * 1.5 + 60_000)
            out.append(
                Finding(
                    "fail",
                    "consumer_timeout",
                    w.work_queue,
                    f"{where} {format_duration(timeout / 1000)} is not longer than the "
                    f"timeout of task {task!r} ({format_duration(longest)}): the broker closes the "
                    "channel mid-task and every task on it runs again; set consumer_timeout = "
                    f"{need} (ms) in rabbitmq.conf, or shorten the task's timeout",
                )
            )
        else:
            out.append(
                Finding(
                    "ok",
                    "consumer_timeout",
                    w.work_queue,
                    f"{where} {format_duration(timeout / 1000)} is longer than the longest "
                    f"task timeout ({task!r}, {format_duration(longest)})",
                )
            )
    return out


def _limit_of(listing: dict[str, Any], version: str) -> tuple[int | None, str]:
    """A quorum queue's effective delivery limit (the lower of argument and policy), and whence."""
    argument = (listing.get("arguments") or {}).get("x-delivery-limit")
    policy = (listing.get("effective_policy_definition") or {}).get("delivery-limit")
    found = [
        (int(v), where)
        for v, where in ((argument, "the queue's argument"), (policy, listing.get("policy")))
        if isinstance(v, int) and not isinstance(v, bool)
    ]
    if found:
        limit, where = min(found, key=lambda item: item[0])
        return limit, str(where or "a policy")
    return (20, "4.x's default") if version_tuple(version) >= (4, 0) else (None, "")


def _delivery_limit(workloads: list[Workload], facts: Facts) -> list[Finding]:
    if facts.queues is None:
        return []
    out = []
    for w in workloads:
        lot = facts.queues.get(w.parking_queue)
        if w.spec.parking_queue_type == "quorum" and lot is not None:
            out.append(_parking_limit(w, lot, facts.version))
        listing = facts.queues.get(w.work_queue)
        if w.spec.queue_type != "quorum" or listing is None:
            continue
        limit, whence = _limit_of(listing, facts.version)
        wanted = w.spec.max_redeliveries
        if limit is not None and limit < wanted:
            out.append(
                Finding(
                    "fail",
                    "delivery_limit",
                    w.work_queue,
                    f"quorum delivery limit {limit} (from {whence}) is below max_redeliveries "
                    f"{wanted}: the broker dead-letters a task that keeps killing its consumer "
                    "before rabbitq parks it with its reason; raise the policy's delivery-limit "
                    f"to at least {wanted}, or lower max_redeliveries",
                )
            )
        else:
            shown = "none" if limit is None else str(limit)
            out.append(
                Finding(
                    "ok",
                    "delivery_limit",
                    w.work_queue,
                    f"quorum delivery limit {shown}, max_redeliveries {wanted}",
                )
            )
    return out


def _parking_limit(w: Workload, listing: dict[str, Any], version: str) -> Finding:
    """A quorum parking lot counts every read as a delivery: a low limit drops parked tasks."""
    limit, whence = _limit_of(listing, version)
    if limit is not None and limit < PARKING_DELIVERY_LIMIT:
        return Finding(
            "fail",
            "delivery_limit",
            w.parking_queue,
            f"quorum parking lot with a delivery limit of {limit} (from {whence}): each read "
            "of the lot (parking list, the console) counts as a delivery, and at the limit the "
            "broker drops the parked task; exclude the lot from that policy",
        )
    return Finding(
        "ok", "delivery_limit", w.parking_queue, "quorum parking lot, no reachable limit"
    )


def _replicas(workloads: list[Workload], facts: Facts) -> list[Finding]:
    """Each quorum queue has a leader, its replicas online, and as many as declared."""
    if facts.queues is None:
        return []
    out = []
    for w in workloads:
        for q in w.queues():
            listing = facts.queues.get(q.name)
            if q.arguments.get("x-queue-type") != "quorum" or not listing:
                continue
            members = list(listing.get("members") or [])
            online = list(listing.get("online") or [])
            if "members" not in listing:
                continue  # the listing does not say (a broker without quorum details)
            if not listing.get("leader") or len(online) * 2 <= len(members):
                out.append(
                    Finding(
                        "fail",
                        "replicas",
                        q.name,
                        f"no leader: {len(online)} of {len(members)} replicas online; the queue "
                        "takes no task until a majority of its nodes is back",
                    )
                )
            elif len(online) < len(members):
                down = ", ".join(sorted(set(members) - set(online)))
                out.append(
                    Finding(
                        "warn",
                        "replicas",
                        q.name,
                        f"{len(online)} of {len(members)} replicas online (down: {down}); one "
                        "more node lost and it stops",
                    )
                )
            wanted = w.spec.replicas
            if wanted is not None and len(members) < wanted:
                out.append(
                    Finding(
                        "warn",
                        "replicas",
                        q.name,
                        f"{len(members)} replicas, {wanted} declared (nodes were missing when it "
                        "was declared); add them with 'rabbitmq-queues grow NODE all' on each new "
                        "node",
                    )
                )
    return out


def _policies(workloads: list[Workload], facts: Facts) -> list[Finding]:
    if facts.queues is None:
        return []
    out = []
    for w in workloads:
        for q in w.queues():
            listing = facts.queues.get(q.name) or {}
            applied = listing.get("effective_policy_definition") or {}
            for key, value in sorted(applied.items()):
                if key in RISKY_POLICY_KEYS:
                    out.append(
                        Finding(
                            "fail" if key == "expires" else "warn",
                            "policy",
                            q.name,
                            f"policy {listing.get('policy')!r} sets {key}={value}, which "
                            f"{RISKY_POLICY_KEYS[key]}; exclude rabbitq's queues from it",
                        )
                    )
    return out


def _alarms(facts: Facts) -> list[Finding]:
    if facts.nodes is None:
        return []
    out = []
    for node in facts.nodes:
        name = str(node.get("name", "?"))
        if node.get("running") is False:
            out.append(Finding("warn", "node", name, "node is not running"))
            continue
        for key, what in (("mem_alarm", "memory"), ("disk_free_alarm", "disk")):
            if node.get(key):
                out.append(
                    Finding(
                        "fail",
                        "alarm",
                        name,
                        f"{what} alarm: every publisher is blocked until it clears; free "
                        f"{what} or raise the watermark",
                    )
                )
    if not out:
        out.append(Finding("ok", "alarm", "cluster", f"no alarms on {len(facts.nodes)} node(s)"))
    return out


def parse_consumer_timeout(text: str) -> Timeout:
    """The answer of `rabbitmqctl eval 'application:get_env(rabbit, consumer_timeout).'`."""
    text = text.strip()
    match = re.fullmatch(r"\{ok,\s*(\d+)\}", text)
    if match:
        return int(match[1])
    if text in ("{ok,undefined}", "{ok,false}", "{ok,infinity}"):
        return "disabled"
    if text == "undefined":  # not set: the built-in default
        return DEFAULT_CONSUMER_TIMEOUT_MS
    return None


async def read_node_timeout(node: str | None) -> Timeout:
    """The node-wide consumer_timeout through rabbitmqctl, or None if it cannot reach the node."""
    if shutil.which("rabbitmqctl") is None:
        return None
    args = ["rabbitmqctl", *(["-n", node] if node else []), "-q", "eval"]
    try:
        process = await asyncio.create_subprocess_exec(
            *args,
            "application:get_env(rabbit, consumer_timeout).",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 15)
    except (OSError, TimeoutError):
        return None
    return parse_consumer_timeout(out.decode(errors="replace")) if process.returncode == 0 else None


def to_json(findings: list[Finding]) -> dict[str, Any]:
    return {
        "ok": not any(f.status == "fail" for f in findings),
        "findings": [asdict(f) for f in findings],
    }


def longest_timeouts(app: App) -> dict[str, tuple[str, float | None]]:
    """Per workload, the task with the longest timeout (no timeout counts as the longest)."""
    out: dict[str, tuple[str, float | None]] = {}
    for name, task in sorted(app.tasks.items()):
        seen = out.get(task.workload)
        if (
            seen is None
            or seen[1] is not None
            and (task.timeout_seconds is None or task.timeout_seconds > seen[1])
        ):
            out[task.workload] = (name, task.timeout_seconds)
    return out


QUEUE_COLUMNS = (
    "arguments",
    "policy",
    "effective_policy_definition",
    "type",
    "members",
    "online",
    "leader",
)


async def gather(url: str, api: Management, topology: Topology, app: App | None) -> Facts:
    """Read everything `judge` looks at; what cannot be read is left None, with the reason."""
    connection = await connect(url, "check")
    try:
        transport = connection.transport
        props = transport.connection.server_properties if transport else {}
        version = str(props.get("version", "0.0"))
        items = await declare.plan(connection, topology)
    finally:
        await connection.close()
    facts = Facts(version, items, None if app is None else longest_timeouts(app))
    node: str | None = None
    try:
        facts.plan = await declare.reconcile_listed(api, topology, items)
        listing = await api.queues(f"{topology.namespace}.", QUEUE_COLUMNS)
        facts.queues = {q["name"]: q for q in listing}
        facts.nodes = await api.nodes()
        node = (await api.overview()).get("node")
    except ManagementUnavailable as exc:
        facts.management_error = str(exc)
    host = urlsplit(current_node(url)).hostname or "localhost"
    if node or host in ("localhost", "127.0.0.1", "::1"):
        facts.node_timeout = await read_node_timeout(node)
    return facts
