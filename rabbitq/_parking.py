"""The parking lot, read and grouped: what failed, why and where, without moving anything.

Reading consumes the parking queue without acks and then closes the connection, which puts
every parked copy back where it was (with no other consumer a queue keeps their order;
RABBITMQ.md 10.1). A classic lot counts nothing. A quorum lot (`parking_queue_type`) counts
each return in `x-delivery-count`, so it is declared with a delivery limit no read reaches:
at the limit a copy would be dropped. The read's prefetch is per consumer (never global QoS,
which a quorum queue refuses by closing the connection). What to show, which tasks a filter
selects and how failures group are pure functions of the parked copies' headers; the CLI (and
later the console) call them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiormq

from rabbitq import _permissions as permissions
from rabbitq import _wire as wire
from rabbitq._amqp import ClosedByBroker, ConsumeConnection, Delivery, open_consumer
from rabbitq._connection import client_name, connect, current_node, tls_for
from rabbitq._errors import ParkingBusy, ParkReason, TopologyMissing
from rabbitq._publish import Publisher
from rabbitq._topology import Workload

# A traceback line naming a frame; the line number is left out of a fingerprint, so an edit
# elsewhere in the file does not split a group.
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]*)", line \d+, in (?P<func>\S+)', re.MULTILINE)
BROWSE_SECONDS_PER_1000 = 2.0
READ_WAIT_SECONDS = 60.0  # for another reader of the same parking lot to finish
# A channel's quorum-queue client sends at most 32 commands ahead of the leader's answers and
# holds back the rest, and a channel that closes drops what it held back (rabbit_fifo_client
# SOFT_LIMIT, 3.10 to 4.3): 60 acks and a close on 3.10.8, and 27 purged tasks came back. So a
# quorum lot is taken from in reads of at most this many acks, each read closed and read again.
QUORUM_ACKS_PER_READ = 16
HEADER_HISTORY = "rabbitq-history"  # earlier parks of a replayed task, oldest first
MAX_HISTORY = 5
# What a replayed copy leaves behind: the park and the spent retry budget.
_SPENT = (
    wire.HEADER_ATTEMPT,
    wire.HEADER_FIRST_FAILURE,
    wire.HEADER_LAST_FAILURE,
    wire.HEADER_LAST_ERROR,
    wire.HEADER_REDELIVERIES,
    wire.HEADER_RETRY_AT,
    wire.HEADER_PUBLISHED_AT,
    wire.HEADER_PARKED_AT,
    wire.HEADER_DELIVERY_COUNT,
)


@dataclass(frozen=True, slots=True)
class Parked:
    """One parked task, as its parked copy tells it."""

    message_id: str
    task: str
    reason: str
    error_type: str
    error: str
    traceback: str
    attempts: int
    first_failure: float | None  # seconds since the epoch
    last_failure: float | None
    parked_at: float | None
    headers: dict[str, Any] = field(repr=False)
    body: bytes = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.task, self.error_type, self.traceback)

    def payload(self) -> Any:
        """The body as JSON, or as text when it is not JSON (a poison task's may not be)."""
        try:
            return json.loads(self.body)
        except ValueError:
            return self.body.decode(errors="replace")

    def pretty_payload(self) -> str:
        payload = self.payload()
        return payload if isinstance(payload, str) else json.dumps(payload, indent=2)

    def facts(self, now: float) -> dict[str, Any]:
        """What `parking list --json` prints for it."""
        return {
            "message_id": self.message_id,
            "task": self.task,
            "reason": self.reason,
            "error_type": self.error_type,
            "error": self.error,
            "attempts": self.attempts,
            "first_failure": self.first_failure,
            "last_failure": self.last_failure,
            "parked_at": self.parked_at,
            "age_seconds": None if self.parked_at is None else round(now - self.parked_at, 3),
            "fingerprint": self.fingerprint,
        }


def _ms(headers: dict[str, Any], name: str) -> float | None:
    value = headers.get(name)
    return value / 1000 if isinstance(value, int) and not isinstance(value, bool) else None


def _text(headers: dict[str, Any], name: str) -> str:
    value = headers.get(name, "")
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def parked_at(headers: dict[str, Any], timestamp_s: float | None) -> float | None:
    """When a copy was parked: rabbitq's header in ms, else its `timestamp` (which rabbitq sets
    to the park time; a copy the broker dead-lettered keeps its publish time there)."""
    return _ms(headers, wire.HEADER_PARKED_AT) or timestamp_s


def broker_death(headers: dict[str, Any]) -> tuple[ParkReason, str] | None:
    """Why the broker itself moved a task into the parking lot, with no consumer involved:
    the reason and what happened, from its latest `x-death`; None if rabbitq parked it.

    The work queue dead-letters into the parking lot, so two deaths there arrive without
    rabbitq's headers: an AMQP `expiration` set by the publisher that ran out while the task
    was queued (`expired`), and a quorum work queue's delivery limit (`crash_loop`: it was
    handed out and returned that often). rabbitq's own parked copies never carry `x-death`.
    """
    if wire.HEADER_PARK_REASON in headers:
        return None
    deaths = headers.get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
        return None
    latest = deaths[0]  # the broker puts the most recent death first
    why, queue = _text(latest, "reason"), _text(latest, "queue")
    if why == "expired":
        ttl = _text(latest, "original-expiration")
        its = f"its expiration of {ttl} ms" if ttl else "its expiration"
        return ParkReason.EXPIRED, f"{its} ran out in {queue} before a consumer took it"
    if why == "delivery_limit":
        return ParkReason.CRASH_LOOP, f"handed out by {queue} up to its delivery limit"
    return None


def reason_of(headers: dict[str, Any]) -> str:
    """A parked copy's reason: rabbitq's header, else the broker's (`broker_death`), else ''."""
    return _reason(headers, broker_death(headers))


def _reason(headers: dict[str, Any], death: tuple[ParkReason, str] | None) -> str:
    return str(death[0]) if death else _text(headers, wire.HEADER_PARK_REASON)


def parked(delivery: Delivery) -> Parked:
    """A parked copy read back (any message in the parking lot: what it lacks is empty)."""
    props = delivery.properties
    headers = dict(props.headers or {})
    attempts = headers.get(wire.HEADER_PARK_ATTEMPTS, headers.get(wire.HEADER_ATTEMPT, 0))
    death = broker_death(headers)
    return Parked(
        message_id=props.message_id or "",
        task=props.message_type or "",
        reason=_reason(headers, death),
        error_type=_text(headers, wire.HEADER_PARK_ERROR_TYPE),
        error=death[1] if death else _text(headers, wire.HEADER_PARK_ERROR),
        traceback=_text(headers, wire.HEADER_PARK_TRACEBACK),
        attempts=attempts if isinstance(attempts, int) else 0,
        first_failure=_ms(headers, wire.HEADER_FIRST_FAILURE),
        last_failure=_ms(headers, wire.HEADER_LAST_FAILURE),
        parked_at=parked_at(headers, props.timestamp_s),
        headers=headers,
        body=delivery.body,
    )


def frames(traceback: str) -> list[str]:
    """`file:function` of each frame, outermost first, without line numbers or directories
    (so one bug is one group whatever the host's install path)."""
    return [f"{m['file'].rsplit('/', 1)[-1]}:{m['func']}" for m in _FRAME.finditer(traceback)]


def fingerprint(task: str, error_type: str, traceback: str) -> str:
    """Twelve hex digits naming where a task failed: its name, the error type, the frames."""
    where = "\n".join([task, error_type, *frames(traceback)])
    return hashlib.sha256(where.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Filter:
    """Which parked tasks a command works on; unset fields select everything."""

    task: str | None = None
    reason: str | None = None
    error_type: str | None = None
    parked_within: float | None = None  # seconds: parked at most this long ago
    group: str | None = None  # a fingerprint
    ids: frozenset[str] = frozenset()

    def matches(self, task: Parked, now: float) -> bool:
        if self.ids and task.message_id not in self.ids:
            return False
        if self.task is not None and task.task != self.task:
            return False
        if self.reason is not None and task.reason != self.reason:
            return False
        if self.error_type is not None and task.error_type != self.error_type:
            return False
        if self.parked_within is not None and (
            task.parked_at is None or now - task.parked_at > self.parked_within
        ):
            return False
        return self.group is None or task.fingerprint == self.group


@dataclass(slots=True)
class Group:
    """The parked tasks that failed at one place."""

    fingerprint: str
    task: str
    error_type: str
    where: str  # the innermost frame
    count: int = 0
    first_seen: float | None = None
    last_seen: float | None = None
    example: str = ""  # one error message of the group

    def facts(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "task": self.task,
            "error_type": self.error_type,
            "where": self.where,
            "count": self.count,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "example": self.example,
        }


def groups(tasks: Iterable[Parked]) -> list[Group]:
    """One group per fingerprint, the largest first."""
    found: dict[str, Group] = {}
    for task in tasks:
        key = task.fingerprint
        group = found.get(key)
        if group is None:
            where = (frames(task.traceback) or [""])[-1]
            group = found[key] = Group(key, task.task, task.error_type, where, example=task.error)
        group.count += 1
        if task.parked_at is not None:
            group.first_seen = min(group.first_seen or task.parked_at, task.parked_at)
            group.last_seen = max(group.last_seen or task.parked_at, task.parked_at)
    return sorted(found.values(), key=lambda g: (-g.count, g.fingerprint))


async def browse(url: str, workload: Workload) -> list[Parked]:
    """Every task in the parking lot, in order, all left exactly where they were.

    Raises:
        ConnectionFailed: the broker cannot be reached.
        TopologyMissing: the workload's parking queue does not exist.
    """
    connection, deliveries = await _read(url, workload)
    await connection.close()  # nothing acked: every copy goes back, in its order
    return [parked(d) for d in deliveries]


async def _read(url: str, workload: Workload) -> tuple[ConsumeConnection, list[Delivery]]:
    """The parking lot's deliveries, in order, held unacked on the returned connection.

    One reader at a time: the read consumes as the queue's exclusive consumer, so a second
    reader (another `parking list`, a replay, the console) waits its turn instead of each
    getting part of the lot. A reader that took its count while another held the copies may
    count a few short (those returned in that instant); nothing is moved by it.
    """
    deadline = time.monotonic() + READ_WAIT_SECONDS
    while True:
        try:
            return await _read_once(url, workload)
        except ClosedByBroker as exc:
            refused = permissions.refusal(str(exc), "read", "read the parking lot")
            if refused is not None:  # the user may not read it: no wait would help
                raise refused from None
            if "403" not in str(exc):  # 403 ACCESS_REFUSED: in exclusive use by another reader
                raise
            if time.monotonic() > deadline:
                raise ParkingBusy(workload.parking_queue, READ_WAIT_SECONDS) from None
        await asyncio.sleep(0.05)


async def _read_once(url: str, workload: Workload) -> tuple[ConsumeConnection, list[Delivery]]:
    # The copies come to the exclusive consumer as fast as the broker sends them (no
    # prefetch limit); once the queue says none is ready, a round trip on the consumer's own
    # channel brings in every copy sent before it. No count taken up front: one taken while
    # another reader still held copies would be short.
    queue = workload.parking_queue
    got: list[Delivery] = []
    lost = asyncio.Event()
    reading = ConsumeConnection(got.append, lambda _reason: lost.set())
    control = await connect(url, f"parking {workload.name}")
    try:
        channel = await control.channel()

        async def ready() -> int:
            try:
                declared = await channel.declare_queue(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise TopologyMissing("queue", queue) from None
            return declared.declaration_result.message_count or 0

        count = await ready()
        node, context = tls_for(current_node(url))  # the node the control connection reached
        name = client_name(f"parking {workload.name}")
        await open_consumer(reading, node, name, queue, prefetch=0, exclusive=True, context=context)
        deadline = time.monotonic() + 10 + count / 1000 * BROWSE_SECONDS_PER_1000
        while await ready() and not lost.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls the broker
            await asyncio.sleep(0.01)
        await reading.round_trip()
        # What arrives after the round trip is not part of this reading. The consumer stays:
        # cancelling it would let the next reader in while these copies are still out.
        taken = len(got)
    except BaseException:
        await reading.close()
        raise
    finally:
        await control.close()
    return reading, got[:taken]


def select(tasks: list[Parked], chosen: Filter, now: float | None = None) -> list[Parked]:
    when = time.time() if now is None else now
    return [task for task in tasks if chosen.matches(task, when)]


def replay_copy(task: Parked, workload: Workload, now: float) -> wire.Outgoing:
    """The task sent back to its work queue: a fresh attempt budget, its parks in a bounded
    history (the last MAX_HISTORY), everything else it carried kept."""
    earlier = task.headers.get(HEADER_HISTORY)
    history = list(earlier)[-(MAX_HISTORY - 1) :] if isinstance(earlier, list) else []
    history.append(
        {
            "reason": task.reason,
            "error_type": task.error_type,
            "error": task.error[:200],
            "attempts": task.attempts,
            "parked_at": wire.epoch_ms(task.parked_at or now),
        }
    )
    kept = {
        k: v
        for k, v in task.headers.items()
        if k not in _SPENT and not k.startswith(("rabbitq-park", "x-"))
    }
    headers = kept | wire.new_task_headers(None, now) | {HEADER_HISTORY: history}
    deadline = task.headers.get(wire.HEADER_DEADLINE)
    if isinstance(deadline, int):
        headers[wire.HEADER_DEADLINE] = deadline  # a deadline still holds; past, it parks again
    return wire.Outgoing(
        exchange=workload.task_exchange,
        routing_key=workload.routing_key,
        body=task.body,
        message_id=task.message_id,
        headers=headers,
        task=task.task or None,
        kind="replay",
    )


def _copy(task: Parked) -> tuple[str, float | None, str, int]:
    """What tells one parked copy from another of the same task (parked again later)."""
    return (task.message_id, task.parked_at, task.reason, task.attempts)


async def take(
    url: str,
    workload: Workload,
    chosen: Filter,
    limit: int | None,
    each: Callable[[Parked], Awaitable[None]] | None,
) -> list[Parked]:
    """Take the selected parked tasks out of the parking lot, in order; the rest stay put.

    Each selected copy is acked only after `each(task)` returned (the replay's confirmed
    copy), so a kill at any point leaves every task somewhere: at worst the one in hand is
    both sent and still parked. `each=None` removes (purge). A quorum lot is taken from in
    reads of at most QUORUM_ACKS_PER_READ acks; each read after the first takes only copies
    the first one saw, so a task parked again meanwhile (a replayed one failing) stays.
    """
    per_read = QUORUM_ACKS_PER_READ if workload.spec.parking_queue_type == "quorum" else None
    moved: list[Parked] = []
    left: Counter[tuple[str, float | None, str, int]] | None = None
    while True:
        connection, deliveries = await _read(url, workload)
        acked, more = 0, False
        try:
            now = time.time()
            tasks = [(delivery, parked(delivery)) for delivery in deliveries]
            if left is None:
                left = Counter(_copy(task) for _, task in tasks)
            for delivery, task in tasks:
                if limit is not None and len(moved) >= limit:
                    break
                if not left[_copy(task)] or not chosen.matches(task, now):
                    continue
                if per_read is not None and acked >= per_read:
                    more = True
                    break
                if each is not None:
                    await each(task)
                if not connection.ack(delivery.tag):
                    break  # the connection is gone: the broker returned the rest, this one too
                left[_copy(task)] -= 1
                acked += 1
                moved.append(task)
        finally:
            await connection.close()  # everything not acked goes back, in its order
        if not more:
            return moved


async def replay(
    url: str,
    workload: Workload,
    chosen: Filter,
    limit: int | None = None,
    per_second: float | None = None,
) -> list[Parked]:
    """Send the chosen parked tasks back to the work queue (`take` with a confirmed publish).

    The CLI's and the console's replay: a fresh attempt budget, the earlier parks kept in the
    bounded history header, at most `per_second` a second.
    """
    publisher = Publisher(url, name=f"parking-replay {workload.name}")
    last = 0.0

    async def send(task: Parked) -> None:
        nonlocal last
        if per_second is not None:
            await asyncio.sleep(max(0.0, last + 1 / per_second - time.monotonic()))
            last = time.monotonic()
        await publisher.send(replay_copy(task, workload, time.time()))

    try:
        return await take(url, workload, chosen, limit, send)
    finally:
        await publisher.close()


async def purge(url: str, workload: Workload, chosen: Filter) -> list[Parked]:
    """Delete the chosen parked tasks for good; the rest stay, in their order."""
    return await take(url, workload, chosen, None, None)
