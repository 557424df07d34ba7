"""What each role may do on the broker, as RabbitMQ permissions derived from the topology, and
what the broker's refusals mean.

RabbitMQ grants a user three regular expressions per vhost, matched against the name of the
exchange or queue an operation touches (RabbitMQ's access-control table):

* configure: `exchange.declare`, `queue.declare` and their deletes; a passive declare needs
  nothing, which is all a consumer, a publisher or `status` ever does;
* write: `basic.publish` to an exchange (the default one is matched as `amq.default`),
  `queue.bind` to a queue, `exchange.bind` to the destination, and a queue's dead-letter
  exchange when the queue is declared;
* read: `basic.consume`, `basic.get` and `queue.purge` on a queue, and the source exchange of a
  binding. Read on a queue lets its holder purge it too: RabbitMQ has no finer grain.

Consuming `amq.rabbitmq.reply-to` (a caller's end of direct reply-to) needs no permission.
Every pattern is anchored (`^(...)$`, the broker searches, it does not match whole names), every
name escaped, and `^$` grants nothing. Pure: the CLI prints the result, `rabbitmqctl` applies it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rabbitq import _ladder as ladder
from rabbitq._errors import AccessRefused, PublishRefused, UsageError
from rabbitq._topology import Topology, Workload

ROLES = ("deployer", "worker", "publisher", "operator")
NOTHING = "^$"
# What the broker calls the default exchange in permission checks (an empty name would match
# `^$`, which grants nothing).
DEFAULT_EXCHANGE = "amq.default"
# The ladder's level exchanges and queues, 00 to 27, and nothing past them.
_LEVEL_DIGITS = r"[01][0-9]|2[0-7]"
assert ladder.LEVELS == 28, "_LEVEL_DIGITS lists the levels"

_REFUSED = re.compile(
    r"access to (?P<kind>queue|exchange) '(?P<name>[^']*)' in vhost '(?P<vhost>[^']*)' "
    r"refused for user '(?P<user>[^']*)'"
)


@dataclass(frozen=True, slots=True)
class Grant:
    """One role's permissions: the alternatives of each pattern (regex fragments, escaped)."""

    role: str
    purpose: str
    namespace: str
    configure: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    read: tuple[str, ...] = ()

    @property
    def patterns(self) -> tuple[str, str, str]:
        """configure, write, read, as `rabbitmqctl set_permissions` takes them."""
        return tuple(  # type: ignore[return-value]  # three in, three out
            anchored(alternatives, self.namespace)
            for alternatives in (self.configure, self.write, self.read)
        )


def anchored(alternatives: Sequence[str], namespace: str = "") -> str:
    """One anchored pattern for the alternatives; `^$` (nothing) for none.

    The names in `namespace` (fragments starting with its escaped prefix) share that prefix
    once: `^(ns\\.(?:tasks|retry)|amq\\.default)$`.
    """
    unique = list(dict.fromkeys(alternatives))
    if not unique:
        return NOTHING
    prefix = _prefix(namespace) if namespace else None
    inside = [a[len(prefix) :] for a in unique if prefix and a.startswith(prefix)]
    outside = [a for a in unique if not (prefix and a.startswith(prefix))]
    fragments = ([f"{prefix}{_either(inside)}"] if inside else []) + outside
    return f"^({'|'.join(fragments)})$"


def _prefix(namespace: str) -> str:
    return rf"{re.escape(namespace)}\."


def _either(fragments: Sequence[str]) -> str:
    return fragments[0] if len(fragments) == 1 else f"(?:{'|'.join(fragments)})"


def _in_namespace(topology: Topology, suffixes: Sequence[str]) -> tuple[str, ...]:
    """The namespace's names ending in each of `suffixes` (fragments), one alternative each."""
    return tuple(f"{_prefix(topology.namespace)}{suffix}" for suffix in suffixes)


def _workload_names(workload: Workload, kinds: Iterable[str]) -> str:
    """`W\\.(?:work|parking|retry\\.(?:1s|10s))`: the workload's queues of these kinds."""
    parts = []
    for kind in kinds:
        if kind == "retry":
            if workload.tiers:
                labels = [re.escape(t.label) for t in workload.tiers]
                parts.append(rf"retry\.{_either(labels)}")
        else:
            parts.append(kind)
    return rf"{re.escape(workload.name)}\.{_either(parts)}"


def _per_workload(workloads: Sequence[Workload], kinds: Sequence[str]) -> list[str]:
    by_kinds: dict[str, list[str]] = {}
    for w in workloads:
        fragment = _workload_names(w, kinds)
        # workloads whose fragments differ only by name share one alternative
        tail = fragment[len(re.escape(w.name)) :]
        by_kinds.setdefault(tail, []).append(re.escape(w.name))
    return [f"{_either(names)}{tail}" for tail, names in by_kinds.items()]


def deployer(topology: Topology) -> Grant:
    """`topology apply` (and `plan`, `check`): declare every exchange, queue and binding.

    A declare needs configure; a queue declared with a dead-letter exchange needs write on
    that exchange and read on the queue; a binding needs write on its destination and read on
    its source. So all three on every object of the namespace, and on nothing else.
    """
    ns = topology.namespace
    if not topology.workloads:
        return Grant("deployer", "declares nothing: the topology has no workloads", ns)
    names = ["tasks", "retry", "parking"]
    if topology.has_ladder:
        names.append(rf"delay\.(?:{_LEVEL_DIGITS}|due)")
    names += _per_workload(list(topology.workloads.values()), ("work", "parking", "retry"))
    every = _in_namespace(topology, names)
    return Grant(
        "deployer",
        "rabbitq topology apply, plan and check: declares every exchange, queue and binding",
        ns,
        every,
        every,
        every,
    )


