"""The envelope: decoding a delivery's properties and headers, and the headers we write."""

from __future__ import annotations

from typing import Any

import pytest

from rabbitq._errors import ParkReason, Poison
from rabbitq._wire import (
    HEADER_ATTEMPT,
    HEADER_DEADLINE,
    HEADER_FIRST_FAILURE,
    HEADER_LAST_ERROR,
    HEADER_LAST_FAILURE,
    HEADER_PARK_ATTEMPTS,
    HEADER_PARK_ERROR,
    HEADER_PARK_ERROR_TYPE,
    HEADER_PARK_HOST,
    HEADER_PARK_REASON,
    HEADER_PARK_TRACEBACK,
    HEADER_PARK_WORKLOAD,
    HEADER_PARKED_AT,
    HEADER_PUBLISHED_AT,
    HEADER_RETRY_AT,
    MAX_ATTEMPT,
    MAX_ERROR_CHARS,
    MAX_TRACEBACK_CHARS,
    Envelope,
    decode,
    error_text,
    keep_own_headers,
    new_task_headers,
    park_headers,
    retry_headers,
    sanitize_header_value,
    strip_broker_headers,
)

LIMIT = 1024
VALID: dict[str, Any] = {
    "body_size": 100,
    "task": "emails.send",
    "message_id": "m-1",
    "headers": {HEADER_ATTEMPT: 1},
    "max_message_bytes": LIMIT,
}
FAILED_AT = 1_700_000_000.25
FAILED_AT_MS = 1_700_000_000_250

X_DEATH = [{"count": 1, "queue": "shop.emails.retry.1s", "reason": "expired"}]


def _envelope(**changes: Any) -> Envelope:
    fields: dict[str, Any] = {
        "task": "emails.send",
        "message_id": "m-1",
        "attempt": 2,
        "deadline": None,
        "first_failure_ms": None,
        "last_failure_ms": None,
    }
    return Envelope(**(fields | changes))


# decode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, _envelope(attempt=1)),
        ({"body_size": LIMIT}, _envelope(attempt=1)),  # exactly at the limit is fine
        ({"body_size": 0}, _envelope(attempt=1)),
        ({"headers": {HEADER_ATTEMPT: 7}}, _envelope(attempt=7)),
        ({"headers": {HEADER_ATTEMPT: MAX_ATTEMPT}}, _envelope(attempt=MAX_ATTEMPT)),
        (
            {"headers": {HEADER_ATTEMPT: 1, HEADER_DEADLINE: 1_700_000_000_500}},
            _envelope(attempt=1, deadline=1_700_000_000.5),
        ),
        (
            {"headers": {HEADER_ATTEMPT: 3, HEADER_FIRST_FAILURE: 10, HEADER_LAST_FAILURE: 20}},
            _envelope(attempt=3, first_failure_ms=10, last_failure_ms=20),
        ),
        (
            {"headers": {HEADER_ATTEMPT: 1, "x-death": X_DEATH, "custom": "kept"}},
            _envelope(attempt=1),
        ),
    ],
    ids=[
        "minimal",
        "size-at-limit",
        "empty-body",
        "retried",
        "max-attempt",
        "deadline-ms-to-seconds",
        "failure-history",
        "other-headers-ignored",
    ],
)
def test_decode_valid_delivery_gives_an_envelope(
    changes: dict[str, Any], expected: Envelope
) -> None:
    """A delivery with a type, a message id and a valid attempt header decodes to an Envelope."""
    assert decode(**(VALID | changes)) == expected


