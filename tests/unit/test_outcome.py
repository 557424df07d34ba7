"""The outcome table: run a delivery or not, and once it ran, ack, retry in which tier, or park."""

from __future__ import annotations

import pytest

from rabbitq._errors import HandlerTimeout, Park, ParkReason, Poison, Retry
from rabbitq._outcome import (
    Outcome,
    ParkNow,
    Ran,
    Recount,
    RetryIn,
    Run,
    Succeeded,
    TaskRules,
    crash_guard,
    decide,
    retry_or_park,
    tier_for_delay,
)
from rabbitq._topology import RetrySpec, WorkloadSpec
from rabbitq._wire import Envelope

Decision = RetryIn | ParkNow

NOW = 1_000_000.0
TIERS = [1.0, 10.0, 60.0]
POLICY = RetrySpec(tiers=TIERS, max_attempts=6)


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [
        (1, RetryIn(0)),
        (2, RetryIn(1)),
        (3, RetryIn(2)),
        (4, RetryIn(2)),  # more attempts than tiers: the last tier repeats
        (5, RetryIn(2)),
        (6, ParkNow(ParkReason.RETRIES_EXHAUSTED)),  # the last attempt
        (7, ParkNow(ParkReason.RETRIES_EXHAUSTED)),  # past the last (policy shrank meanwhile)
    ],
)
def test_attempt_n_goes_to_tier_n_minus_1_until_attempts_run_out(
    attempt: int, expected: Decision
) -> None:
    """Attempt n goes to tier n-1, the last tier repeats, and max_attempts parks as exhausted."""
    assert retry_or_park(attempt, RuntimeError("boom"), POLICY, NOW, None) == expected


@pytest.mark.parametrize("attempt", [1, 3, 6, 7])
def test_park_signal_parks_at_once_on_any_attempt(attempt: int) -> None:
    """A handler raising Park is parked as parked_by_handler, even on attempt 1."""
    decision = retry_or_park(attempt, Park("bad address"), POLICY, NOW, None)
    assert decision == ParkNow(ParkReason.PARKED_BY_HANDLER)


def test_park_signal_wins_over_an_expired_deadline() -> None:
    """Park is reported as parked_by_handler even when the deadline would also park the task."""
    decision = retry_or_park(1, Park("bad address"), POLICY, NOW, deadline=NOW - 1)
    assert decision == ParkNow(ParkReason.PARKED_BY_HANDLER)


@pytest.mark.parametrize(
    ("attempt", "delay_seconds", "expected"),
    [
        (1, 0.0, RetryIn(0)),
        (1, 0.5, RetryIn(0)),
        (1, 1.0, RetryIn(0)),  # exactly a tier's delay: that tier
        (1, 1.01, RetryIn(1)),
        (1, 10.0, RetryIn(1)),
        (1, 30.0, RetryIn(2)),
        (1, 3600.0, RetryIn(2)),  # longer than every tier: the longest
        (3, 0.5, RetryIn(0)),  # the delay, not the attempt, picks the tier
        (5, 2.0, RetryIn(1)),
        (6, 1.0, ParkNow(ParkReason.RETRIES_EXHAUSTED)),  # Retry still counts as an attempt
    ],
)
def test_retry_signal_picks_the_shortest_tier_at_least_as_long_as_the_delay(
    attempt: int, delay_seconds: float, expected: Decision
) -> None:
    """Retry(delay_seconds) goes to the shortest tier >= delay, else the longest tier."""
    assert retry_or_park(attempt, Retry(delay_seconds=delay_seconds), POLICY, NOW, None) == expected


