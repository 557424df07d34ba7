"""The wire format of a task message: AMQP properties and rabbitq headers, encoded and decoded.

A task message is published to the exchange `NS.tasks` with the workload as routing key:

* body: the payload as JSON (UTF-8), nothing wrapped around it;
* properties: `content_type` "application/json", `message_id` (the idempotency key, or a fresh
  id), `timestamp` (publish time, seconds), `delivery_mode` 2, `priority`, `type` (task name);
* headers: `rabbitq-attempt` (int, 1 on first publish; required), `rabbitq-published-at`
  (int, ms since the epoch, the first publish; optional), `rabbitq-deadline` (int, ms since
  the epoch; optional), `rabbitq-run-at` (int, ms: when a delayed task is to run; optional,
  see `_ladder.py` for where such a task is published); on retried copies also
  `rabbitq-first-failure`, `rabbitq-last-failure` (ms), `rabbitq-last-error` and
  `rabbitq-retry-at` (ms: when its tier's delay ends); on parked copies the `rabbitq-park-*`
  headers, and their `timestamp` is the time they were parked.

A `content_type` other than JSON is parked as `bad_envelope` (absent, it is taken as JSON); a
`priority` above the workload's `max_priority` runs at that maximum, as the broker queues it.

This is the one module that knows the format: `decode` turns what arrived into an `Envelope`
or raises `Poison`; `Outgoing` is a message to send (`new_task`, or `copy` of a delivery for a
tier, the work queue or the parking lot), and `frames` encodes one as the bytes of a publish.
It does no I/O and knows nothing of aio-pika.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pamqp.encode
import pamqp.frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from rabbitq._amqp import Properties
from rabbitq._errors import ParkReason, Poison

CONTENT_TYPE = "application/json"
PERSISTENT = 2

HEADER_ATTEMPT = "rabbitq-attempt"
HEADER_DEADLINE = "rabbitq-deadline"
HEADER_PUBLISHED_AT = "rabbitq-published-at"
HEADER_RETRY_AT = "rabbitq-retry-at"
HEADER_RUN_AT = "rabbitq-run-at"
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
# The whole header table travels in one frame (frame_max is 128 KiB by default): what came in
# fitted, but a parked copy adds up to ~5 KiB of its own headers.
MAX_HEADER_BYTES = 120 * 1024
# Properties a forwarded copy keeps from the original. `expiration` is dropped (it would
# shorten a tier's delay or expire a parked task) and so is `user_id` (the broker rejects a
# user_id that is not the publishing connection's user).
KEPT_PROPERTIES = ("content_encoding", "correlation_id", "reply_to", "app_id")
Headers = Mapping[str, Any] | None  # as a delivery has them


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
    headers: Headers,
    max_message_bytes: int,
    content_type: str | None = None,
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
    if (
        content_type
        and content_type != CONTENT_TYPE
        and content_type.partition(";")[0].strip().lower() != CONTENT_TYPE
    ):
        raise Poison(
            ParkReason.BAD_ENVELOPE,
            f"content_type is {_short(content_type)}; a task body is {CONTENT_TYPE}",
        )
    headers = headers or {}
    attempt = _int_header(headers, HEADER_ATTEMPT, 1, MAX_ATTEMPT)
    if attempt is None:
        raise Poison(ParkReason.BAD_ENVELOPE, f"header {HEADER_ATTEMPT!r} is missing")
    deadline_ms = _int_header(headers, HEADER_DEADLINE, 0, 2**53)
    ready_ms = _int_header(headers, HEADER_RETRY_AT, 0, 2**53)
    if ready_ms is None:
        ready_ms = _int_header(headers, HEADER_RUN_AT, 0, 2**53)
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


def new_task_headers(
    deadline: float | None, published_at: float, run_at: float | None = None
) -> dict[str, Any]:
    """Headers of a task published for the first time (to run at `run_at`, if later)."""
    headers: dict[str, Any] = {HEADER_ATTEMPT: 1, HEADER_PUBLISHED_AT: epoch_ms(published_at)}
    if deadline is not None:
        headers[HEADER_DEADLINE] = epoch_ms(deadline)
    if run_at is not None:
        headers[HEADER_RUN_AT] = epoch_ms(run_at)
    return headers


def strip_broker_headers(headers: Headers) -> dict[str, Any]:
    """Headers without the broker's dead-letter history.

    Republishing `x-death` makes RabbitMQ 3.x treat it as real history and silently drop the
    message as a dead-letter cycle after the next tier; 4.x ignores it. Our history lives in
    our own headers.
    """
    return {
        k: v
        for k, v in (headers or {}).items()
        if k not in _NOT_COPIED and not k.startswith(("x-first-death", "x-last-death"))
    }


# x-death (see above), and sender-selected distribution: a forged CC on a parked copy would
# copy it into other queues.
_NOT_COPIED = frozenset({"x-death", "CC", "BCC"})
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


# W3C trace context (`_tracing`): a copy keeps them, so a task's attempts stay in one trace;
# a value longer than W3C allows (tracestate: 512) may be what made the headers too big
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
MAX_TRACE_HEADER_CHARS = 512


def keep_own_headers(headers: Mapping[str, Any], dropped_reason: str) -> dict[str, Any]:
    """Only rabbitq's headers and the trace context, when the others cannot travel; says why
    they were dropped."""
    out = {
        k: v
        for k, v in headers.items()
        if k.startswith("rabbitq-")
        or (k in TRACE_HEADERS and isinstance(v, str) and len(v) <= MAX_TRACE_HEADER_CHARS)
    }
    out[HEADER_DROPPED] = dropped_reason
    return out


def error_text(error: BaseException) -> str:
    """`Type: message`, bounded; never the payload."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def retry_headers(
    headers: Headers, envelope: Envelope, failed_at: float, error: str, delay_seconds: float
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