@pytest.mark.parametrize(
    ("changes", "reason", "detail"),
    [
        ({"body_size": LIMIT + 1}, ParkReason.TOO_LARGE, "1025 bytes"),
        ({"task": None}, ParkReason.BAD_ENVELOPE, "'type'"),
        ({"task": ""}, ParkReason.BAD_ENVELOPE, "'type'"),
        ({"message_id": None}, ParkReason.BAD_ENVELOPE, "'message_id'"),
        ({"message_id": ""}, ParkReason.BAD_ENVELOPE, "'message_id'"),
        ({"headers": None}, ParkReason.BAD_ENVELOPE, f"{HEADER_ATTEMPT!r} is missing"),
        ({"headers": {}}, ParkReason.BAD_ENVELOPE, f"{HEADER_ATTEMPT!r} is missing"),
        ({"headers": {"attempt": 1}}, ParkReason.BAD_ENVELOPE, f"{HEADER_ATTEMPT!r} is missing"),
        ({"headers": {HEADER_ATTEMPT: "1"}}, ParkReason.BAD_ENVELOPE, "got '1'"),
        ({"headers": {HEADER_ATTEMPT: True}}, ParkReason.BAD_ENVELOPE, "got True"),
        ({"headers": {HEADER_ATTEMPT: 1.0}}, ParkReason.BAD_ENVELOPE, "got 1.0"),
        ({"headers": {HEADER_ATTEMPT: None}}, ParkReason.BAD_ENVELOPE, "got None"),
        ({"headers": {HEADER_ATTEMPT: 0}}, ParkReason.BAD_ENVELOPE, "got 0"),
        ({"headers": {HEADER_ATTEMPT: -3}}, ParkReason.BAD_ENVELOPE, "got -3"),
        (
            {"headers": {HEADER_ATTEMPT: MAX_ATTEMPT + 1}},
            ParkReason.BAD_ENVELOPE,
            f"got {MAX_ATTEMPT + 1}",
        ),
        ({"headers": {HEADER_ATTEMPT: 2**64}}, ParkReason.BAD_ENVELOPE, "got 1844674407"),
        (
            {"headers": {HEADER_ATTEMPT: 1, HEADER_DEADLINE: "tomorrow"}},
            ParkReason.BAD_ENVELOPE,
            HEADER_DEADLINE,
        ),
        (
            {"headers": {HEADER_ATTEMPT: 1, HEADER_DEADLINE: -1}},
            ParkReason.BAD_ENVELOPE,
            HEADER_DEADLINE,
        ),
        (
            {"headers": {HEADER_ATTEMPT: 1, HEADER_DEADLINE: 1.5e12}},
            ParkReason.BAD_ENVELOPE,
            HEADER_DEADLINE,
        ),
        (
            {"headers": {HEADER_ATTEMPT: 2, HEADER_FIRST_FAILURE: "x"}},
            ParkReason.BAD_ENVELOPE,
            HEADER_FIRST_FAILURE,
        ),
        (
            {"headers": {HEADER_ATTEMPT: 2, HEADER_LAST_FAILURE: False}},
            ParkReason.BAD_ENVELOPE,
            HEADER_LAST_FAILURE,
        ),
    ],
    ids=[
        "too-large",
        "type-missing",
        "type-empty",
        "message-id-missing",
        "message-id-empty",
        "no-headers",
        "empty-headers",
        "attempt-header-missing",
        "attempt-str",
        "attempt-bool",
        "attempt-float",
        "attempt-none",
        "attempt-zero",
        "attempt-negative",
        "attempt-over-max",
        "attempt-huge",
        "deadline-str",
        "deadline-negative",
        "deadline-float",
        "first-failure-str",
        "last-failure-bool",
    ],
)
def test_decode_bad_delivery_raises_poison_with_the_park_reason(
    changes: dict[str, Any], reason: ParkReason, detail: str
) -> None:
    """A delivery that cannot be run raises Poison with the reason to park it and a detail."""
    with pytest.raises(Poison) as exc_info:
        decode(**(VALID | changes))
    assert exc_info.value.reason == reason
    assert detail in exc_info.value.detail


def test_decode_poison_detail_is_bounded() -> None:
    """A huge forged header value is shortened in the Poison detail."""
    with pytest.raises(Poison) as exc_info:
        decode(**(VALID | {"headers": {HEADER_ATTEMPT: "x" * 10_000}}))
    assert len(exc_info.value.detail) < 200
    assert exc_info.value.detail.endswith("...")


def test_decode_checks_size_before_anything_else() -> None:
    """An oversized delivery is too_large even when its properties are missing too."""
    with pytest.raises(Poison) as exc_info:
        decode(
            body_size=LIMIT + 1, task=None, message_id=None, headers=None, max_message_bytes=LIMIT
        )
    assert exc_info.value.reason == ParkReason.TOO_LARGE


# headers we write -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deadline", "expected"),
    [
        (None, {HEADER_ATTEMPT: 1}),
        (1_700_000_000.0, {HEADER_ATTEMPT: 1, HEADER_DEADLINE: 1_700_000_000_000}),
        (1_700_000_000.5, {HEADER_ATTEMPT: 1, HEADER_DEADLINE: 1_700_000_000_500}),
        (1_700_000_000.0019, {HEADER_ATTEMPT: 1, HEADER_DEADLINE: 1_700_000_000_001}),
    ],
)
def test_new_task_headers_start_at_attempt_one_with_deadline_in_ms(
    deadline: float | None, expected: dict[str, int]
) -> None:
    """A new task has rabbitq-attempt=1, its publish time and, if given, the deadline, in
    integer milliseconds."""
    headers = new_task_headers(deadline, 1_600_000_000.0015)
    assert headers == expected | {HEADER_PUBLISHED_AT: 1_600_000_000_001}
    assert all(type(v) is int for v in headers.values())


