"""The declared topology: workloads read from `topology/*.toml`, and every name derived from them.

This is the only module that builds exchange and queue names or x-arguments. It is pure: it
parses text it is handed and returns values; `declare` talks to the broker.

Per namespace there are three durable direct exchanges; per workload a work queue, one queue per
retry tier and a parking lot::

    publish ─► NS.tasks ──rk=W──► NS.W.work ── fail ─► NS.retry ──rk=W.1s──► NS.W.retry.1s
                                      ▲                                        │ x-message-ttl
                                      └───────── dead-letter rk=W ─────────────┘
    retries exhausted or poison ─► NS.parking ──rk=W──► NS.W.parking   (no TTL, no DLX, no limit)

Why one queue per tier: RabbitMQ expires messages only at the head of a queue, so a queue with
one fixed TTL keeps expiry order equal to arrival order (no head-of-line blocking). Tier queues
dead-letter with a fixed routing key straight back to the work queue, and have no consumers and
no `x-expires`, or the delay would vanish or the queue be deleted with its tasks.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NewType

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from rabbitq import _ladder as ladder
from rabbitq._errors import TopologyInvalid

QueueName = NewType("QueueName", str)
ExchangeName = NewType("ExchangeName", str)
RoutingKey = NewType("RoutingKey", str)

DEFAULT_NAMESPACE = "rabbitq"
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
NAMESPACE_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
_START = ", starting with a letter or digit (at most 63 characters)"
_IN_WORDS = {  # the patterns, as a person reading the error wants them
    NAME_PATTERN: f"a workload name must be lower-case letters, digits, '_' and '-'{_START}",
    NAMESPACE_PATTERN: f"a namespace must be lower-case letters, digits, '_', '-' and '.'{_START}",
}
# The same limit a 4.x broker enforces by default; a task queue rarely needs more than a fraction.
MAX_MESSAGE_BYTES_LIMIT = 16 * 1024 * 1024
# Quorum queues count deliveries; 20 is RabbitMQ 4.0's own default, stated explicitly so that
# every version behaves the same and a crash-looping task is parked, not dropped.
QUORUM_DELIVERY_LIMIT = 20
# A quorum parking lot's limit: every read of the lot (`parking list`, the console) returns the
# copies it took, and a quorum queue counts each return as a delivery, dropping the task at its
# limit (20 by default from 4.0). No sequence of reads reaches this one, on any version; 4.0's
# `-1` (no limit) is not read the same way by 3.x. On 4.x a set limit also puts returned copies
# back near the head, so a read keeps the lot's order.
PARKING_DELIVERY_LIMIT = 1_000_000_000

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


def parse_duration(text: str | float) -> float:
    """Seconds in a duration such as "50ms", "1s", "10m", "1h" (a bare number is seconds).

    Raises:
        ValueError: the text is not a positive duration.
    """
    if isinstance(text, bool):
        raise ValueError("expected a duration such as '10s'")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        match = _DURATION.match(text)
        if not match:
            raise ValueError("expected a duration such as '500ms', '10s', '5m', '1h' or '2d'")
        seconds = float(match[1]) * _UNITS[match[2]]
    seconds = round(seconds, 3)  # RabbitMQ TTLs are whole milliseconds
    if seconds <= 0:
        raise ValueError("a duration must be at least 1ms")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact label for a delay: 0.05 -> "50ms", 60 -> "1m", 90 -> "90s"."""
    ms = round(seconds * 1000)
    for unit, factor in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % factor == 0:
            return f"{ms // factor}{unit}"
    return f"{ms}ms"


def _duration(value: Any) -> Any:
    return parse_duration(value) if isinstance(value, str | int | float) else value