@pytest.mark.parametrize(
    ("attempt", "error", "deadline", "expected"),
    [
        (1, RuntimeError("x"), None, RetryIn(0)),
        (1, RuntimeError("x"), NOW + 3600, RetryIn(0)),
        (1, RuntimeError("x"), NOW + 1.0, RetryIn(0)),  # back exactly at the deadline
        (1, RuntimeError("x"), NOW + 0.999, ParkNow(ParkReason.EXPIRED)),
        (1, RuntimeError("x"), NOW - 5, ParkNow(ParkReason.EXPIRED)),  # already past
        (2, RuntimeError("x"), NOW + 9.5, ParkNow(ParkReason.EXPIRED)),  # tier 1 is 10s
        (2, RuntimeError("x"), NOW + 10.0, RetryIn(1)),
        (4, RuntimeError("x"), NOW + 59, ParkNow(ParkReason.EXPIRED)),  # repeated 60s tier
        (1, Retry(delay_seconds=30), NOW + 59, ParkNow(ParkReason.EXPIRED)),  # Retry -> 60s
        (1, Retry(delay_seconds=30), NOW + 61, RetryIn(2)),
        (6, RuntimeError("x"), NOW - 5, ParkNow(ParkReason.RETRIES_EXHAUSTED)),  # last attempt
    ],
)
def test_deadline_that_passes_before_the_tier_returns_parks_as_expired(
    attempt: int, error: BaseException, deadline: float | None, expected: Decision
) -> None:
    """A task whose deadline passes before its tier's delay is over is parked as expired."""
    assert retry_or_park(attempt, error, POLICY, NOW, deadline) == expected


@pytest.mark.parametrize(
    ("policy", "error"),
    [
        (RetrySpec(tiers=[1.0], max_attempts=1), RuntimeError("x")),
        (RetrySpec(tiers=[1.0], max_attempts=1), Retry(delay_seconds=1)),
        (RetrySpec(tiers=[], max_attempts=1), RuntimeError("x")),
    ],
)
def test_max_attempts_one_parks_on_the_first_failure(
    policy: RetrySpec, error: BaseException
) -> None:
    """With max_attempts=1 the first failure parks the task as retries_exhausted."""
    assert retry_or_park(1, error, policy, NOW, None) == ParkNow(ParkReason.RETRIES_EXHAUSTED)


# a task's own rules on top of POLICY (6 attempts) ------------------------------------------


def _not_retryable(error: str, rule: str) -> ParkNow:
    return ParkNow(ParkReason.NOT_RETRYABLE, f"{error} is not retried by task 'x' ({rule})")


EXHAUSTED = ParkNow(ParkReason.RETRIES_EXHAUSTED)
ONLY_TIMEOUTS = TaskRules(retry_on=(TimeoutError,))
NOT_VALUES = TaskRules(park_on=(ValueError,))