def test_new_task_headers_decode_back() -> None:
    """What new_task_headers writes, decode reads as attempt 1 with the same deadline, ready
    since its publish time."""
    headers = new_task_headers(1_700_000_000.5, 1_600_000_000.25)
    envelope = decode(**(VALID | {"headers": headers}))
    assert (envelope.attempt, envelope.deadline, envelope.ready_ms) == (
        1,
        1_700_000_000.5,
        1_600_000_000_250,
    )


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, {}),
        ({}, {}),
        ({"x-death": X_DEATH}, {}),
        (
            {
                "x-death": X_DEATH,
                "x-first-death-exchange": "shop.retry",
                "x-first-death-queue": "shop.emails.retry.1s",
                "x-first-death-reason": "expired",
                "x-last-death-exchange": "shop.retry",
                "x-last-death-queue": "shop.emails.retry.1s",
                "x-last-death-reason": "expired",
                HEADER_ATTEMPT: 2,
            },
            {HEADER_ATTEMPT: 2},
        ),
        (
            {
                "x-death": X_DEATH,
                HEADER_ATTEMPT: 3,
                HEADER_DEADLINE: 5,
                "x-custom": "kept",
                "x-delivery-count": 1,
                "trace-id": "abc",
            },
            {
                HEADER_ATTEMPT: 3,
                HEADER_DEADLINE: 5,
                "x-custom": "kept",
                "x-delivery-count": 1,
                "trace-id": "abc",
            },
        ),
    ],
    ids=["none", "empty", "x-death-only", "all-death-headers", "others-kept"],
)
def test_strip_broker_headers_removes_only_dead_letter_history(
    headers: dict[str, Any] | None, expected: dict[str, Any]
) -> None:
    """x-death, x-first-death-* and x-last-death-* go; every other header stays as it was."""
    assert strip_broker_headers(headers) == expected


def test_strip_broker_headers_does_not_change_its_input() -> None:
    """strip_broker_headers returns a new dict and leaves the delivery's headers alone."""
    headers = {"x-death": X_DEATH, HEADER_ATTEMPT: 1}
    strip_broker_headers(headers)
    assert headers == {"x-death": X_DEATH, HEADER_ATTEMPT: 1}


@pytest.mark.parametrize(
    ("envelope", "first_failure"),
    [
        (_envelope(attempt=1), FAILED_AT_MS),  # first failure: set now
        (_envelope(attempt=3, first_failure_ms=123, last_failure_ms=456), 123),  # kept
    ],
    ids=["first-failure-now", "first-failure-kept"],
)
def test_retry_headers_advance_the_attempt_and_record_failures(
    envelope: Envelope, first_failure: int
) -> None:
    """The retried copy has attempt+1, the first failure kept or set now, last failure now."""
    original = {
        HEADER_ATTEMPT: envelope.attempt,
        HEADER_DEADLINE: 1_800_000_000_000,
        "x-death": X_DEATH,
        "x-last-death-queue": "q",
        "trace-id": "abc",
    }
    headers = retry_headers(original, envelope, FAILED_AT, "ValueError: smtp said no", 0.25)
    assert headers == {
        HEADER_ATTEMPT: envelope.attempt + 1,
        HEADER_RETRY_AT: FAILED_AT_MS + 250,
        HEADER_DEADLINE: 1_800_000_000_000,
        HEADER_FIRST_FAILURE: first_failure,
        HEADER_LAST_FAILURE: FAILED_AT_MS,
        HEADER_LAST_ERROR: "ValueError: smtp said no",
        "trace-id": "abc",
    }


def test_retry_headers_decode_as_the_next_attempt() -> None:
    """A retried copy decodes as the next attempt with its failure history, ready once its
    tier's delay ends (not since its first publish)."""
    headers = retry_headers(
        {HEADER_ATTEMPT: 1, HEADER_PUBLISHED_AT: 5},
        _envelope(attempt=1),
        FAILED_AT,
        "KeyError: 'k'",
        2.0,
    )
    envelope = decode(**(VALID | {"headers": headers}))
    assert (
        envelope.attempt,
        envelope.first_failure_ms,
        envelope.last_failure_ms,
        envelope.ready_ms,
    ) == (2, FAILED_AT_MS, FAILED_AT_MS, FAILED_AT_MS + 2000)


def test_retry_headers_bound_the_last_error() -> None:
    """rabbitq-last-error is cut to MAX_ERROR_CHARS, however long the exception text."""
    error = error_text(RuntimeError("x" * 10_000))
    headers = retry_headers(None, _envelope(), FAILED_AT, error, 1.0)
    assert len(headers[HEADER_LAST_ERROR]) == MAX_ERROR_CHARS
    assert headers[HEADER_LAST_ERROR].startswith("RuntimeError: xxx")


