"""What happens to a task whose handler raised: which retry tier, or the parking lot.

Pure: `decide` takes the attempt, the error, the policy and the clock reading it is handed, and
returns a decision; `consume` carries it out (forward with confirm, then ack).
"""

from __future__ import annotations

from dataclasses import dataclass

from rabbitq._errors import Park, Retry
from rabbitq._topology import RetrySpec
from rabbitq._wire import ParkReason


@dataclass(frozen=True, slots=True)
class RetryIn:
    """Forward the task to tier `tier_index`; it comes back after that tier's delay."""

    tier_index: int


@dataclass(frozen=True, slots=True)
class ParkNow:
    """Retrying is over: park the task with `reason`."""

    reason: ParkReason


Decision = RetryIn | ParkNow


@dataclass(frozen=True, slots=True)
class Run:
    """Run the handler."""


@dataclass(frozen=True, slots=True)
class Recount:
    """Requeue a copy that carries `redeliveries`, ack the delivery, and do not run it now."""

    redeliveries: int


Guard = Run | Recount | ParkNow


def crash_guard(
    redelivered: bool, redeliveries: int, delivery_count: int | None, limit: int
) -> Guard:
    """Stop a task that keeps killing its consumer before it takes every consumer down.

    A delivery that comes back unsettled (`redelivered`) was running when its consumer died,
    was cut off, or stopped past its grace. Quorum queues count those deliveries themselves
    (`x-delivery-count`); a classic queue does not, so rabbitq counts them in its own header:
    it republishes the redelivered task with the count raised, confirmed, and acks the
    delivery before running anything. Past `limit` such returns, the task is parked as
    `crash_loop` without running again.
    """
    if delivery_count is not None:
        return ParkNow(ParkReason.CRASH_LOOP) if delivery_count >= limit else Run()
    if not redelivered:
        return Run()
    if redeliveries + 1 >= limit:
        return ParkNow(ParkReason.CRASH_LOOP)
    return Recount(redeliveries + 1)


def tier_for_delay(tiers: list[float], delay_seconds: float) -> int:
    """The shortest tier that waits at least `delay_seconds`, else the longest tier."""
    for index, delay in enumerate(tiers):
        if delay >= delay_seconds:
            return index
    return len(tiers) - 1


def decide(
    attempt: int,
    error: BaseException,
    policy: RetrySpec,
    now: float,
    deadline: float | None,
) -> Decision:
    """Decide the fate of a task whose attempt number `attempt` (1-based) raised `error`.

    Attempt n goes to tier n (the last tier repeats when there are more attempts than tiers);
    `Retry(delay_seconds=...)` picks the tier by delay instead. A task is parked when the
    handler raised `Park`, when this was its last attempt, or when it would come back from the
    tier after its deadline.
    """
    if isinstance(error, Park):
        return ParkNow(ParkReason.PARKED_BY_HANDLER)
    if attempt >= policy.max_attempts or not policy.tiers:
        return ParkNow(ParkReason.RETRIES_EXHAUSTED)
    if isinstance(error, Retry):
        index = tier_for_delay(policy.tiers, error.delay_seconds)
    else:
        index = min(attempt - 1, len(policy.tiers) - 1)
    if deadline is not None and now + policy.tiers[index] > deadline:
        return ParkNow(ParkReason.EXPIRED)
    return RetryIn(index)