def worker(topology: Topology, workloads: Sequence[Workload]) -> Grant:
    """`rabbitq consume`: read its work queue; write where it forwards; configure nothing.

    It forwards to the retry exchange (a retry), the parking exchange (a park), the tasks
    exchange (a redelivered task on a classic queue goes to the back of its queue, and child
    tasks go there), and the default exchange (a call's reply over direct reply-to). It
    checks its queues with passive declares, which need no permission.
    """
    exchanges = ["tasks", "parking"]
    if any(w.tiers for w in workloads):
        exchanges.insert(1, "retry")
    names = ", ".join(w.name for w in workloads)
    return Grant(
        "worker",
        f"rabbitq consume {names}: consumes, retries, parks, replies to calls",
        topology.namespace,
        (),
        (*_in_namespace(topology, exchanges), re.escape(DEFAULT_EXCHANGE)),
        _in_namespace(topology, _per_workload(workloads, ("work",))),
    )


def publisher(topology: Topology) -> Grant:
    """`Task.publish`, `publish_many`, `call` and `rabbitq publish`: write only.

    The tasks exchange, and each level exchange of the delay ladder (a delayed task enters at
    the level of its delay's highest bit; the ladder routes it on inside the broker). A call
    consumes `amq.rabbitmq.reply-to`, which needs nothing, and publishes to the tasks
    exchange. No read: a publisher cannot take tasks off a queue.
    """
    exchanges = ["tasks"]
    if topology.has_ladder:
        exchanges.append(rf"delay\.(?:{_LEVEL_DIGITS})")
    return Grant(
        "publisher",
        "publishes tasks (now, delayed) and calls them",
        topology.namespace,
        write=_in_namespace(topology, exchanges),
    )


def operator(topology: Topology, workloads: Sequence[Workload]) -> Grant:
    """`rabbitq parking list|show|replay|purge`, the console, and `status`.

    Reading the parking lot consumes it (as its exclusive consumer, without acks) and purging
    acks what it took: read on the parking lots. A replay publishes to the tasks exchange.
    `status` reads the head of each parking lot (`basic.get`) and passively declares the rest.
    """
    return Grant(
        "operator",
        "rabbitq parking list, show, replay, purge, the console, and status",
        topology.namespace,
        write=_in_namespace(topology, ["tasks"]),
        read=_in_namespace(topology, _per_workload(workloads, ("parking",))),
    )


def grant(topology: Topology, role: str, workloads: Sequence[str] = ()) -> Grant:
    """The permissions of `role`; a worker's and an operator's for `workloads` (all if none).

    Raises:
        UsageError: an unknown role or workload.
    """
    if role not in ROLES:
        raise UsageError(f"--role {role!r} must be one of {', '.join(ROLES)}")
    chosen = [topology.workloads[w] for w in workloads if w in topology.workloads]
    unknown = [w for w in workloads if w not in topology.workloads]
    if unknown:
        known = ", ".join(sorted(topology.workloads)) or "none"
        raise UsageError(f"--workload {unknown[0]!r} is not in the topology (declared: {known})")
    selected = chosen or list(topology.workloads.values())
    if role == "deployer":
        return deployer(topology)
    if role == "worker":
        return worker(topology, selected)
    if role == "publisher":
        return publisher(topology)
    return operator(topology, selected)


def merge(grants: Sequence[Grant]) -> Grant:
    """One user's permissions for several roles: each pattern the union of theirs.

    RabbitMQ keeps one set of permissions per user and vhost, so a user with two roles (a
    worker whose handlers publish delayed tasks) needs their union in one line.
    """
    if len(grants) == 1:
        return grants[0]
    namespaces = {g.namespace for g in grants}
    assert len(namespaces) == 1, "one topology's roles"
    return Grant(
        "+".join(g.role for g in grants),
        "; ".join(g.purpose for g in grants),
        namespaces.pop(),
        tuple(a for g in grants for a in g.configure),
        tuple(a for g in grants for a in g.write),
        tuple(a for g in grants for a in g.read),
    )


def default_user(namespace: str, role: str) -> str:
    return f"{namespace}-{role}"


def command(g: Grant, user: str, vhost: str) -> str:
    """The `rabbitmqctl set_permissions` line that grants `g` to `user` on `vhost`."""
    words = ["rabbitmqctl", "set_permissions", "-p", vhost, user, *g.patterns]
    return " ".join(shlex.quote(w) for w in words)


def refusal(
    text: str, permission: str, action: str, *, publish: bool = False
) -> AccessRefused | None:
    """The error a broker's 403 reply means, or None if `text` is no permission refusal.

    `permission` is what the operation needed (configure, write, read) and `action` what it
    was, in words ("publish to", "consume from"). A queue "in exclusive use" is a 403 too, but
    no permission would help: None.
    """
    match = _REFUSED.search(text)
    if match is None:
        return None
    kind = PublishRefused if publish else AccessRefused
    return kind(match["user"], permission, action, match["kind"], match["name"], match["vhost"])
