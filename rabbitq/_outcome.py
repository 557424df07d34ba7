"""What happens to a delivery: run it, or what its outcome is once it ran or could not run.

Pure: `decide` takes what the delivery carries (its envelope, or the `Poison` that stopped it
being read), whether the broker redelivered it, whether its task is registered, the handler's
result once it ran, the workload's policy, the task's own rules and the clock reading it is
handed, and returns one outcome. `_settle` carries the outcome out (send the copy, confirm,
then ack).
"""

from __future__ import annotations

from dataclasses import dataclass

from rabbitq._errors import Park, ParkReason, Poison, Retry
from rabbitq._topology import RetrySpec, WorkloadSpec
from rabbitq._wire import Envelope


@dataclass(frozen=True, slots=True)
class Run:
    """Run the handler."""


@dataclass(frozen=True, slots=True)
class Succeeded:
    """The handler returned: ack."""


@dataclass(frozen=True, slots=True)
class RetryIn:
    """Send the task to tier `tier_index`; it comes back after that tier's delay."""

    tier_index: int


@dataclass(frozen=True, slots=True)
class ParkNow:
    """Park the task with `reason`; `detail` says why when no handler error does."""

    reason: ParkReason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Recount:
    """Requeue a copy that carries `redeliveries`, ack the delivery, and do not run it now."""

    redeliveries: int


@dataclass(frozen=True, slots=True)
class Ran:
    """The handler ran: it raised `error`, or returned (None)."""

    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class TaskRules:
    """A task's own retry rules, applied on top of its workload's retry policy (`App.task`).

    Attributes:
        max_attempts: at most this many attempts, if fewer than the workload allows.
        retry_on: if set, only exceptions that are instances of these are retried.
        park_on: exceptions that are instances of these are never retried (wins over
            `retry_on`).
    """

    max_attempts: int | None = None
    retry_on: tuple[type[BaseException], ...] | None = None
    park_on: tuple[type[BaseException], ...] = ()


NO_RULES = TaskRules()

Outcome = Run | Succeeded | RetryIn | ParkNow | Recount
# the outcomes and the result that carry nothing, made once: decide runs twice per task
RUN, SUCCEEDED, RAN = Run(), Succeeded(), Ran()


def decide(
    carried: Envelope | Poison,
    spec: WorkloadSpec,
    now: float,
    *,
    redelivered: bool = False,
    registered: bool = True,
    ran: Ran | None = None,
    rules: TaskRules = NO_RULES,
) -> Outcome:
    """The outcome of a delivery: before its handler ran (`ran` None), or after.

    Before: poison is parked; a task that keeps killing its consumer is recounted or parked as
    `crash_loop` (see `crash_guard`); an unregistered task is parked; one past its deadline is
    parked as `expired`; otherwise it runs. After: success is acked; a failure is retried or
    parked by `retry_or_park`, under the task's `rules`.
    """
    if isinstance(carried, Poison):
        return ParkNow(carried.reason, carried.detail)
    if ran is not None:
        if ran.error is None:
            return SUCCEEDED
        return retry_or_park(
            carried.attempt, ran.error, spec.retry, now, carried.deadline, rules, carried.task
        )
    guard = crash_guard(
        redelivered, carried.redeliveries, carried.delivery_count, spec.max_redeliveries
    )
    if guard is not None:
        return guard
    if not registered:
        return ParkNow(ParkReason.UNKNOWN_TASK, f"no task is registered as {carried.task!r}")
    if carried.deadline is not None and now > carried.deadline:
        return ParkNow(ParkReason.EXPIRED, "its deadline passed before it could run")
    return RUN


def crash_guard(
    redelivered: bool, redeliveries: int, delivery_count: int | None, limit: int
) -> Recount | ParkNow | None:
    """Stop a task that keeps killing its consumer before it takes every consumer down.

    A delivery that comes back unsettled (`redelivered`) was running when its consumer died,
    was cut off, or stopped past its grace. Quorum queues count those deliveries themselves
    (`x-delivery-count`); a classic queue does not, so rabbitq counts them in its own header:
    it republishes the redelivered task with the count raised, confirmed, and acks the
    delivery before running anything. Past `limit` such returns, the task is parked as
    `crash_loop` without running again. None: run it.
    """
    if delivery_count is not None:  # quorum: the broker counted
        returns = delivery_count
    elif not redelivered:
        return None
    else:
        returns = redeliveries + 1
    if returns >= limit:
        return ParkNow(
            ParkReason.CRASH_LOOP,
            f"cut off {limit} times while running (its consumer died or lost its connection); "
            "not run again",
        )
    return None if delivery_count is not None else Recount(returns)


def tier_for_delay(tiers: list[float], delay_seconds: float) -> int:
    """The shortest tier that waits at least `delay_seconds`, else the longest tier."""
    return next((i for i, delay in enumerate(tiers) if delay >= delay_seconds), len(tiers) - 1)


def retry_or_park(
    attempt: int,
    error: BaseException,
    policy: RetrySpec,
    now: float,
    deadline: float | None,
    rules: TaskRules = NO_RULES,
    task: str = "",
) -> RetryIn | ParkNow:
    """The fate of a task `task` whose attempt number `attempt` (1-based) raised `error`.

    Attempt n goes to tier n (the last tier repeats when there are more attempts than tiers);
    `Retry(delay_seconds=...)` picks the tier by delay instead. A task is parked when the
    handler raised `Park`; when its `rules` do not retry the error (`not_retryable`, even on
    the last attempt); when this was its last attempt (the fewer of the policy's and the
    rules' `max_attempts`); or when it would come back from the tier after its deadline.
    `Retry` is always retried and `Park` always parked, whatever the rules say.
    """
    if isinstance(error, Park):
        return ParkNow(ParkReason.PARKED_BY_HANDLER)
    if not isinstance(error, Retry):
        if isinstance(error, rules.park_on):
            return _not_retryable(error, task, "park_on")
        if rules.retry_on is not None and not isinstance(error, rules.retry_on):
            return _not_retryable(error, task, "not in retry_on")
    max_attempts = policy.max_attempts
    if rules.max_attempts is not None:
        max_attempts = min(max_attempts, rules.max_attempts)
    if attempt >= max_attempts or not policy.tiers:
        return ParkNow(ParkReason.RETRIES_EXHAUSTED)
    if isinstance(error, Retry):
        index = tier_for_delay(policy.tiers, error.delay_seconds)
    else:
        index = min(attempt - 1, len(policy.tiers) - 1)
    if deadline is not None and now + policy.tiers[index] > deadline:
        return ParkNow(ParkReason.EXPIRED)
    return RetryIn(index)


def _not_retryable(error: BaseException, task: str, rule: str) -> ParkNow:
    # only the class name: the error's text may quote secrets, and is scrubbed where it is sent
    why = f"{type(error).__name__} is not retried by task {task!r} ({rule})"
    return ParkNow(ParkReason.NOT_RETRYABLE, why)