@pytest.mark.parametrize(
    ("rules", "attempt", "error", "deadline", "expected"),
    [
        pytest.param(TaskRules(), 1, KeyError(), None, RetryIn(0), id="no-rules-retries"),
        pytest.param(TaskRules(), 6, KeyError(), None, EXHAUSTED, id="no-rules-workload-cap"),
        pytest.param(
            TaskRules(max_attempts=2), 1, KeyError(), None, RetryIn(0), id="lower-cap-retries"
        ),
        pytest.param(
            TaskRules(max_attempts=2), 2, KeyError(), None, EXHAUSTED, id="lower-cap-parks"
        ),
        pytest.param(
            TaskRules(max_attempts=1), 1, KeyError(), None, EXHAUSTED, id="cap-one-never-retries"
        ),
        pytest.param(
            TaskRules(max_attempts=9), 5, KeyError(), None, RetryIn(2), id="higher-cap-retries"
        ),
        pytest.param(
            TaskRules(max_attempts=9),
            6,
            KeyError(),
            None,
            EXHAUSTED,
            id="higher-cap-is-capped-by-workload",
        ),
        pytest.param(ONLY_TIMEOUTS, 1, TimeoutError(), None, RetryIn(0), id="retry-on-match"),
        pytest.param(
            ONLY_TIMEOUTS,
            1,
            KeyError(),
            None,
            _not_retryable("KeyError", "not in retry_on"),
            id="retry-on-no-match-parks",
        ),
        pytest.param(
            ONLY_TIMEOUTS, 2, HandlerTimeout(), None, RetryIn(1), id="retry-on-subclass-matches"
        ),
        pytest.param(
            ONLY_TIMEOUTS, 6, TimeoutError(), None, EXHAUSTED, id="retry-on-match-still-capped"
        ),
        pytest.param(
            TaskRules(retry_on=()),
            1,
            KeyError(),
            None,
            _not_retryable("KeyError", "not in retry_on"),
            id="empty-retry-on-retries-nothing",
        ),
        pytest.param(
            NOT_VALUES,
            1,
            ValueError(),
            None,
            _not_retryable("ValueError", "park_on"),
            id="park-on-match-parks",
        ),
        pytest.param(NOT_VALUES, 1, KeyError(), None, RetryIn(0), id="park-on-no-match-retries"),
        pytest.param(
            TaskRules(park_on=(LookupError,)),
            1,
            KeyError(),
            None,
            _not_retryable("KeyError", "park_on"),
            id="park-on-subclass-matches",
        ),
        pytest.param(
            TaskRules(park_on=(TimeoutError,)),
            1,
            HandlerTimeout(),
            None,
            _not_retryable("HandlerTimeout", "park_on"),
            id="handler-timeout-follows-the-rules",
        ),
        pytest.param(
            NOT_VALUES,
            6,
            ValueError(),
            None,
            _not_retryable("ValueError", "park_on"),
            id="park-on-on-the-last-attempt-says-not-retryable",
        ),
        pytest.param(
            NOT_VALUES,
            1,
            ValueError(),
            NOW - 5,
            _not_retryable("ValueError", "park_on"),
            id="park-on-wins-over-the-deadline",
        ),
        pytest.param(
            TaskRules(retry_on=(Exception,), park_on=(ValueError,)),
            1,
            ValueError(),
            None,
            _not_retryable("ValueError", "park_on"),
            id="park-on-wins-over-retry-on",
        ),
        pytest.param(
            TaskRules(retry_on=(KeyError,), park_on=(ValueError,)),
            1,
            ValueError(),
            None,
            _not_retryable("ValueError", "park_on"),
            id="in-park-on-and-not-in-retry-on-names-park-on",
        ),
        pytest.param(
            TaskRules(retry_on=(Exception,), park_on=(ValueError,)),
            1,
            KeyError(),
            None,
            RetryIn(0),
            id="both-retry-on-only-matches",
        ),
        pytest.param(
            TaskRules(retry_on=(KeyError,), park_on=(Exception,)),
            1,
            Retry(delay_seconds=5),
            None,
            RetryIn(1),
            id="retry-signal-overrides-both",
        ),
        pytest.param(
            TaskRules(max_attempts=2, retry_on=(KeyError,)),
            2,
            Retry(),
            None,
            EXHAUSTED,
            id="retry-signal-still-capped-by-task",
        ),
        pytest.param(
            TaskRules(retry_on=(Park,)),
            1,
            Park("no"),
            None,
            ParkNow(ParkReason.PARKED_BY_HANDLER),
            id="park-signal-parks-even-in-retry-on",
        ),
        pytest.param(
            TaskRules(park_on=(Exception,)),
            1,
            Park("no"),
            None,
            ParkNow(ParkReason.PARKED_BY_HANDLER),
            id="park-signal-is-parked-by-handler-not-by-rule",
        ),
        pytest.param(
            ONLY_TIMEOUTS,
            1,
            TimeoutError(),
            NOW + 0.5,
            ParkNow(ParkReason.EXPIRED),
            id="deadline-still-applies-to-retried-errors",
        ),
        pytest.param(
            TaskRules(max_attempts=3, park_on=(ValueError,)),
            1,
            Retry(delay_seconds=30),
            NOW + 59,
            ParkNow(ParkReason.EXPIRED),
            id="deadline-still-applies-to-retry-signal",
        ),
    ],
)
def test_task_rules_narrow_the_workload_policy(
    rules: TaskRules,
    attempt: int,
    error: BaseException,
    deadline: float | None,
    expected: Decision,
) -> None:
    """A task's rules lower the attempts cap and park errors they do not retry as not_retryable."""
    assert retry_or_park(attempt, error, POLICY, NOW, deadline, rules, "x") == expected


