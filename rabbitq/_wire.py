"""The wire format of a task message: AMQP properties and rabbitq headers, encoded and decoded.

A task message is published to the exchange `NS.tasks` with the workload as routing key:

* body: the payload as JSON (UTF-8), nothing wrapped around it;
* properties: `content_type` "application/json", `message_id` (the idempotency key, or a fresh
  id), `timestamp` (publish time, seconds), `delivery_mode` 2, `priority`, `type` (task name);
* headers: `rabbitq-attempt` (int, 1 on first publish; required), `rabbitq-published-at`
  (int, ms since the epoch, the first publish; optional), `rabbitq-deadline` (int, ms since
  the epoch; optional); on retried copies also `rabbitq-first-failure`, `rabbitq-last-failure`
  (ms), `rabbitq-last-error` and `rabbitq-retry-at` (ms: when its tier's delay ends); on parked
  copies the `rabbitq-park-*` headers, and their `timestamp` is the time they were parked.

This module is pure: it knows nothing of aio-pika. `decode` turns what arrived into an
`Envelope` or raises `Poison` with the reason the message must be parked at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

CONTENT_TYPE = "application/json"
PERSISTENT = 2

HEADER_ATTEMPT = "rabbitq-attempt"
HEADER_DEADLINE = "rabbitq-deadline"
HEADER_PUBLISHED_AT = "rabbitq-published-at"
HEADER_RETRY_AT = "rabbitq-retry-at"
HEADER_FIRST_FAILURE = "rabbitq-first-failure"
HEADER_LAST_FAILURE = "rabbitq-last-failure"
HEADER_LAST_ERROR = "rabbitq-last-error"
HEADER_REDELIVERIES = "rabbitq-redeliveries"
HEADER_DROPPED = "rabbitq-dropped-headers"
# Set by quorum queues on every redelivery (RabbitMQ 3.10+).
HEADER_DELIVERY_COUNT = "x-delivery-count"
HEADER_PARK_REASON = "rabbitq-park-reason"
HEADER_PARK_ERROR_TYPE = "rabbitq-park-error-type"
HEADER_PARK_ERROR = "rabbitq-park-error"
HEADER_PARK_TRACEBACK = "rabbitq-park-traceback"
HEADER_PARK_ATTEMPTS = "rabbitq-park-attempts"
HEADER_PARKED_AT = "rabbitq-parked-at"
HEADER_PARK_HOST = "rabbitq-park-host"
HEADER_PARK_WORKLOAD = "rabbitq-park-workload"

# Far beyond any retry policy; a bigger number is forged or corrupt.
MAX_ATTEMPT = 1_000_000
MAX_ERROR_CHARS = 500
MAX_TRACEBACK_CHARS = 4000


class ParkReason(StrEnum):
    """Why a task is in the parking lot. Bounded: usable as a metric label."""

    TOO_LARGE = "too_large"
    BAD_ENVELOPE = "bad_envelope"
    UNKNOWN_TASK = "unknown_task"
    UNDECODABLE = "undecodable"
    INVALID_PAYLOAD = "invalid_payload"
    EXPIRED = "expired"
    RETRIES_EXHAUSTED = "retries_exhausted"
    PARKED_BY_HANDLER = "parked_by_handler"
    UNROUTABLE_RETRY = "unroutable_retry"
    CRASH_LOOP = "crash_loop"


class Poison(Exception):
    """The message cannot be run at all; park it at once with `reason`."""

    def __init__(self, reason: ParkReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class Envelope:
    """What rabbitq needs to know about a delivered task before it runs the handler."""

    task: str
    message_id: str
    attempt: int
    deadline: float | None  # seconds since the epoch
    first_failure_ms: int | None
    last_failure_ms: int | None
    redeliveries: int = 0  # times rabbitq saw this attempt come back unsettled (classic)
    delivery_count: int | None = None  # the broker's count (quorum queues)
    # when this attempt could start (publish time, or the end of its retry delay): the base of
    # the queue latency; None for a message from a publisher that did not say
    ready_ms: int | None = None


def _int_header(headers: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    if name not in headers:
        return None
    value = headers[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Poison(
            ParkReason.BAD_ENVELOPE,
            f"header {name!r} must be an integer from {low} to {high}, got {_short(value)}",
        )
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode(
    *,
    body_size: int,
    task: str | None,
    message_id: str | None,
    headers: Mapping[str, Any] | None,
    max_message_bytes: int,
) -> Envelope:
    """Check a delivery's size, properties and rabbitq headers.

    The payload itself is validated later, against the model of the task's handler.

    Raises:
        Poison: with the reason to park the message, and a short detail.
    """
    if body_size > max_message_bytes:
        raise Poison(
            ParkReason.TOO_LARGE,
            f"body is {body_size} bytes, over the workload's limit of {max_message_bytes}",
        )
    if not task:
        raise Poison(ParkReason.BAD_ENVELOPE, "the 'type' property (task name) is missing")
    if not message_id:
        raise Poison(ParkReason.BAD_ENVELOPE, "the 'message_id' property is missing")
    headers = headers or {}
    attempt = _int_header(headers, HEADER_ATTEMPT, 1, MAX_ATTEMPT)
    if attempt is None:
        raise Poison(ParkReason.BAD_ENVELOPE, f"header {HEADER_ATTEMPT!r} is missing")
    deadline_ms = _int_header(headers, HEADER_DEADLINE, 0, 2**53)
    ready_ms = _int_header(headers, HEADER_RETRY_AT, 0, 2**53)
    if ready_ms is None:
        ready_ms = _int_header(headers, HEADER_PUBLISHED_AT, 0, 2**53)
    return Envelope(
        task=task,
        message_id=message_id,
        attempt=attempt,
        deadline=None if deadline_ms is None else deadline_ms / 1000,
        first_failure_ms=_int_header(headers, HEADER_FIRST_FAILURE, 0, 2**53),
        last_failure_ms=_int_header(headers, HEADER_LAST_FAILURE, 0, 2**53),
        redeliveries=_int_header(headers, HEADER_REDELIVERIES, 0, MAX_ATTEMPT) or 0,
        delivery_count=_int_header(headers, HEADER_DELIVERY_COUNT, 0, 2**53),
        ready_ms=ready_ms,
    )


def epoch_ms(seconds: float) -> int:
    return math.floor(seconds * 1000)


def new_task_headers(deadline: float | None, published_at: float) -> dict[str, Any]:
    """Headers of a task published for the first time."""
    headers: dict[str, Any] = {HEADER_ATTEMPT: 1, HEADER_PUBLISHED_AT: epoch_ms(published_at)}
    if deadline is not None:
        headers[HEADER_DEADLINE] = epoch_ms(deadline)
    return headers


def strip_broker_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Headers without the broker's dead-letter history.

    Republishing `x-death` makes RabbitMQ 3.x treat it as real history and silently drop the
    message as a dead-letter cycle after the next tier; 4.x ignores it. Our history lives in
    our own headers.
    """
    return {
        k: v
        for k, v in (headers or {}).items()
        if not (k == "x-death" or k.startswith("x-first-death") or k.startswith("x-last-death"))
        and k not in _ROUTING_HEADERS
    }