def recount_headers(headers: Headers, redeliveries: int) -> dict[str, Any]:
    """Headers of the copy that carries a redelivered task's new redelivery count."""
    return strip_broker_headers(headers) | {HEADER_REDELIVERIES: redeliveries}


def park_headers(
    headers: Headers,
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
    return out | {
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


def timestamp_seconds(props: Properties) -> float | None:
    """The AMQP `timestamp` property in seconds since the epoch, if set."""
    return props.timestamp_s


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish: where it goes and what it is (`Task.message` returns one)."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    headers: dict[str, Any]
    task: str | None = None
    priority: int | None = None
    timestamp: datetime | None = None
    content_type: str | None = CONTENT_TYPE
    properties: dict[str, Any] | None = None  # other AMQP properties kept from an original
    kind: str = "task"  # for metrics: task, retry, park or redeliver
    # a queue that must exist for the message to reach one: a delayed task's work queue, which
    # the broker's mandatory flag cannot vouch for (the ladder takes any key)
    check_queue: str | None = None

    def amqp_properties(self) -> Basic.Properties:
        return Basic.Properties(
            headers=self.headers,
            content_type=self.content_type,
            delivery_mode=PERSISTENT,
            priority=self.priority,
            message_id=self.message_id,
            timestamp=self.timestamp,
            message_type=self.task,
            **(self.properties or {}),
        )


def copy(
    props: Properties,
    body: bytes,
    exchange: str,
    routing_key: str,
    headers: dict[str, Any],
    kind: str,
    timestamp: datetime | None = None,
) -> Outgoing:
    """A delivered message, with new headers, for a tier, the work queue or the parking lot."""
    return Outgoing(
        exchange=exchange,
        routing_key=routing_key,
        body=body,
        message_id=props.message_id or "",
        headers=_travelling(headers),
        task=props.message_type,
        priority=props.priority,
        timestamp=timestamp or props.timestamp,
        content_type=props.content_type,
        properties={k: getattr(props, k) for k in KEPT_PROPERTIES if getattr(props, k)},
        kind=kind,
    )


def _travelling(headers: dict[str, Any]) -> dict[str, Any]:
    """Headers that encode, and fit in one frame with room to spare.

    A header value another client sent may not survive a decode and re-encode, and a parked
    copy adds its own headers to the original ones; a copy that cannot be sent would be
    requeued forever.
    """
    try:
        size = len(pamqp.encode.field_table(headers))
    except (TypeError, ValueError, OverflowError, struct.error):
        headers = {k: sanitize_header_value(v) for k, v in headers.items()}
        try:
            size = len(pamqp.encode.field_table(headers))
        except (TypeError, ValueError, OverflowError, struct.error) as exc:
            return keep_own_headers(headers, f"could not be encoded again: {error_text(exc)}")
    if size > MAX_HEADER_BYTES:
        return keep_own_headers(headers, f"{size} bytes of headers, over {MAX_HEADER_BYTES}")
    return headers


def frames(
    out: Outgoing, channel_number: int, max_body: int, method_frames: dict[tuple[str, str], bytes]
) -> bytes:
    """The frames of one mandatory publish: the bytes aiormq's `basic_publish` writes.

    The Basic.Publish frame is the same for every message to one exchange and routing key on
    one channel, so it is encoded once (`method_frames` caches it, a thousand at most).
    """
    key = (out.exchange, out.routing_key)
    method = method_frames.get(key)
    if method is None:
        if len(out.routing_key) > 255:
            raise ValueError("routing key too long (max 255 bytes)")
        if len(method_frames) >= 1000:
            method_frames.clear()
        publish = Basic.Publish(exchange=out.exchange, routing_key=out.routing_key, mandatory=True)
        method = method_frames[key] = pamqp.frame.marshal(publish, channel_number)
    body = out.body
    parts = [method, _content_header(out, channel_number)]
    for offset in range(0, len(body), max_body):  # an empty body has no body frame
        chunk = body[offset : offset + max_body]
        parts += (_BODY_FRAME.pack(3, channel_number, len(chunk)), chunk, b"\xce")  # as pamqp
    return b"".join(parts)


# AMQP 0-9-1 basic property flags (pamqp's Basic.Properties.flags)
_CONTENT_TYPE, _HEADERS, _DELIVERY_MODE, _PRIORITY = 0x8000, 0x2000, 0x1000, 0x0800
_MESSAGE_ID, _TIMESTAMP, _TYPE = 0x0080, 0x0040, 0x0020
# frame type 2 (header), channel, frame size; class 60 (basic), weight 0, body size, flags
_HEADER_FRAME = struct.Struct(">BHIHHQH")
_BODY_FRAME = struct.Struct(">BHI")  # frame type 3 (body), channel, frame size
_HEADER_FIXED = 14  # class, weight, body size, flags
_OCTET = struct.Struct(">B")


def _content_header(out: Outgoing, channel_number: int) -> bytes:
    """The content header frame of a task message, byte for byte what pamqp encodes.

    pamqp's `Basic.Properties` builds, validates and encodes all 14 properties generically,
    ~13 us a task message, a quarter of a batch's client CPU once its writes were
    pipelined. A task message sets at most the seven below, so they are encoded here
    (~5 us), in the flag order AMQP fixes; the headers table is still pamqp's. A message
    carrying other properties (a copy of a foreign message) goes through pamqp.
    tests/unit/test_publish_wire.py checks that both give the same bytes.
    """
    if out.properties:
        header = ContentHeader(body_size=len(out.body), properties=out.amqp_properties())
        return pamqp.frame.marshal(header, channel_number)
    content_type, headers, priority = out.content_type, out.headers, out.priority
    message_id, timestamp, task = out.message_id, out.timestamp, out.task
    flags = (
        _DELIVERY_MODE
        | (_CONTENT_TYPE if content_type else 0)
        | (_HEADERS if headers is not None else 0)
        | (_PRIORITY if priority is not None else 0)
        | (_MESSAGE_ID if message_id else 0)
        | (_TIMESTAMP if timestamp is not None else 0)
        | (_TYPE if task else 0)
    )
    properties = b"".join(
        (
            _short_string(content_type) if content_type else b"",
            pamqp.encode.field_table(headers) if headers is not None else b"",
            b"\x02",  # delivery mode: persistent
            _OCTET.pack(priority) if priority is not None else b"",
            _short_string(message_id) if message_id else b"",
            pamqp.encode.timestamp(timestamp) if timestamp is not None else b"",
            _short_string(task) if task else b"",
        )
    )
    head = _HEADER_FRAME.pack(
        2, channel_number, _HEADER_FIXED + len(properties), 60, 0, len(out.body), flags
    )
    return b"".join((head, properties, b"\xce"))  # frame end


def _short_string(value: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise TypeError("string exceeds maximum length of 255 bytes")
    return _OCTET.pack(len(data)) + data