@pytest.mark.parametrize(
    ("tiers", "delay_seconds", "expected"),
    [
        ([1.0, 10.0, 60.0], 0.0, 0),
        ([1.0, 10.0, 60.0], 1.0, 0),
        ([1.0, 10.0, 60.0], 1.5, 1),
        ([1.0, 10.0, 60.0], 10.0, 1),
        ([1.0, 10.0, 60.0], 59.9, 2),
        ([1.0, 10.0, 60.0], 60.0, 2),
        ([1.0, 10.0, 60.0], 61.0, 2),
        ([0.05], 0.0, 0),
        ([0.05], 100.0, 0),
        ([0.05, 0.2], 0.1, 1),
    ],
)
def test_tier_for_delay_is_the_shortest_tier_long_enough_else_the_longest(
    tiers: list[float], delay_seconds: float, expected: int
) -> None:
    """tier_for_delay returns the index of the shortest tier >= delay, else the last index."""
    assert tier_for_delay(tiers, delay_seconds) == expected


@pytest.mark.parametrize(
    ("redelivered", "redeliveries", "delivery_count", "limit", "expected"),
    [
        pytest.param(False, 0, None, 5, Run(), id="first-delivery-runs"),
        pytest.param(True, 0, None, 5, Recount(1), id="classic-first-return-is-recounted"),
        pytest.param(True, 3, None, 5, Recount(4), id="classic-below-limit-recounted"),
        pytest.param(True, 4, None, 5, ParkNow(ParkReason.CRASH_LOOP), id="classic-at-limit-parks"),
        pytest.param(
            True, 9, None, 5, ParkNow(ParkReason.CRASH_LOOP), id="classic-past-limit-parks"
        ),
        pytest.param(False, 4, None, 5, Run(), id="recounted-copy-runs"),
        pytest.param(
            True, 0, None, 1, ParkNow(ParkReason.CRASH_LOOP), id="limit-one-parks-first-return"
        ),
        pytest.param(False, 0, 0, 5, Run(), id="quorum-first-delivery-runs"),
        pytest.param(True, 0, 4, 5, Run(), id="quorum-below-limit-runs-without-recount"),
        pytest.param(True, 0, 5, 5, ParkNow(ParkReason.CRASH_LOOP), id="quorum-at-limit-parks"),
    ],
)
def test_crash_guard_counts_unsettled_returns(
    redelivered: bool, redeliveries: int, delivery_count: int | None, limit: int, expected: object
) -> None:
    """A task cut off `limit` times is parked as crash_loop; classic queues recount first."""
    guard = crash_guard(redelivered, redeliveries, delivery_count, limit)
    if isinstance(expected, ParkNow):
        assert isinstance(guard, ParkNow) and guard.reason is expected.reason
    else:
        assert guard == (None if isinstance(expected, Run) else expected)


# decide: the whole table ---------------------------------------------------------------------

SPEC = WorkloadSpec.model_validate(
    {"retry": {"tiers": ["1s", "10s"], "max_attempts": 3}, "max_redeliveries": 3}
)


def _env(attempt: int = 1, **changes: object) -> Envelope:
    fields: dict[str, object] = {
        "task": "emails.send",
        "message_id": "m-1",
        "attempt": attempt,
        "deadline": None,
        "first_failure_ms": None,
        "last_failure_ms": None,
    }
    fields.update(changes)
    return Envelope(**fields)  # type: ignore[arg-type]  # the table sets each field's type


POISON = Poison(ParkReason.UNDECODABLE, "body is not JSON")