# Sender-selected distribution: a forged CC on a parked copy would copy it into other queues.
_ROUTING_HEADERS = frozenset({"CC", "BCC"})
_FLOAT32_MAX = 3.4028234663852886e38


def sanitize_header_value(value: Any) -> Any:
    """A value AMQP can encode again: what a client decoded is not always re-encodable.

    Raw bytes (a long string that was not UTF-8) become a byte array; floats outside the
    single-precision range the encoder uses, and NaN or infinity, become their text.
    """
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, float) and not (abs(value) <= _FLOAT32_MAX):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): sanitize_header_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize_header_value(v) for v in value]
    return value


def keep_own_headers(headers: Mapping[str, Any], dropped_reason: str) -> dict[str, Any]:
    """Only rabbitq's headers, when the others cannot travel; says why they were dropped."""
    out = {k: v for k, v in headers.items() if k.startswith("rabbitq-")}
    out[HEADER_DROPPED] = dropped_reason
    return out


def error_text(error: BaseException) -> str:
    """`Type: message`, bounded; never the payload."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def retry_headers(
    headers: Mapping[str, Any] | None,
    envelope: Envelope,
    failed_at: float,
    error: str,
    delay_seconds: float,
) -> dict[str, Any]:
    """Headers of the copy forwarded to a retry tier: next attempt, failure history, and when
    the tier's delay ends."""
    out = strip_broker_headers(headers)
    out.pop(HEADER_REDELIVERIES, None)  # each attempt gets the whole crash budget
    now_ms = epoch_ms(failed_at)
    out[HEADER_ATTEMPT] = envelope.attempt + 1
    out[HEADER_FIRST_FAILURE] = envelope.first_failure_ms or now_ms
    out[HEADER_LAST_FAILURE] = now_ms
    out[HEADER_LAST_ERROR] = error[:MAX_ERROR_CHARS]
    out[HEADER_RETRY_AT] = epoch_ms(failed_at + delay_seconds)
    return out


def recount_headers(headers: Mapping[str, Any] | None, redeliveries: int) -> dict[str, Any]:
    """Headers of the copy that carries a redelivered task's new redelivery count."""
    out = strip_broker_headers(headers)
    out[HEADER_REDELIVERIES] = redeliveries
    return out


def park_headers(
    headers: Mapping[str, Any] | None,
    *,
    reason: ParkReason,
    error_type: str,
    error_message: str,
    traceback: str,
    attempts: int,
    first_failure_ms: int | None,
    failed_at: float,
    host: str,
    workload: str,
    published_at: float | None = None,
) -> dict[str, Any]:
    """Headers of a parked copy: the original headers plus why, when, where and how often.

    The copy's `timestamp` property becomes the park time, so the publish time moves to
    `rabbitq-published-at` (from `published_at`) if the original did not carry it.
    """
    out = strip_broker_headers(headers)
    if published_at is not None and HEADER_PUBLISHED_AT not in out:
        out[HEADER_PUBLISHED_AT] = epoch_ms(published_at)
    now_ms = epoch_ms(failed_at)
    out |= {
        HEADER_PARK_REASON: str(reason),
        HEADER_PARK_ERROR_TYPE: error_type,
        HEADER_PARK_ERROR: error_message[:MAX_ERROR_CHARS],
        HEADER_PARK_TRACEBACK: traceback[-MAX_TRACEBACK_CHARS:],
        HEADER_PARK_ATTEMPTS: attempts,
        HEADER_FIRST_FAILURE: first_failure_ms or now_ms,
        HEADER_LAST_FAILURE: now_ms,
        HEADER_PARKED_AT: now_ms,
        HEADER_PARK_HOST: host,
        HEADER_PARK_WORKLOAD: workload,
    }
    return out