@pytest.mark.parametrize(
    ("first_failure_ms", "expected_first"),
    [(None, FAILED_AT_MS), (123, 123)],
)
def test_park_headers_record_why_when_where_and_how_often(
    first_failure_ms: int | None, expected_first: int
) -> None:
    """A parked copy keeps its headers (minus x-death) and gains every rabbitq-park-* field."""
    headers = park_headers(
        {HEADER_ATTEMPT: 4, "x-death": X_DEATH, "trace-id": "abc"},
        reason=ParkReason.RETRIES_EXHAUSTED,
        error_type="ValueError",
        error_message="smtp said no",
        traceback="Traceback (most recent call last): ...",
        attempts=4,
        first_failure_ms=first_failure_ms,
        failed_at=FAILED_AT,
        host="worker-1",
        workload="emails",
    )
    assert headers == {
        HEADER_ATTEMPT: 4,
        "trace-id": "abc",
        HEADER_PARK_REASON: "retries_exhausted",
        HEADER_PARK_ERROR_TYPE: "ValueError",
        HEADER_PARK_ERROR: "smtp said no",
        HEADER_PARK_TRACEBACK: "Traceback (most recent call last): ...",
        HEADER_PARK_ATTEMPTS: 4,
        HEADER_FIRST_FAILURE: expected_first,
        HEADER_LAST_FAILURE: FAILED_AT_MS,
        HEADER_PARKED_AT: FAILED_AT_MS,
        HEADER_PARK_HOST: "worker-1",
        HEADER_PARK_WORKLOAD: "emails",
    }
    assert type(headers[HEADER_PARK_REASON]) is str


def test_park_headers_bound_error_and_keep_the_end_of_the_traceback() -> None:
    """The park error is cut to MAX_ERROR_CHARS and the traceback keeps its last characters."""
    traceback = "frame\n" * 2000 + "ValueError: the line that matters"
    headers = park_headers(
        None,
        reason=ParkReason.PARKED_BY_HANDLER,
        error_type="Park",
        error_message="e" * 10_000,
        traceback=traceback,
        attempts=1,
        first_failure_ms=None,
        failed_at=FAILED_AT,
        host="h",
        workload="w",
    )
    assert len(headers[HEADER_PARK_ERROR]) == MAX_ERROR_CHARS
    assert len(headers[HEADER_PARK_TRACEBACK]) == MAX_TRACEBACK_CHARS
    assert headers[HEADER_PARK_TRACEBACK].endswith("ValueError: the line that matters")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ValueError("bad"), "ValueError: bad"),
        (KeyError("k"), "KeyError: 'k'"),
        (RuntimeError(), "RuntimeError: "),
        (
            RuntimeError("x" * (MAX_ERROR_CHARS - 14)),
            "RuntimeError: " + "x" * (MAX_ERROR_CHARS - 14),
        ),
        (
            RuntimeError("x" * (MAX_ERROR_CHARS - 13)),
            "RuntimeError: " + "x" * (MAX_ERROR_CHARS - 17) + "...",
        ),
    ],
    ids=["plain", "repr-args", "empty", "at-limit", "over-limit"],
)
def test_error_text_is_type_and_message_bounded(error: BaseException, expected: str) -> None:
    """error_text is `Type: message`, cut to MAX_ERROR_CHARS with an ellipsis."""
    text = error_text(error)
    assert text == expected
    assert len(text) <= MAX_ERROR_CHARS


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(b"\xff\xfe", bytearray(b"\xff\xfe"), id="raw-bytes-become-a-byte-array"),
        pytest.param(1e300, "1e+300", id="double-beyond-float32-becomes-text"),
        pytest.param(float("inf"), "inf", id="infinity-becomes-text"),
        pytest.param(1.5, 1.5, id="ordinary-float-kept"),
        pytest.param("text", "text", id="text-kept"),
        pytest.param({"a": b"x", 2: [1e300]}, {"a": bytearray(b"x"), "2": ["1e+300"]}, id="nested"),
    ],
)
def test_sanitize_header_value_makes_values_encodable_again(
    value: object, expected: object
) -> None:
    """Values a client decoded but AMQP cannot encode again become an encodable equivalent."""
    assert sanitize_header_value(value) == expected


def test_keep_own_headers_keeps_only_rabbitq_headers_and_says_why() -> None:
    """When the original headers cannot travel, rabbitq's own stay, with the reason."""
    out = keep_own_headers({"rabbitq-attempt": 2, "big": "x" * 10}, "too big")
    assert out == {"rabbitq-attempt": 2, "rabbitq-dropped-headers": "too big"}


def test_routing_headers_are_stripped_from_copies() -> None:
    """A forged CC or BCC would route a parked copy into other queues: it is removed."""
    assert strip_broker_headers({"CC": ["q"], "BCC": ["r"], "keep": 1}) == {"keep": 1}
