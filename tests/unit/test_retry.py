"""The retry decision table: which tier a failed task goes to, or why it is parked."""

from __future__ import annotations

import pytest

from rabbitq._errors import Park, Retry
from rabbitq._outcome import (
    Decision,
    ParkNow,
    Recount,
    RetryIn,
    Run,
    crash_guard,
    decide,
    tier_for_delay,
)
from rabbitq._topology import RetrySpec
from rabbitq._wire import ParkReason

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
    assert decide(attempt, RuntimeError("boom"), POLICY, NOW, None) == expected


@pytest.mark.parametrize("attempt", [1, 3, 6, 7])
def test_park_signal_parks_at_once_on_any_attempt(attempt: int) -> None:
    """A handler raising Park is parked as parked_by_handler, even on attempt 1."""
    decision = decide(attempt, Park("bad address"), POLICY, NOW, None)
    assert decision == ParkNow(ParkReason.PARKED_BY_HANDLER)


def test_park_signal_wins_over_an_expired_deadline() -> None:
    """Park is reported as parked_by_handler even when the deadline would also park the task."""
    decision = decide(1, Park("bad address"), POLICY, NOW, deadline=NOW - 1)
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
    assert decide(attempt, Retry(delay_seconds=delay_seconds), POLICY, NOW, None) == expected


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
    assert decide(attempt, error, POLICY, NOW, deadline) == expected


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
    assert decide(1, error, policy, NOW, None) == ParkNow(ParkReason.RETRIES_EXHAUSTED)


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
    assert crash_guard(redelivered, redeliveries, delivery_count, limit) == expected
