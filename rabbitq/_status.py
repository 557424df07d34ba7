"""What each workload's queues hold now, for `rabbitq status` (and the console after it).

The counts come from two places. A passive declare of every queue (AMQP, always there) gives
the ready count and the consumers, as of this moment. The management API, where it answers,
adds what AMQP cannot see: the unacked ("running") count and the message rates, as of the
broker's last statistics round (up to 5 s old). Without it those are None, unknown, never 0.
A ready count leaves out what is unacked, so a parking lot being browsed at that moment
(`parking list`, a replay) reads as emptier than it is.

The age of the oldest parked task is read from the head of the parking lot (which keeps park
order): one `basic.get`, never acked; closing its channel puts the copy back where it was
(RABBITMQ.md 10.1; a quorum lot counts it, far below its delivery limit). That read is the
only thing here that needs a permission (read on the parking lot; a passive declare needs
none): without it the age is unknown, with a note saying what is missing. The park time is in
the copy's headers, to the millisecond.

Nothing here acks, publishes or declares anything. Merging the two sources and shaping the
JSON document are pure functions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiormq
from aio_pika.abc import AbstractConnection

from rabbitq import _parking as parking
from rabbitq import _permissions as permissions
from rabbitq._errors import AccessRefused, TopologyMissing
from rabbitq._management import Management, ManagementUnavailable
from rabbitq._topology import Workload

# What `read` asks the management API for, per queue (dotted: nested in its answer).
COLUMNS = (
    "messages_ready",
    "messages_unacknowledged",
    "consumers",
    "message_stats.publish_details.rate",
    "message_stats.deliver_get_details.rate",
    "message_stats.ack_details.rate",
)
HEAD_READ_TIMEOUT_SECONDS = 5.0
NO_MANAGEMENT = "running counts and rates are unknown: {reason}"


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """What a passive declare says of one queue."""

    ready: int
    consumers: int


@dataclass(frozen=True, slots=True)
class Rates:
    """Messages a second over the broker's last statistics round; None where it did not say."""

    published_per_second: float | None  # into the work queue (new tasks, retries, replays)
    delivered_per_second: float | None  # to its consumers
    acked_per_second: float | None  # by its consumers: tasks done (or moved on)
    parked_per_second: float | None  # into the parking lot

    def facts(self) -> dict[str, float | None]:
        return {
            "published_per_second": self.published_per_second,
            "delivered_per_second": self.delivered_per_second,
            "acked_per_second": self.acked_per_second,
            "parked_per_second": self.parked_per_second,
        }


@dataclass(frozen=True, slots=True)
class WorkloadStatus:
    """One workload's queues: what waits, what runs, what is parked."""

    name: str
    work_queue: str
    ready: int
    running: int | None  # unacked on the work queue; None without the management API
    consumers: int
    tiers: tuple[tuple[str, int], ...]  # (label, depth), shortest delay first
    parked: int
    oldest_parked_at: float | None  # seconds since the epoch
    rates: Rates | None  # None without the management API

    def oldest_parked_age_seconds(self, now: float) -> float | None:
        return age_seconds(self.oldest_parked_at, now)

    def facts(self, now: float) -> dict[str, Any]:
        """What `status --json` prints for it."""
        return {
            "work_queue": self.work_queue,
            "ready": self.ready,
            "running": self.running,
            "consumers": self.consumers,
            "tiers": dict(self.tiers),
            "parked": self.parked,
            "oldest_parked_at": self.oldest_parked_at,
            "oldest_parked_age_seconds": self.oldest_parked_age_seconds(now),
            "rates": None if self.rates is None else self.rates.facts(),
        }


@dataclass(frozen=True, slots=True)
class Status:
    """Every workload asked for, and what could not be seen."""

    namespace: str
    workloads: tuple[WorkloadStatus, ...]
    management: bool  # the management API answered
    notes: tuple[str, ...] = ()
    delayed: int | None = None  # tasks in the namespace's delay ladder; None: no ladder

    @property
    def note(self) -> str | None:
        return "; ".join(self.notes) or None

    def document(self, now: float) -> dict[str, Any]:
        """The `status --json` document: stable keys, workloads in topology order."""
        return {
            "namespace": self.namespace,
            "management": self.management,
            "note": self.note,
            "delayed": self.delayed,
            "workloads": {w.name: w.facts(now) for w in self.workloads},
        }


def age_seconds(since: float | None, now: float) -> float | None:
    """Seconds from `since` to `now`, never negative (clocks differ by a little), to the ms."""
    return None if since is None else round(max(0.0, now - since), 3)


def _get(queue: Mapping[str, Any], path: str) -> Any:
    value: Any = queue
    for key in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _rate(queue: Mapping[str, Any] | None, path: str) -> float | None:
    """A rate from the management API's queue; a queue it has counted but whose rate it left
    out had no such traffic (it omits `message_stats` of a queue never published to): 0.0."""
    if queue is None or "messages_unacknowledged" not in queue:
        return None  # not listed yet, or not counted yet (a new queue): unknown
    found = _get(queue, path)
    return 0.0 if found is None else _number(found)


