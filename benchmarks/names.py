"""Every queue name and workload the benchmark uses, derived from one run namespace.

rabbitq's own names come from `rabbitq._topology` (this module only writes the topology text it
parses); the raw baseline's queues are named here and nowhere else, under the same namespace so
that one prefix finds everything a run made.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

CAPACITIES = (1, 16, 64, 256)
# The concurrency the targets are stated at (latency, retry, memory, scale).
CAPACITY = 64
RETRY_TIER = "50ms"
RETRY_TTL_MS = 50
# Long enough that nothing comes back while 100k tasks wait; the run deletes the queues.
PARKED_TIER = "10m"
PARKED_TTL_MS = 600_000

# rabbitq workloads: name -> (capacity, retry tier)
WORKLOADS: dict[str, tuple[int, str]] = {
    "publish": (CAPACITY, "1s"),
    **{f"drain-c{c}": (c, "1s") for c in CAPACITIES},
    "latency": (CAPACITY, "1s"),
    "retry": (CAPACITY, RETRY_TIER),
    "tiers": (CAPACITY, PARKED_TIER),
    "scale": (CAPACITY, "1s"),
    "calls": (CAPACITY, "1s"),
    # issue #14: delayed against immediate tasks (the ladder is the namespace's, not its own)
    "delays": (CAPACITY, "1s"),
}
DELAYS_WORKLOAD = "delays"


def queue_type_workload(queue_type: str) -> str:
    return f"qt-{queue_type}"


# The queue_types scenario: one workload per queue type, the same in everything else, used for
# its batch publish and its capacity-64 drain (purged between). rabbitq's classic work queue
# keeps its default priorities; a quorum queue has none on 3.10.
QUEUE_TYPES = ("classic", "quorum")
QUEUE_TYPE_WORKLOADS = {queue_type_workload(qtype): qtype for qtype in QUEUE_TYPES}
WORKLOADS |= {name: (CAPACITY, "1s") for name in QUEUE_TYPE_WORKLOADS}


def new_namespace() -> str:
    """A namespace no other run uses (and that rabbitq's namespace pattern accepts)."""
    return f"bench-{uuid.uuid4().hex[:8]}"


def drain_workload(capacity: int) -> str:
    return f"drain-c{capacity}"


def topology_toml(namespace: str, replicas: int | None = None) -> str:
    """The rabbitq topology of a run: one workload per scenario, default queue arguments.

    Args:
        replicas: on a cluster, the replicas of every quorum queue of the queue_types
            workloads (`x-quorum-initial-group-size`); None leaves the broker's default.
    """
    lines = [f'namespace = "{namespace}"']
    for name, (capacity, tier) in WORKLOADS.items():
        lines += ["", f"[workloads.{name}]"]
        if name in QUEUE_TYPE_WORKLOADS:
            lines.append(f'queue_type = "{QUEUE_TYPE_WORKLOADS[name]}"')
            if replicas is not None:
                lines.append(f"replicas = {replicas}")
        lines += [
            f"capacity = {capacity}",
            f"[workloads.{name}.retry]",
            f'tiers = ["{tier}"]',
            "max_attempts = 2",
        ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class RawQueue:
    """A raw baseline queue; `ttl_ms` and `dead_letter_to` make it a delay queue."""

    name: str
    ttl_ms: int | None = None
    dead_letter_to: str | None = None

    def arguments(self) -> dict[str, Any]:
        if self.ttl_ms is None:
            return {}
        assert self.dead_letter_to is not None
        # Expired messages go back through the default exchange to the work queue.
        return {
            "x-message-ttl": self.ttl_ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.dead_letter_to,
        }


@dataclass(frozen=True, slots=True)
class RawQueues:
    """The raw baseline's durable classic queues (no priority, no dead-lettering: minimal)."""

    publish: RawQueue
    drain: RawQueue
    latency: RawQueue
    retry: RawQueue
    retry_delay: RawQueue
    tiers: RawQueue
    tiers_delay: RawQueue
    scale: RawQueue
    calls: RawQueue

    @classmethod
    def of(cls, namespace: str) -> RawQueues:
        def name(role: str) -> str:
            return f"{namespace}.raw.{role}"

        return cls(
            publish=RawQueue(name("publish")),
            drain=RawQueue(name("drain")),
            latency=RawQueue(name("latency")),
            retry=RawQueue(name("retry")),
            retry_delay=RawQueue(name(f"retry.{RETRY_TIER}"), RETRY_TTL_MS, name("retry")),
            tiers=RawQueue(name("tiers")),
            tiers_delay=RawQueue(name(f"tiers.{PARKED_TIER}"), PARKED_TTL_MS, name("tiers")),
            scale=RawQueue(name("scale")),
            calls=RawQueue(name("calls")),
        )

    def all(self) -> list[RawQueue]:
        return [
            self.publish,
            self.drain,
            self.latency,
            self.retry,
            self.retry_delay,
            self.tiers,
            self.tiers_delay,
            self.scale,
            self.calls,
        ]