@pytest.mark.parametrize(
    ("carried", "kwargs", "expected"),
    [
        # before the handler runs
        pytest.param(_env(), {}, Run(), id="a-fresh-task-runs"),
        pytest.param(
            POISON,
            {},
            ParkNow(ParkReason.UNDECODABLE, "body is not JSON"),
            id="poison-parks-with-its-reason-and-detail",
        ),
        pytest.param(
            Poison(ParkReason.TOO_LARGE, "big"),
            {"redelivered": True},
            ParkNow(ParkReason.TOO_LARGE, "big"),
            id="poison-parks-even-redelivered",
        ),
        pytest.param(
            _env(),
            {"registered": False},
            ParkNow(ParkReason.UNKNOWN_TASK, "no task is registered as 'emails.send'"),
            id="unregistered-task-parks",
        ),
        pytest.param(
            _env(deadline=NOW - 1),
            {},
            ParkNow(ParkReason.EXPIRED, "its deadline passed before it could run"),
            id="past-deadline-parks-as-expired-unrun",
        ),
        pytest.param(_env(deadline=NOW + 1), {}, Run(), id="deadline-ahead-runs"),
        pytest.param(
            _env(), {"redelivered": True}, Recount(1), id="classic-redelivery-is-recounted-first"
        ),
        pytest.param(
            _env(redeliveries=1),
            {"redelivered": True},
            Recount(2),
            id="classic-second-redelivery-recounted",
        ),
        pytest.param(
            _env(redeliveries=2),
            {"redelivered": True},
            ParkNow(
                ParkReason.CRASH_LOOP,
                "cut off 3 times while running (its consumer died or lost "
                "its connection); not run again",
            ),
            id="classic-crash-loop-parks",
        ),
        pytest.param(_env(redeliveries=2), {}, Run(), id="recounted-copy-runs"),
        pytest.param(
            _env(delivery_count=2), {"redelivered": True}, Run(), id="quorum-below-limit-runs"
        ),
        pytest.param(
            _env(delivery_count=3),
            {"redelivered": True, "registered": False},
            ParkNow(
                ParkReason.CRASH_LOOP,
                "cut off 3 times while running (its "
                "consumer died or lost its connection); not run again",
            ),
            id="crash-loop-checked-before-the-task-name",
        ),
        # after it ran
        pytest.param(_env(), {"ran": Ran()}, Succeeded(), id="returned-succeeds"),
        pytest.param(
            _env(deadline=NOW - 1),
            {"ran": Ran()},
            Succeeded(),
            id="returned-after-deadline-still-succeeds",
        ),
        pytest.param(_env(1), {"ran": Ran(ValueError())}, RetryIn(0), id="attempt-1-tier-1"),
        pytest.param(_env(2), {"ran": Ran(ValueError())}, RetryIn(1), id="attempt-2-tier-2"),
        pytest.param(
            _env(3),
            {"ran": Ran(ValueError())},
            ParkNow(ParkReason.RETRIES_EXHAUSTED),
            id="last-attempt-parks",
        ),
        pytest.param(
            _env(1),
            {"ran": Ran(Retry(delay_seconds=5))},
            RetryIn(1),
            id="retry-signal-picks-tier-by-delay",
        ),
        pytest.param(
            _env(1),
            {"ran": Ran(Park("no"))},
            ParkNow(ParkReason.PARKED_BY_HANDLER),
            id="park-signal-parks",
        ),
        pytest.param(
            _env(1, deadline=NOW + 0.5),
            {"ran": Ran(ValueError())},
            ParkNow(ParkReason.EXPIRED),
            id="deadline-before-tier-returns-parks",
        ),
        pytest.param(
            _env(1),
            {"ran": Ran(ValueError()), "redelivered": True},
            RetryIn(0),
            id="after-running-the-crash-guard-is-not-asked-again",
        ),
        pytest.param(
            _env(1),
            {"ran": Ran(ValueError()), "rules": TaskRules(park_on=(ValueError,))},
            ParkNow(
                ParkReason.NOT_RETRYABLE,
                "ValueError is not retried by task 'emails.send' (park_on)",
            ),
            id="task-rules-park-what-they-do-not-retry",
        ),
        pytest.param(
            _env(2),
            {"ran": Ran(ValueError()), "rules": TaskRules(max_attempts=2)},
            ParkNow(ParkReason.RETRIES_EXHAUSTED),
            id="task-max-attempts-lower-than-the-workload",
        ),
        pytest.param(
            _env(1),
            {"rules": TaskRules(max_attempts=1, park_on=(ValueError,))},
            Run(),
            id="rules-do-not-matter-before-it-runs",
        ),
    ],
)
def test_decide_gives_the_outcome_of_every_kind_of_delivery(
    carried: Envelope | Poison, kwargs: dict[str, object], expected: Outcome
) -> None:
    """One pure function answers for a delivery before and after its handler ran."""
    assert decide(carried, SPEC, NOW, **kwargs) == expected  # type: ignore[arg-type]