class RetrySpec(BaseModel):
    """How a workload retries: an ordered list of delay tiers and a cap on attempts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tiers: list[Annotated[float, BeforeValidator(_duration)]] = Field(
        default_factory=lambda: [1.0, 10.0, 60.0]
    )
    max_attempts: int = Field(default=4, ge=1, le=1000)

    @field_validator("tiers")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError("tiers must be strictly increasing, shortest first")
        if len(value) > 20:
            raise ValueError("at most 20 tiers")
        return value

    @model_validator(mode="after")
    def _tiers_for_retries(self) -> RetrySpec:
        if self.max_attempts > 1 and not self.tiers:
            raise ValueError("max_attempts > 1 needs at least one tier")
        return self


class WorkloadSpec(BaseModel):
    """One workload as written in a topology file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_type: Literal["classic", "quorum"] = "classic"
    max_priority: int | None = Field(default=None, ge=1, le=255)
    capacity: int = Field(default=16, ge=1, le=10_000)
    max_message_bytes: int = Field(default=1024 * 1024, ge=64, le=MAX_MESSAGE_BYTES_LIMIT)
    # Deliveries that may come back unsettled (the consumer died or was cut off while the task
    # ran) before the task is parked as crash_loop.
    max_redeliveries: int = Field(default=5, ge=1, le=QUORUM_DELIVERY_LIMIT)
    # Copies of each quorum queue (the work queue if quorum, and the tiers) a cluster keeps:
    # `x-quorum-initial-group-size`. Unset: the broker's default (3 on RabbitMQ 4.x). An
    # argument like any other: changing it on existing queues is drift.
    replicas: int | None = Field(default=None, ge=1, le=99)
    # The parking lot's type. Classic (the default) lives on one node: on a cluster, while that
    # node is down, nothing can be parked and consumers wait for it. Quorum replicates it.
    parking_queue_type: Literal["classic", "quorum"] = "classic"
    retry: RetrySpec = Field(default_factory=RetrySpec)

    @field_validator("max_priority")
    @classmethod
    def _priority_fits_type(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("queue_type") == "quorum":
            raise ValueError(
                "max_priority is for classic queues; quorum queues have no priorities before "
                "RabbitMQ 4.0 and a fixed two levels after"
            )
        return value

    @property
    def priority_levels(self) -> int:
        """Classic queues get 5 levels (0-4) unless told otherwise: few levels stay cheap."""
        if self.queue_type == "quorum":
            return 0
        return 4 if self.max_priority is None else self.max_priority


class TopologyFile(BaseModel):
    """The contents of one `topology/*.toml` file."""

    model_config = ConfigDict(extra="forbid")

    namespace: Annotated[str, Field(pattern=NAMESPACE_PATTERN)] | None = None
    # The namespace's delay ladder (`_ladder.py`: 28 quorum queues) for tasks published with a
    # delay; a namespace that never delays a task may leave it out.
    delays: bool | None = None
    workloads: dict[Annotated[str, Field(pattern=NAME_PATTERN)], WorkloadSpec] = Field(
        default_factory=dict
    )


@dataclass(frozen=True, slots=True)
class Exchange:
    name: ExchangeName
    type: str = "direct"
    durable: bool = True


@dataclass(frozen=True, slots=True)
class Queue:
    name: QueueName
    role: Literal["work", "tier", "parking", "delay"]
    workload: str  # "" for a delay level: the namespace's workloads share the ladder
    arguments: dict[str, str | int] = field(default_factory=dict)
    durable: bool = True


@dataclass(frozen=True, slots=True)
class Binding:
    exchange: ExchangeName
    queue: QueueName  # the destination: an exchange's name when `destination_type` says so
    routing_key: RoutingKey
    destination_type: Literal["queue", "exchange"] = "queue"


@dataclass(frozen=True, slots=True)
class Tier:
    """One retry delay queue of a workload."""

    index: int
    delay_seconds: float
    label: str
    queue: QueueName
    routing_key: RoutingKey


@dataclass(frozen=True, slots=True)
class Workload:
    """A workload with every name it needs, derived once."""

    name: str
    namespace: str
    spec: WorkloadSpec
    source: str
    task_exchange: ExchangeName
    retry_exchange: ExchangeName
    parking_exchange: ExchangeName
    routing_key: RoutingKey
    work_queue: QueueName
    parking_queue: QueueName
    tiers: tuple[Tier, ...]

    @property
    def capacity(self) -> int:
        return self.spec.capacity

    def queues(self) -> list[Queue]:
        """Work queue, tiers shortest first, parking lot; with their x-arguments."""
        qtype = self.spec.queue_type
        base: dict[str, str | int] = {"x-queue-type": qtype}
        # Quorum dead-lettering is at-most-once unless asked; at-least-once needs reject-publish.
        at_least_once: dict[str, str | int] = {
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        safe_dl = at_least_once if qtype == "quorum" else {}
        work: dict[str, str | int] = dict(base)
        if self.spec.priority_levels:
            work["x-max-priority"] = self.spec.priority_levels
        if qtype == "quorum":
            work["x-delivery-limit"] = QUORUM_DELIVERY_LIMIT
        group: dict[str, str | int] = {}
        if self.spec.replicas is not None:
            group["x-quorum-initial-group-size"] = self.spec.replicas
        if qtype == "quorum":
            work |= group
        # Only rejections and quorum delivery-limit deaths leave the work queue through its DLX,
        # and they go to parking, never into a tier: no TTL here, so no dead-letter cycle.
        work |= {
            "x-dead-letter-exchange": self.parking_exchange,
            "x-dead-letter-routing-key": self.routing_key,
            **safe_dl,
        }
        queues = [Queue(self.work_queue, "work", self.name, work)]
        for tier in self.tiers:
            # Tiers are quorum queues whatever the workload's type: a classic queue
            # dead-letters at-most-once, so a task whose TTL ran out while the broker stopped
            # could vanish between the tier and the work queue (seen in the soak). A quorum
            # tier republishes with confirms until the work queue has it. Tiers need no
            # priorities: the message keeps its priority for when it is back in the work queue.
            args: dict[str, str | int] = {
                "x-queue-type": "quorum",
                "x-message-ttl": round(tier.delay_seconds * 1000),
                "x-dead-letter-exchange": self.task_exchange,
                "x-dead-letter-routing-key": self.routing_key,
                **at_least_once,
                **group,
            }
            queues.append(Queue(tier.queue, "tier", self.name, args))
        # Classic unless asked, whatever the workload's type. A quorum lot gets a delivery limit
        # no reads reach (PARKING_DELIVERY_LIMIT) and no dead-letter exchange: nothing leaves it
        # but a replay or a purge.
        parking: dict[str, str | int] = {"x-queue-type": self.spec.parking_queue_type}
        if self.spec.parking_queue_type == "quorum":
            parking |= {"x-delivery-limit": PARKING_DELIVERY_LIMIT, **group}
        queues.append(Queue(self.parking_queue, "parking", self.name, parking))
        return queues

    def bindings(self) -> list[Binding]:
        out = [Binding(self.task_exchange, self.work_queue, self.routing_key)]
        out += [Binding(self.retry_exchange, t.queue, t.routing_key) for t in self.tiers]
        out.append(Binding(self.parking_exchange, self.parking_queue, self.routing_key))
        return out

    def due_binding(self) -> Binding:
        """How a task whose delay is over reaches the work queue, out of the delay ladder."""
        due = ExchangeName(ladder.due_exchange(self.namespace))
        return Binding(due, self.work_queue, RoutingKey(ladder.due_pattern(self.name)))

    def flow(self) -> str:
        """How a task moves, in one line."""
        steps = [f"{self.task_exchange} -> {self.work_queue}"]
        max_attempts = self.spec.retry.max_attempts
        for attempt in range(1, max_attempts):
            tier = self.tiers[min(attempt - 1, len(self.tiers) - 1)]
            steps.append(f"fails (attempt {attempt}) -> {tier.queue} ({tier.label}) -> work")
        steps.append(f"fails (attempt {max_attempts}) or poison -> {self.parking_queue}")
        return " | ".join(steps)


def derive_workload(namespace: str, name: str, spec: WorkloadSpec, source: str = "") -> Workload:
    """Every name of one workload. The only place where names are built."""
    prefix = f"{namespace}.{name}"
    labels = [format_duration(delay) for delay in spec.retry.tiers]
    tiers = tuple(
        Tier(i, delay, label, QueueName(f"{prefix}.retry.{label}"), RoutingKey(f"{name}.{label}"))
        for i, (delay, label) in enumerate(zip(spec.retry.tiers, labels, strict=True))
    )
    return Workload(
        name=name,
        namespace=namespace,
        spec=spec,
        source=source,
        task_exchange=task_exchange(namespace),
        retry_exchange=_exchange(namespace, "retry"),
        parking_exchange=_exchange(namespace, "parking"),
        routing_key=RoutingKey(name),
        work_queue=work_queue(namespace, name),
        parking_queue=QueueName(f"{prefix}.parking"),
        tiers=tiers,
    )


_EXCHANGE_KINDS = ("tasks", "retry", "parking")
_LEVELS = range(ladder.LEVELS)


def _exchange(namespace: str, kind: str) -> ExchangeName:
    return ExchangeName(f"{namespace}.{kind}")


def task_exchange(namespace: str) -> ExchangeName:
    """The exchange a task is published to, for code that knows only the namespace."""
    return _exchange(namespace, "tasks")


def work_queue(namespace: str, workload: str) -> QueueName:
    """A workload's work queue, for code that knows only the names."""
    return QueueName(f"{namespace}.{workload}.work")


@dataclass(frozen=True, slots=True)
class Topology:
    """All workloads of one namespace, and the delay ladder they share (unless `delays` is
    off)."""

    namespace: str
    workloads: dict[str, Workload]
    delays: bool = True

    def workload(self, name: str) -> Workload:
        if name not in self.workloads:
            known = ", ".join(sorted(self.workloads)) or "none"
            raise TopologyInvalid(
                "topology", "workload", name, f"no such workload (declared: {known})"
            )
        return self.workloads[name]

    @property
    def has_ladder(self) -> bool:
        return self.delays and bool(self.workloads)

    def exchanges(self) -> list[Exchange]:
        out = [Exchange(_exchange(self.namespace, k)) for k in _EXCHANGE_KINDS if self.workloads]
        if self.has_ladder:
            ns = self.namespace
            out += [Exchange(ExchangeName(ladder.level_name(ns, i)), "topic") for i in _LEVELS]
            out.append(Exchange(ExchangeName(ladder.due_exchange(ns)), "topic"))
        return out

    def queues(self) -> list[Queue]:
        return [q for w in self.workloads.values() for q in w.queues()] + self.ladder_queues()

    def ladder_queues(self) -> list[Queue]:
        """The delay levels, shortest first: quorum, one TTL each, dead-lettering one level
        down with at-least-once safety (`_ladder.py` says why)."""
        if not self.has_ladder:
            return []
        declared = [w.spec.replicas for w in self.workloads.values() if w.spec.replicas]
        group: dict[str, str | int] = {}
        if declared:  # the ladder holds every workload's delayed tasks: as safe as the safest
            group["x-quorum-initial-group-size"] = max(declared)
        return [
            Queue(
                QueueName(ladder.level_name(self.namespace, i)),
                "delay",
                "",
                {
                    "x-queue-type": "quorum",
                    "x-message-ttl": ladder.level_seconds(i) * 1000,
                    "x-dead-letter-exchange": ladder.lower(self.namespace, i),
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                    **group,
                },
            )
            for i in _LEVELS
        ]

    def ladder_summary(self) -> dict[str, Any] | None:
        """The ladder in a few facts, for `topology show`; None without one."""
        if not self.has_ladder:
            return None
        ns = self.namespace
        return {
            "levels": ladder.LEVELS,
            "first": ladder.level_name(ns, 0),
            "last": ladder.level_name(ns, ladder.LEVELS - 1),
            "longest_level_seconds": ladder.level_seconds(ladder.LEVELS - 1),
            "max_delay_seconds": ladder.MAX_DELAY_SECONDS,
            "max_delay": ladder.format_seconds(ladder.MAX_DELAY_SECONDS),
            "due_exchange": ladder.due_exchange(ns),
        }

    def bindings(self) -> list[Binding]:
        out = [b for w in self.workloads.values() for b in w.bindings()]
        if self.has_ladder:
            out += self.ladder_bindings()
        return out

    def ladder_bindings(self) -> list[Binding]:
        """Per level: digit 1 into its queue, digit 0 one level down; then due to each work
        queue."""
        out = []
        for i in _LEVELS:
            name = ExchangeName(ladder.level_name(self.namespace, i))
            one, zero = (RoutingKey(p) for p in ladder.level_patterns(i))
            out.append(Binding(name, QueueName(name), one))
            lower = QueueName(ladder.lower(self.namespace, i))
            out.append(Binding(name, lower, zero, "exchange"))
        return out + [w.due_binding() for w in self.workloads.values()]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, stable snake_case keys."""
        return {
            "namespace": self.namespace,
            "exchanges": [asdict(e) for e in self.exchanges()],
            "queues": [asdict(q) for q in self.queues()],
            "bindings": [asdict(b) for b in self.bindings()],
            "delays": self.ladder_summary(),
            "workloads": {
                w.name: {
                    "source": w.source,
                    "capacity": w.capacity,
                    "queue_type": w.spec.queue_type,
                    "max_attempts": w.spec.retry.max_attempts,
                    "tiers": [
                        {"label": t.label, "delay_seconds": t.delay_seconds, "queue": t.queue}
                        for t in w.tiers
                    ],
                    "max_message_bytes": w.spec.max_message_bytes,
                    "flow": w.flow(),
                }
                for w in self.workloads.values()
            },
        }


def _field_path(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)[1:]


# the model of a key's table by the key's depth: top level, [workloads.W], [workloads.W.retry]
_TABLES: dict[int, type[BaseModel]] = {1: TopologyFile, 3: WorkloadSpec, 4: RetrySpec}


def _problem(err: ErrorDetails) -> tuple[str, Any, str]:
    """One pydantic error in our words: field path, bad value, what is wrong."""
    loc, value = tuple(err["loc"]), err.get("input")
    if err["type"] == "extra_forbidden":
        known = list(_TABLES[len(loc)].model_fields)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
        problem = f"unknown key ({hint})"
    elif err["type"] == "string_pattern_mismatch":
        problem = _IN_WORDS[err["ctx"]["pattern"]]
        if loc[:1] == ("workloads",):
            loc = ("workloads",)  # a bad key in a dict: pydantic puts "[key]" in loc
    else:
        problem = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    return _field_path(loc), "{...}" if isinstance(value, dict) else value, problem


def parse_file(source: str, text: str) -> TopologyFile:
    """Validate one file's text.

    Raises:
        TopologyInvalid: naming the file, and the field path and bad value of every problem.
    """
    try:
        return TopologyFile.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise TopologyInvalid(source, "", "", f"not valid TOML: {exc}") from None
    except ValidationError as exc:
        first, *more = [_problem(err) for err in exc.errors()]
        raise TopologyInvalid(source, *first, *more) from None


def parse_topology(files: Mapping[str, str], namespace: str | None = None) -> Topology:
    """Merge the files of a topology directory into one namespace.

    Args:
        files: file name to text, in the order they should be read.
        namespace: overrides the namespace the files declare (for shared vhosts and test runs).
    """
    declared_ns: tuple[str, str] | None = None
    declared_delays: tuple[str, bool] | None = None
    specs: dict[str, tuple[str, WorkloadSpec]] = {}
    for source, text in files.items():
        parsed = parse_file(source, text)
        if parsed.namespace is not None:
            if declared_ns is not None and declared_ns[1] != parsed.namespace:
                raise TopologyInvalid(
                    source,
                    "namespace",
                    parsed.namespace,
                    f"{declared_ns[0]} declares namespace {declared_ns[1]!r}; use one namespace",
                )
            declared_ns = (source, parsed.namespace)
        if parsed.delays is not None:
            if declared_delays is not None and declared_delays[1] != parsed.delays:
                raise TopologyInvalid(
                    source,
                    "delays",
                    parsed.delays,
                    f"{declared_delays[0]} declares delays = {str(declared_delays[1]).lower()}; "
                    "say it once",
                )
            declared_delays = (source, parsed.delays)
        for name, spec in parsed.workloads.items():
            if name in specs:
                raise TopologyInvalid(
                    source,
                    f"workloads.{name}",
                    "{...}",
                    f"workload already declared in {specs[name][0]}",
                )
            specs[name] = (source, spec)
    if namespace is not None and not re.match(NAMESPACE_PATTERN, namespace):
        raise TopologyInvalid("--namespace", "namespace", namespace, _IN_WORDS[NAMESPACE_PATTERN])
    ns = namespace or (declared_ns[1] if declared_ns else DEFAULT_NAMESPACE)
    return Topology(
        namespace=ns,
        workloads={n: derive_workload(ns, n, s, src) for n, (src, s) in specs.items()},
        delays=True if declared_delays is None else declared_delays[1],
    )


def load_topology(directory: Path, namespace: str | None = None) -> Topology:
    """Read every `*.toml` file in `directory` (sorted by name) and merge them.

    Raises:
        TopologyInvalid: the directory is missing or has no files, or one does not validate.
    """
    if not directory.exists():
        raise TopologyInvalid(
            str(directory),
            "",
            "",
            "no such directory; point --topology "
            "(or RABBITQ_TOPOLOGY) at the directory of the *.toml files",
        )
    paths = [directory] if directory.is_file() else sorted(directory.glob("*.toml"))
    if not paths:
        raise TopologyInvalid(str(directory), "", "", "no *.toml topology files found")
    files = {str(p): p.read_text(encoding="utf-8") for p in paths}
    return parse_topology(files, namespace)