def combine(
    workload: Workload,
    counts: Mapping[str, QueueCounts],
    stats: Mapping[str, Mapping[str, Any]] | None,
    oldest_parked_at: float | None,
) -> WorkloadStatus:
    """One workload's status from the passive declares' `counts` and the management API's
    `stats` (queue name to its queue; None when the API did not answer).

    Ready counts and consumers are AMQP's, which are live; running and rates are the API's.
    """
    work = counts[workload.work_queue]
    rates = None
    running = None
    if stats is not None:
        work_stats = stats.get(workload.work_queue)
        parking_stats = stats.get(workload.parking_queue)
        unacked = None if work_stats is None else _number(work_stats.get("messages_unacknowledged"))
        running = None if unacked is None else int(unacked)
        rates = Rates(
            published_per_second=_rate(work_stats, "message_stats.publish_details.rate"),
            delivered_per_second=_rate(work_stats, "message_stats.deliver_get_details.rate"),
            acked_per_second=_rate(work_stats, "message_stats.ack_details.rate"),
            parked_per_second=_rate(parking_stats, "message_stats.publish_details.rate"),
        )
    return WorkloadStatus(
        name=workload.name,
        work_queue=workload.work_queue,
        ready=work.ready,
        running=running,
        consumers=work.consumers,
        tiers=tuple((t.label, counts[t.queue].ready) for t in workload.tiers),
        parked=counts[workload.parking_queue].ready,
        oldest_parked_at=oldest_parked_at,
        rates=rates,
    )


async def read(
    connection: AbstractConnection,
    namespace: str,
    workloads: Sequence[Workload],
    api: Management,
    ladder: Sequence[str] = (),
) -> Status:
    """The status of `workloads`, from the broker behind `connection` and its management API,
    and how many tasks wait in the delay `ladder` (its queues' names), if there is one.

    Raises:
        TopologyMissing: a queue of one of the workloads does not exist.
    """
    # The API's answer comes off a thread: ask it while the passive declares run.
    (stats, unseen), counts = await asyncio.gather(
        _stats(api, namespace),
        _declared(connection, [q.name for w in workloads for q in w.queues()]),
    )
    delayed, notes = None, [] if unseen is None else [NO_MANAGEMENT.format(reason=unseen)]
    if ladder:
        try:
            delayed = sum(c.ready for c in (await _declared(connection, ladder)).values())
        except TopologyMissing:  # declared in the files, not yet on the broker (an upgrade)
            notes.append("the delay ladder is not declared: run 'rabbitq topology apply'")
    statuses = []
    for workload in workloads:
        oldest = None
        if counts[workload.parking_queue].ready:
            try:
                oldest = await _head_parked_at(connection, workload)
            except AccessRefused as exc:  # the rest needs no permission: say what is missing
                notes.append(f"the age of the oldest parked task is unknown: {exc}")
        statuses.append(combine(workload, counts, stats, oldest))
    return Status(namespace, tuple(statuses), stats is not None, tuple(notes), delayed)


async def _stats(
    api: Management, namespace: str
) -> tuple[dict[str, Mapping[str, Any]] | None, str | None]:
    """The namespace's queues by name, or why the management API did not say."""
    try:
        return {q["name"]: q for q in await api.queues(f"{namespace}.", COLUMNS)}, None
    except ManagementUnavailable as exc:
        return None, str(exc)


async def _declared(connection: AbstractConnection, names: Sequence[str]) -> dict[str, QueueCounts]:
    channel = await connection.channel()
    counts: dict[str, QueueCounts] = {}
    try:
        for name in names:
            try:
                declared = await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise TopologyMissing("queue", name) from None
            result = declared.declaration_result
            counts[name] = QueueCounts(result.message_count or 0, result.consumer_count or 0)
    finally:
        if not channel.is_closed:  # a missing queue closed it
            await channel.close()
    return counts


async def _head_parked_at(connection: AbstractConnection, workload: Workload) -> float | None:
    """When the parking lot's head was parked; the copy stays where it was."""
    channel = await connection.channel()
    try:
        queue = await channel.get_queue(workload.parking_queue, ensure=False)
        # Not a consumer: a basic.get shows no consumer on the parking lot while it reads.
        try:
            head = await queue.get(no_ack=False, fail=False, timeout=HEAD_READ_TIMEOUT_SECONDS)
        except aiormq.exceptions.ChannelAccessRefused as exc:
            refused = permissions.refusal(str(exc), "read", "read the head of")
            if refused is None:
                raise
            raise refused from None
        if head is None:  # taken meanwhile (a replay holds them all unacked)
            return None
        stamp = None if head.timestamp is None else head.timestamp.timestamp()
        return parking.parked_at(dict(head.headers or {}), stamp)
    finally:
        if not channel.is_closed:  # a refusal closed it
            await channel.close()  # never acked: the close puts it back at the head
