"""Poison input fuzzed through the real broker: parked with its reason or run; the consumer lives.

Hypothesis draws batches of messages with arbitrary bodies, headers and properties: wrong
types, huge and negative numbers, invalid UTF-8, nested junk, bodies over the size limit,
missing or forged rabbitq headers, odd properties, and header values of every AMQP field type
(including `B`, `L` and `d`, which other clients send but pamqp does not). They go out as raw
AMQP, byte for byte as drawn, to a classic and a quorum workload, each with a rabbitq consumer
that runs in this event loop for the whole test. Every example publishes its batch plus a few
valid tasks and waits until each message has ended where the wire format (README) says:

* run to completion, when it is a valid task whose handler succeeds;
* otherwise parked once, untouched, with `rabbitq-park-reason` naming the expected `ParkReason`.

Every message carries a unique key in `correlation_id` (parked copies keep it) and, unless the
case is a missing or empty `message_id`, at the start of its `message_id` (what a handler
sees). After every batch both consumers must still run, never have reconnected, and have logged
no error. Shrinking is off: a failure names the exact messages that went wrong instead.

Inputs the consumer cannot handle today are left out of the strategies; each is kept as a
strict xfail test at the end of this file, whose reason names the bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import struct
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiormq.exceptions import AMQPError, ChannelInvalidStateError
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from pamqp import commands, decode, encode
from pydantic import BaseModel, ValidationError, field_validator

from rabbitq import App, Consumer, Park, TaskContext
from rabbitq import _parking as parking
from rabbitq._errors import ParkReason
from rabbitq._topology import Topology
from rabbitq._wire import (
    HEADER_ATTEMPT,
    HEADER_DEADLINE,
    HEADER_DELIVERY_COUNT,
    HEADER_FIRST_FAILURE,
    HEADER_LAST_ERROR,
    HEADER_LAST_FAILURE,
    HEADER_PARK_ATTEMPTS,
    HEADER_PARK_ERROR,
    HEADER_PARK_REASON,
    HEADER_PARK_TRACEBACK,
    HEADER_PARKED_AT,
    HEADER_REDELIVERIES,
    MAX_ATTEMPT,
)
from tests.helpers import running_consumer

# The topology ------------------------------------------------------------------------------------

CLASSIC = "classic"
QUORUM = "quorum"
IDLE = "idle"  # no consumer: for messages that must wait in the work queue
WORKLOADS = (CLASSIC, QUORUM)
MAX_MESSAGE_BYTES = 16_384  # room for deeply nested bodies that are still under the limit
MAX_REDELIVERIES = 5
MAX_ATTEMPTS = 2  # a failing handler is retried once, through the 50ms tier, then parked
_SPEC = {
    "capacity": 32,
    "max_message_bytes": MAX_MESSAGE_BYTES,
    "max_redeliveries": MAX_REDELIVERIES,
    "retry": {"tiers": ["50ms"], "max_attempts": MAX_ATTEMPTS},
}
TOPOLOGY = {CLASSIC: _SPEC, QUORUM: {"queue_type": "quorum", **_SPEC}, IDLE: _SPEC}

# How many generated inputs a CI run covers: EXAMPLES batches of at least BATCH_MIN messages,
# plus the explicit batch.
EXAMPLES = 40
BATCH_MIN = 26
BATCH_MAX = 32
MIN_INPUTS = 1000
VALID_TASKS_PER_BATCH = 2  # per workload, published with rabbitq between the fuzzed ones
BATCH_TIMEOUT_SECONDS = 15.0

COMPLETED = "completed"
PARK_REASONS = frozenset(str(r) for r in ParkReason)


# The handlers ------------------------------------------------------------------------------------


class Child(BaseModel):
    name: str
    values: list[int] = []


class Echo(BaseModel):
    """The payload of every fuzz task: enough field types to give pydantic work."""

    n: int
    note: str = ""
    tags: list[str] = []
    ratio: float = 0.0
    flag: bool = False
    when: datetime | None = None
    amount: Decimal | None = None
    child: Child | None = None


TASK_KINDS = ("echo", "sync", "fail", "park")


def task_name(workload: str, kind: str) -> str:
    return f"{workload}.{kind}"


def register_tasks(app: App, workload: str, completed: Callable[[str], None]) -> Any:
    """The fuzz handlers of one workload; returns the echo task (for the valid tasks)."""

    @app.task(task_name(workload, "echo"), workload=workload)
    async def echo(payload: Echo, ctx: TaskContext) -> None:
        completed(ctx.message_id)

    @app.task(task_name(workload, "sync"), workload=workload)
    def sync(payload: Echo, ctx: TaskContext) -> None:
        completed(ctx.message_id)

    @app.task(task_name(workload, "fail"), workload=workload)
    async def fail(payload: Echo) -> None:
        raise RuntimeError("fuzz: this handler always fails")

    @app.task(task_name(workload, "park"), workload=workload)
    async def park(payload: Echo) -> None:
        raise Park("fuzz: this handler parks every task")

    return echo


# Writing AMQP exactly as drawn ------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """Bytes that go on the wire as they are: a field value with its type tag, or a property."""

    data: bytes


def encode_value(value: Any) -> bytes:
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, dict):
        return b"F" + encode_table(value)
    if isinstance(value, list):
        items = b"".join(encode_value(v) for v in value)
        return b"A" + struct.pack(">I", len(items)) + items
    return encode.encode_table_value(value)


def encode_table(table: Mapping[str | bytes, Any]) -> bytes:
    """A field table; unlike pamqp's, keys may be bytes and are never truncated."""
    out = b""
    for key, value in table.items():
        raw_key = key if isinstance(key, bytes) else key.encode()
        out += struct.pack(">B", len(raw_key)) + raw_key + encode_value(value)
    return struct.pack(">I", len(out)) + out


class WireProperties(commands.Basic.Properties):
    """Basic properties marshalled exactly as given in `wire` (None: absent).

    aiormq invents a `message_id` when there is none, and pamqp refuses values other clients
    send; here `message_id` is only aiormq's bookkeeping and `wire` is what the broker gets.
    """

    def __init__(self, wire: Mapping[str, Any], tracking_id: str) -> None:
        super().__init__(message_id=tracking_id)
        self.wire = dict(wire)

    def marshal(self) -> bytes:
        flags = 0
        parts = []
        for name in self.__slots__:
            value = self.wire.get(name)
            if value is None:
                continue
            flags |= self.flags[name]
            if isinstance(value, Raw):
                parts.append(value.data)
            elif name == "headers":
                parts.append(encode_table(value))
            else:
                parts.append(encode.by_type(value, self.amqp_type(name)))
        return struct.pack(">H", flags) + b"".join(parts)


def as_delivered(headers: Mapping[str | bytes, Any] | None) -> dict[str, Any] | None:
    """The headers as the consumer decodes them (pamqp), e.g. an `L` comes back signed."""
    if headers is None:
        return None
    return decode.field_table(encode_table(headers))[1]


# One generated message ---------------------------------------------------------------------------

KEYED = "<key>"  # replaced by the message's unique key when it is published
ATTEMPT_1: dict[str | bytes, Any] = {HEADER_ATTEMPT: 1}


@dataclass(frozen=True, repr=False)
class Sample:
    """One fuzzed message.

    `message_id`: None is absent, "" is present but empty, a text starting with `<key>` gets the
    message's unique key in its place, and a `Raw` goes out as it is. `properties` are the other
    Basic properties by their pamqp names (`content_type`, `priority`, `timestamp`, ...).
    """

    workload: str
    body: bytes
    task: str | None
    message_id: str | Raw | None = KEYED
    headers: dict[str | bytes, Any] | None = field(default_factory=lambda: {**ATTEMPT_1})
    properties: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return describe(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis prints this one
        printer.text(describe(self))


def describe(sample: Sample) -> str:
    """The sample, short enough to read in a failure: long bodies and values are cut."""

    def cut(value: Any, limit: int = 80) -> str:
        text = repr(value)
        return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} chars)"

    body = cut(sample.body)
    headers = (
        None
        if sample.headers is None
        else "{" + ", ".join(f"{cut(k, 40)}: {cut(v, 60)}" for k, v in sample.headers.items()) + "}"
    )
    return (
        f"Sample(workload={sample.workload!r}, task={sample.task!r}, "
        f"message_id={sample.message_id!r}, body={body} ({len(sample.body)} bytes), "
        f"headers={headers}, properties={cut(sample.properties, 160)})"
    )


# What must become of a message -------------------------------------------------------------------


def _int_in(headers: Mapping[str, Any], name: str, low: int, high: int, required: bool) -> bool:
    if name not in headers:
        return not required
    value = headers[name]
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _body_outcome(body: bytes) -> str | None:
    """None for a payload the handlers take, else the reason it is parked."""
    try:
        Echo.model_validate_json(body)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            return ParkReason.UNDECODABLE
        return ParkReason.INVALID_PAYLOAD
    return None


def _outcome(sample: Sample, headers: Mapping[str, Any] | None, now: float) -> str:
    if len(sample.body) > MAX_MESSAGE_BYTES:
        return ParkReason.TOO_LARGE
    h = headers or {}
    content_type = sample.properties.get("content_type")
    envelope_ok = (
        bool(sample.task)
        and bool(sample.message_id)
        and (not content_type or content_type.split(";")[0].strip().lower() == "application/json")
        and _int_in(h, HEADER_ATTEMPT, 1, MAX_ATTEMPT, required=True)
        and _int_in(h, HEADER_DEADLINE, 0, 2**53, required=False)
        and _int_in(h, HEADER_FIRST_FAILURE, 0, 2**53, required=False)
        and _int_in(h, HEADER_LAST_FAILURE, 0, 2**53, required=False)
        and _int_in(h, HEADER_REDELIVERIES, 0, MAX_ATTEMPT, required=False)
        and _int_in(h, HEADER_DELIVERY_COUNT, 0, 2**53, required=False)
    )
    if not envelope_ok:
        return ParkReason.BAD_ENVELOPE
    if h.get(HEADER_DELIVERY_COUNT, 0) >= MAX_REDELIVERIES:
        return ParkReason.CRASH_LOOP
    kinds = {task_name(sample.workload, k): k for k in TASK_KINDS}
    if sample.task not in kinds:
        return ParkReason.UNKNOWN_TASK
    if HEADER_DEADLINE in h and h[HEADER_DEADLINE] / 1000 < now:
        return ParkReason.EXPIRED
    body = _body_outcome(sample.body)
    if body is not None:
        return body
    return {
        "echo": COMPLETED,
        "sync": COMPLETED,
        "fail": ParkReason.RETRIES_EXHAUSTED,
        "park": ParkReason.PARKED_BY_HANDLER,
    }[kinds[sample.task]]


def expected_outcomes(sample: Sample, now: float) -> set[str]:
    """Where the wire format says this message must end: `completed` or a park reason."""
    headers = as_delivered(sample.headers)
    outcomes = {str(_outcome(sample, headers, now))}
    if sample.workload == QUORUM and headers and HEADER_DELIVERY_COUNT in headers:
        # A quorum queue sets x-delivery-count itself (0 on a first delivery on 3.10), so a
        # forged value may not survive the queue.
        outcomes.add(str(_outcome(sample, {**headers, HEADER_DELIVERY_COUNT: 0}, now)))
    return outcomes


# Strategies --------------------------------------------------------------------------------------
#
# A third of the samples are anything at all. The rest are built around an envelope that is
# valid, or wrong in exactly one place, so that the body, the handlers, forged headers and odd
# properties get exercised too instead of almost everything failing at the first check.

NOW_MS = int(time.time() * 1000)
HOUR_MS = 3_600_000
INT64 = (-(2**63), 2**63 - 1)

int64s = st.integers(*INT64)
decimals = st.builds(
    lambda mantissa, scale: Decimal(mantissa).scaleb(-scale),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(0, 40),
)
datetimes = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=0))
# RabbitMQ (Erlang) cannot parse a NaN or infinite float in a table: the publishing channel
# crashes with INTERNAL_ERROR, so such headers never reach a consumer.
finite_floats32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
octets = st.integers(0, 255).map(lambda v: Raw(b"B" + struct.pack(">B", v)))
unsigned64s = st.integers(0, 2**64 - 1).map(lambda v: Raw(b"L" + struct.pack(">Q", v)))
scalar_values = st.one_of(
    st.none(),
    st.booleans(),
    int64s,
    finite_floats32,  # pamqp sends every float as `f`
    decimals,
    st.text(max_size=20),
    st.binary(max_size=20).map(bytearray),
    datetimes,
    # Field types other clients send and pamqp does not: unsigned octet and 64-bit, and a
    # double (only within float32 range: see the header_double_beyond_float32_range case).
    octets,
    unsigned64s,
    finite_floats32.map(lambda v: Raw(b"d" + struct.pack(">d", v))),
)
field_values = st.recursive(
    scalar_values,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=4,
)


def not_an_int_in(low: int, high: int) -> st.SearchStrategy[Any]:
    """What a producer might put in an integer header instead: mostly not an int in range."""
    out_of_range = st.integers(INT64[0], low - 1)
    if high < INT64[1]:
        out_of_range |= st.integers(high + 1, INT64[1])
    in_range = st.integers(low, min(high, 2**31 - 1))
    return st.one_of(
        out_of_range,
        in_range.map(str),
        in_range.map(float),
        in_range.map(Decimal),
        st.booleans(),
        octets,  # decodes to an int: fine when in range
        unsigned64s,  # decodes signed
        field_values,
    )


VALID_CHECKED_HEADERS: dict[str, st.SearchStrategy[int]] = {
    # A clear hour from now either way, so "expired" does not depend on timing.
    HEADER_DEADLINE: st.integers(0, NOW_MS - HOUR_MS) | st.integers(NOW_MS + HOUR_MS, 2**53),
    HEADER_FIRST_FAILURE: st.integers(0, 2**53),
    HEADER_LAST_FAILURE: st.integers(0, 2**53),
    HEADER_REDELIVERIES: st.integers(0, MAX_ATTEMPT),
    HEADER_DELIVERY_COUNT: st.integers(0, 2 * MAX_REDELIVERIES),
}
INVALID_CHECKED_HEADERS: dict[str, st.SearchStrategy[Any]] = {
    HEADER_ATTEMPT: not_an_int_in(1, MAX_ATTEMPT),
    HEADER_DEADLINE: not_an_int_in(0, 2**53),
    HEADER_FIRST_FAILURE: not_an_int_in(0, 2**53),
    HEADER_LAST_FAILURE: not_an_int_in(0, 2**53),
    HEADER_REDELIVERIES: not_an_int_in(0, MAX_ATTEMPT),
    HEADER_DELIVERY_COUNT: not_an_int_in(0, 2**53),
}
# Headers rabbitq writes but never reads back: forged ones must be overwritten or ignored.
UNCHECKED_HEADERS: dict[str, st.SearchStrategy[Any]] = {
    HEADER_LAST_ERROR: field_values,
    HEADER_PARK_REASON: st.sampled_from(sorted(PARK_REASONS)) | field_values,
    HEADER_PARK_ERROR: field_values,
    HEADER_PARK_TRACEBACK: field_values,
    HEADER_PARK_ATTEMPTS: field_values,
    HEADER_PARKED_AT: field_values,
    "x-death": field_values,
    "x-first-death-reason": field_values,
}
# CC and BCC make the broker copy a message into other queues (sender-selected distribution),
# a feature rather than poison.
header_keys = st.text(max_size=40).filter(lambda k: k not in ("CC", "BCC"))
extra_headers = st.dictionaries(header_keys, field_values, max_size=3)
# Headers up to 100 kB: the parked copy must still fit in one frame (see the frame test below).
pads = st.none() | st.none() | st.integers(0, 100_000)
shortstrs = st.text(max_size=40)  # at most 160 bytes of UTF-8; a shortstr holds 255

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=4,
)
payloads = st.fixed_dictionaries(
    {"n": st.one_of(int64s, st.integers(), st.integers(-(10**30), 10**30))},
    optional={
        "note": st.text(max_size=20),
        "tags": st.lists(st.text(max_size=5), max_size=3),
        "ratio": st.floats(),
        "when": st.datetimes().map(datetime.isoformat),
        "amount": decimals.map(str),
        "child": st.fixed_dictionaries(
            {"name": st.text(max_size=5)}, optional={"values": json_values}
        ),
        "extra": json_values,
    },
)


def _dump(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode()


valid_bodies = st.builds(_dump, payloads, st.booleans())
bodies = st.one_of(
    *[valid_bodies] * 6,
    st.builds(_dump, json_values, st.booleans()),  # JSON of the wrong shape
    st.builds(_dump, st.fixed_dictionaries({"n": json_values}), st.booleans()),  # wrong types
    st.binary(max_size=100),  # mostly not UTF-8, rarely JSON
    st.builds(lambda b, i: b[:i], valid_bodies, st.integers(0, 40)),  # cut short
    st.builds(  # a few bytes, often invalid UTF-8, dropped somewhere into valid JSON
        lambda b, i, junk: b[:i] + junk + b[i:],
        valid_bodies,
        st.integers(0, 40),
        st.binary(min_size=1, max_size=4),
    ),
    st.integers(1, 5_000).map(lambda d: b'{"n": 1, "tags": ' + b"[" * d + b"]" * d + b"}"),
    st.integers(1, 2_000).map(
        lambda d: b'{"n": 1, "extra": ' + b'{"a": ' * d + b"0" + b"}" * d + b"}"
    ),
    st.integers(1, 6_000).map(lambda k: b'{"n": -' + b"9" * k + b"}"),
    st.integers(1, 6_000).map(lambda k: b'{"n": 1, "ratio": 1e' + b"9" * k + b"}"),
    st.integers(MAX_MESSAGE_BYTES + 1, 8 * MAX_MESSAGE_BYTES).map(
        lambda size: b'{"n":1,"p":"' + b"x" * (size - 14) + b'"}'
    ),
    st.just(b""),
)
properties_strategy = st.fixed_dictionaries(
    {},
    optional={
        "content_type": st.just("application/json") | shortstrs,
        "content_encoding": st.sampled_from(["gzip", "utf-8"]) | shortstrs,
        "delivery_mode": st.sampled_from([1, 2]),  # the broker refuses any other value
        "priority": st.integers(0, 255),
        "reply_to": shortstrs,
        # Longer than any batch waits in the queue: an expiration that runs out there is
        # test_message_expired_in_the_work_queue_is_parked_with_a_reason.
        "expiration": st.integers(60_000, 2**31 - 1).map(str),
        "timestamp": datetimes,
        "app_id": shortstrs,
    },
)
keyed_ids = st.just(KEYED) | shortstrs.map(lambda s: KEYED + s)
message_ids = st.one_of(keyed_ids, keyed_ids, st.none(), st.just(""))


def our_tasks(workload: str) -> st.SearchStrategy[str]:
    kinds = st.sampled_from(["echo", "fail", "sync", "park"])
    return kinds.map(lambda kind: task_name(workload, kind))


def task_names(workload: str) -> st.SearchStrategy[str | None]:
    theirs = [task_name(w, k) for w in WORKLOADS if w != workload for k in TASK_KINDS]
    ours = our_tasks(workload)
    return st.one_of(ours, ours, ours, st.none(), st.just(""), shortstrs, st.sampled_from(theirs))


def any_headers() -> st.SearchStrategy[dict[str | bytes, Any] | None]:
    ours = st.fixed_dictionaries(
        {}, optional={HEADER_ATTEMPT: st.just(1), **INVALID_CHECKED_HEADERS, **UNCHECKED_HEADERS}
    )
    return st.builds(lambda extra, rq: {**extra, **rq}, extra_headers, ours) | st.none()


DEFECTS = (None, None, None, None, None, "task", "message_id", "headers", "a rabbitq header")


@st.composite
def samples(draw: st.DrawFn) -> Sample:
    workload = draw(st.sampled_from(WORKLOADS))
    body = draw(bodies)
    properties = draw(properties_strategy)
    if draw(st.sampled_from(["envelope", "envelope", "anything"])) == "anything":
        anything = (draw(task_names(workload)), draw(message_ids), draw(any_headers()))
        return Sample(workload, body, *anything, properties=properties)
    extra: dict[str, Any] = draw(extra_headers)
    if draw(st.booleans()):
        extra |= draw(st.fixed_dictionaries({}, optional=UNCHECKED_HEADERS))
    headers: dict[str | bytes, Any] = dict(extra.items())
    checked = draw(st.none() | st.sampled_from(sorted(VALID_CHECKED_HEADERS)))
    if checked is not None:
        headers[checked] = draw(VALID_CHECKED_HEADERS[checked])
    headers[HEADER_ATTEMPT] = draw(st.just(1) | st.integers(1, MAX_ATTEMPT))
    pad = draw(pads)
    if pad is not None:
        headers["fuzz-pad"] = "x" * pad
    task: str | None = draw(st.one_of(*[our_tasks(workload)] * 3, task_names(workload)))
    message_id: str | None = draw(keyed_ids)
    envelope: dict[str | bytes, Any] | None = headers
    defect = draw(st.sampled_from(DEFECTS))  # None (no defect) five times in nine
    if defect == "task":
        task = draw(st.sampled_from([None, ""]))
    elif defect == "message_id":
        message_id = draw(st.sampled_from([None, ""]))
    elif defect == "headers":
        envelope = draw(st.sampled_from([None, {}]))
    elif defect == "a rabbitq header":
        name = draw(st.sampled_from(sorted(INVALID_CHECKED_HEADERS)))
        headers[name] = draw(INVALID_CHECKED_HEADERS[name])
    return Sample(workload, body, task, message_id, envelope, properties)


batches = st.lists(samples(), min_size=BATCH_MIN, max_size=BATCH_MAX)


# The explicit batch: every kind of input the issue names, on every run ---------------------------

OK_BODY = b'{"n": 1}'
NOT_JSON = b"{not json"
EVERY_FIELD_TYPE: dict[str | bytes, Any] = {
    HEADER_ATTEMPT: 1,
    "str": "h\u00e9llo \u2603",
    "bytes": bytearray(b"\xff\x00\xfe"),
    "int": -(2**63),
    "float": 3.4028234663852886e38,  # the largest float32
    "bool": False,
    "none": None,
    "list": [1, "two", [3.5], {"four": None}],
    "dict": {"a": {"b": {"c": []}}, "": "empty key"},
    "datetime": datetime(2999, 1, 1, tzinfo=UTC),
    "decimal": Decimal("-12345.6789"),
    "octet": Raw(b"B\xff"),
    "unsigned64": Raw(b"L" + struct.pack(">Q", 2**64 - 1)),
    "double": Raw(b"d" + struct.pack(">d", 0.5)),
    "k" * 200: "a key longer than pamqp's 128 bytes",
}


def _c(body: bytes = OK_BODY, task: str | None = "classic.echo", **kwargs: Any) -> Sample:
    return Sample(workload=CLASSIC, body=body, task=task, **kwargs)


def _q(body: bytes = OK_BODY, task: str | None = "quorum.echo", **kwargs: Any) -> Sample:
    return Sample(workload=QUORUM, body=body, task=task, **kwargs)


EXPLICIT_BATCH = [
    _c(),
    _c(task="classic.sync"),
    _c(task=None),
    _c(task=""),
    _c(message_id=None),
    _c(message_id=""),
    _c(headers=None),
    _c(headers={}),
    _c(headers={HEADER_ATTEMPT: "1"}),
    _c(headers={HEADER_ATTEMPT: 1.0}),
    _c(headers={HEADER_ATTEMPT: True}),
    _c(headers={HEADER_ATTEMPT: -1}),
    _c(headers={HEADER_ATTEMPT: 0}),
    _c(headers={HEADER_ATTEMPT: 2**63 - 1}),
    _c(headers={HEADER_ATTEMPT: {"attempt": 1}}),
    _c(headers={HEADER_ATTEMPT: [1]}),
    _c(headers={HEADER_ATTEMPT: Decimal(1)}),
    _c(headers={HEADER_ATTEMPT: Raw(b"L" + struct.pack(">Q", 2**64 - 1))}),
    _c(task="classic.fail", headers={HEADER_ATTEMPT: MAX_ATTEMPT}),
    _c(headers={HEADER_ATTEMPT: 1, HEADER_DEADLINE: "tomorrow"}),
    _c(headers={HEADER_ATTEMPT: 1, HEADER_DEADLINE: -1}),
    _c(headers={HEADER_ATTEMPT: 1, HEADER_DEADLINE: 0}),
    _c(headers={HEADER_ATTEMPT: 1, HEADER_DEADLINE: 2**53}),
    _c(headers={HEADER_ATTEMPT: 1, HEADER_REDELIVERIES: [1]}),
    _c(headers={HEADER_ATTEMPT: 1, HEADER_REDELIVERIES: 10**9}),
    _c(headers={HEADER_ATTEMPT: 1, HEADER_DELIVERY_COUNT: "3"}),
    _c(headers={HEADER_ATTEMPT: 1, HEADER_DELIVERY_COUNT: MAX_REDELIVERIES}),
    _q(headers={HEADER_ATTEMPT: 1, HEADER_DELIVERY_COUNT: 99}),
    _c(headers={HEADER_ATTEMPT: 1, HEADER_PARK_REASON: "crash_loop", HEADER_PARK_ATTEMPTS: "x"}),
    _c(NOT_JSON, headers={HEADER_ATTEMPT: 1, HEADER_PARK_REASON: 7, HEADER_PARKED_AT: None}),
    _c(NOT_JSON, headers={HEADER_ATTEMPT: 1, "x-death": "junk", "x-first-death-queue": 1}),
    _c(b"\xff\xfe\x00 not utf-8"),
    _c(b'{"n": 1, "note": "\xed\xa0\x80"}'),  # a UTF-8-encoded lone surrogate
    _c(b'{"n": 1, "note": "\\ud800"}'),
    _c(b""),
    _c(b'{"n": [[{"a": null}]], "child": {"values": {"x": 1}}}'),
    _c(b'{"n": 1, "tags": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    _c(b'{"n": ' + b"9" * 5000 + b"}"),
    _c(b'{"n": 1e400}'),
    _c(b'{"n":1,"p":"' + b"x" * (MAX_MESSAGE_BYTES + 1 - 14) + b'"}'),
    _c(b"x" * 200_000),  # more than one frame
    _c(task="classic.nobody"),
    _c(task="quorum.echo"),
    _c(task="\u2603" * 40),
    _c(task="classic.park"),
    _c(task="classic.fail"),
    _c(
        properties={
            "priority": 255,
            "content_type": "text/plain; charset=latin-1",
            "content_encoding": "gzip",
            "delivery_mode": 1,
            "expiration": "60000",
            "timestamp": datetime(9999, 12, 31, tzinfo=UTC),
            "reply_to": "\u00e9",
            "app_id": "",
        }
    ),
    _c(NOT_JSON, headers=EVERY_FIELD_TYPE),
    _c(task="classic.fail", headers=EVERY_FIELD_TYPE, properties={"expiration": "60000"}),
    _c(NOT_JSON, headers={HEADER_ATTEMPT: 1, "fuzz-pad": "x" * 100_000}),
    _q(NOT_JSON, headers=EVERY_FIELD_TYPE),
    _q(task="quorum.fail", headers=EVERY_FIELD_TYPE),
    _q(task="quorum.sync", properties={"priority": 255}),
]


# The rig: two consumers, a reader of each parking lot, and the ledger ----------------------------


def key_of(message_id: str) -> str:
    """The ledger key of a message id: the fuzz key at its start, or the whole id (valid tasks)."""
    return message_id[:KEY_LENGTH] if message_id.startswith("k") else message_id


KEY_LENGTH = 8  # "k0000042"


class _Errors(logging.Handler):
    """Errors of the consume path; a parked task's outcome line (also ERROR) is the expected
    result of poison, not an error of rabbitq's."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "outcome", None) != "parked":
            self.records.append(record)


@dataclass(repr=False)
class Rig:
    connection: AbstractConnection
    topology: Topology
    url: str
    apps: dict[str, App] = field(default_factory=dict)
    consumers: dict[str, Consumer] = field(default_factory=dict)
    run_tasks: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    valid_tasks: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, Sample] = field(default_factory=dict)
    valid_ids: set[str] = field(default_factory=set)
    outcomes: dict[str, list[str]] = field(default_factory=dict)
    sent_ids: dict[str, str | Raw | None] = field(default_factory=dict)
    parked: dict[str, AbstractIncomingMessage] = field(default_factory=dict)
    errors: _Errors = field(default_factory=_Errors)
    require_inputs: int = 0
    failed: bool = False
    batches: int = 0
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _underlay: Any = None

    def __repr__(self) -> str:
        return f"Rig(namespace={self.topology.namespace!r}, inputs={len(self.samples)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis prints this one
        printer.text(repr(self))

    def record(self, key: str, outcome: str) -> None:
        with self._lock:  # sync handlers report from worker threads
            self.outcomes.setdefault(key, []).append(outcome)

    def completed(self, message_id: str) -> None:
        self.record(key_of(message_id), COMPLETED)

    async def on_parked(self, message: AbstractIncomingMessage) -> None:
        key = message.correlation_id or key_of(message.message_id or "?")
        # what an operator's `parking list` shows: rabbitq's reason, else the broker's
        reason = parking.reason_of(dict(message.headers or {}))
        self.record(key, reason or f"parked without a reason: {message.headers!r}")
        self.parked[key] = message

    def _new_key(self) -> str:
        return f"k{len(self.samples):07d}"

    async def publish(self, sample: Sample) -> str:
        """Publish one sample as raw AMQP, confirmed; its ledger key."""
        key = self._new_key()
        self.samples[key] = sample
        message_id = sample.message_id
        if isinstance(message_id, str) and message_id.startswith(KEYED):
            message_id = key + message_id[len(KEYED) :]
        self.sent_ids[key] = message_id
        wire = {
            **sample.properties,
            "headers": sample.headers,
            "message_type": sample.task,
            "message_id": message_id,
            "correlation_id": key,
        }
        workload = self.topology.workload(sample.workload)
        try:
            confirmation = await self._underlay.basic_publish(
                sample.body,
                exchange=workload.task_exchange,
                routing_key=workload.routing_key,
                properties=WireProperties(wire, tracking_id=key),
                mandatory=True,
            )
        except (AMQPError, ChannelInvalidStateError, ConnectionError) as exc:
            raise AssertionError(
                f"publishing {describe(sample)} failed: {exc!r}; if another test restarted the "
                "broker or closed connections meanwhile, run again"
            ) from exc
        assert isinstance(confirmation, commands.Basic.Ack), (
            f"the broker did not take {describe(sample)}: {confirmation!r}"
        )
        return key

    def check_alive(self) -> None:
        errors = "".join(f"\n  {r.getMessage()}" for r in self.errors.records[:3])
        for name, consumer in self.consumers.items():
            task = self.run_tasks[name]
            assert not task.done(), f"the {name} consumer stopped: {task!r}{errors}"
            assert consumer.reconnects == 0, (
                f"the {name} consumer reconnected {consumer.reconnects} times (if another test "
                f"restarted the broker or closed connections meanwhile, run again){errors}"
            )
            assert consumer.ready.is_set(), f"the {name} consumer is not consuming{errors}"
        assert not errors, f"the consumers logged errors:{errors}"

    async def wait_for(self, keys: list[str], timeout: float) -> None:  # noqa: ASYNC109 - a polling deadline
        """Until every key has an outcome; fail naming the messages that never ended anywhere."""
        deadline = time.monotonic() + timeout
        while True:
            missing = [k for k in keys if not self.outcomes.get(k)]
            if not missing:
                return
            if time.monotonic() > deadline or any(c.reconnects for c in self.consumers.values()):
                self.check_alive()
                lost = [describe(self.samples[k]) if k in self.samples else k for k in missing]
                raise AssertionError(
                    f"{len(missing)} of {len(keys)} messages were neither parked nor run within "
                    f"{timeout}s:\n  " + "\n  ".join(lost[:5])
                )
            await asyncio.sleep(0.02)

    async def run_batch(self, batch: list[Sample]) -> None:
        """Publish a batch and valid tasks; check where each ended and that consumers live."""
        self.batches += 1
        keys = list(await asyncio.gather(*(self.publish(s) for s in batch)))
        for workload, task in self.valid_tasks.items():
            for n in range(VALID_TASKS_PER_BATCH):
                message_id = await task.publish(Echo(n=n, note=f"valid task in {workload}"))
                self.valid_ids.add(message_id)
                keys.append(message_id)
        await self.wait_for(keys, BATCH_TIMEOUT_SECONDS)
        now = time.time()
        wrong = []
        for key in keys:
            outcomes = self.outcomes[key]
            sample = self.samples.get(key)
            expected = {COMPLETED} if sample is None else expected_outcomes(sample, now)
            if len(outcomes) != 1 or outcomes[0] not in expected:
                what = describe(sample) if sample else f"the valid task {key}"
                wrong.append(f"{what}\n    ended as {outcomes}, expected one of {sorted(expected)}")
            elif outcomes[0] != COMPLETED and sample is not None:
                changed = self.changed_in_parking(key, sample)
                if changed:
                    wrong.append(f"{describe(sample)}\n    was parked with {changed} changed")
        assert not wrong, f"{len(wrong)} messages ended in the wrong place:\n" + "\n".join(
            wrong[:5]
        )
        self.check_alive()

    def changed_in_parking(self, key: str, sample: Sample) -> str:
        """What the parked copy did not keep of the original: body, type, id or headers."""
        copy = self.parked[key]
        sent_id = self.sent_ids[key]
        if copy.body != sample.body:
            return "its body"
        if copy.type != (sample.task or None):
            return "its type"
        if isinstance(sent_id, str) and sent_id and copy.message_id != sent_id:
            return "its message_id"
        kept = {
            k: v
            for k, v in (as_delivered(sample.headers) or {}).items()
            if not k.startswith(("rabbitq-", "x-death", "x-first-death", "x-last-death"))
            and k != HEADER_DELIVERY_COUNT  # quorum queues set it
            and len(k.encode()) <= 128  # pamqp cuts longer keys when it encodes the copy
        }
        copy_headers = copy.headers or {}
        lost = [
            k for k, v in kept.items() if k not in copy_headers or not _same(copy_headers[k], v)
        ]
        return f"headers {lost[:3]}" if lost else ""

    def distribution(self) -> Counter[str]:
        return Counter(o for k, outs in self.outcomes.items() if k in self.samples for o in outs)


@pytest.fixture
async def rig(
    make_topology: Callable[..., Any], connection: AbstractConnection, url: str
) -> AsyncIterator[Rig]:
    """A classic and a quorum consumer running in this loop, with the parking lots read."""
    topology = await make_topology(**TOPOLOGY)
    rig = Rig(connection=connection, topology=topology, url=url)
    logging.getLogger("rabbitq").addHandler(rig.errors)
    channel = await connection.channel()
    rig._underlay = await channel.get_underlay_channel()
    for name in (*WORKLOADS, IDLE):
        queue = await channel.get_queue(topology.workload(name).parking_queue, ensure=False)
        await queue.consume(rig.on_parked, no_ack=True)
    try:
        async with contextlib.AsyncExitStack() as stack:
            for name in WORKLOADS:
                app = App(namespace=topology.namespace, url=url)
                rig.apps[name] = app
                rig.valid_tasks[name] = register_tasks(app, name, rig.completed)
                consumer = await stack.enter_async_context(
                    running_consumer(app, topology.workload(name), url, grace_seconds=5)
                )
                rig.consumers[name] = consumer
                rig.run_tasks[name] = _run_task_of(consumer)
            yield rig
            if rig.require_inputs and not rig.failed:
                _final_checks(rig)
    finally:
        logging.getLogger("rabbitq").removeHandler(rig.errors)
        if not channel.is_closed:
            await channel.close()
        gc.collect()  # now, not while pytest formats the next failure: see collected_on_failure


def _same(a: Any, b: Any) -> bool:
    """Header values equal, but for the sub-second part pamqp loses on far-future timestamps.

    pamqp reads a timestamp above 2**32 seconds (after 2106) as milliseconds, so the consumer
    sees a 1970s date with a fraction, and writes it back without the fraction.
    """
    if isinstance(a, datetime) and isinstance(b, datetime):
        return abs((a - b).total_seconds()) < 1
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def _run_task_of(consumer: Consumer) -> asyncio.Task[Any]:
    """The task running `consumer.run()` (running_consumer does not hand it out)."""
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        frame = getattr(coro, "cr_frame", None)
        if getattr(coro, "__qualname__", "") == "Consumer.run" and frame is not None:
            if frame.f_locals.get("self") is consumer:
                return task
    raise AssertionError("no task runs the consumer")


def _final_checks(rig: Rig) -> None:
    inputs = len(rig.samples)
    ended = sum(len(v) for k, v in rig.outcomes.items() if k in rig.samples)
    distribution = rig.distribution()
    width = max(map(len, distribution), default=0)
    print(
        f"\npoison fuzz: {inputs} inputs in {rig.batches} batches, {len(rig.valid_ids)} valid "
        f"tasks between them, {time.monotonic() - rig.started:.1f}s; parked + run = {ended}"
    )
    for outcome, count in distribution.most_common():
        print(f"  {outcome:<{width}}  {count:5d}  {100 * count / max(inputs, 1):5.1f}%")
    assert inputs >= rig.require_inputs, (
        f"only {inputs} generated inputs; CI needs {rig.require_inputs}"
    )
    duplicates = {k: v for k, v in rig.outcomes.items() if len(v) > 1}
    assert not duplicates, f"messages that ended twice: {list(duplicates.items())[:5]}"
    assert ended == inputs, f"{inputs} inputs sent but {ended} parked or run"
    assert all(rig.outcomes.get(i) == [COMPLETED] for i in rig.valid_ids), "a valid task was lost"


@contextlib.contextmanager
def collected_on_failure(rig: Rig | None = None) -> Iterator[None]:
    """Collect garbage before a failure propagates to pytest.

    On Python 3.11 the ast module is not re-entrant (CPython gh-106905): a finalizer that
    formats a traceback while pytest parses source to show this failure (a dead connection's
    futures are such garbage) ends the whole run with INTERNALERROR "AST constructor recursion
    depth mismatch". Collecting here runs those finalizers first.
    """
    try:
        yield
    except BaseException:
        if rig is not None:
            rig.failed = True
        gc.collect()
        raise


# The fuzz test -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
# A failing batch is replayed and printed; its samples print short, but a batch may still be long.
@pytest.mark.filterwarnings(
    "ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning"
)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written to .hypothesis/; a failure names its messages instead
    phases=[Phase.explicit, Phase.generate],  # shrinking would re-run batches on a dirty broker
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one topology and two consumers for all examples
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@example(batch=EXPLICIT_BATCH)
@given(batch=batches)
async def test_poison_input_is_parked_with_its_reason_or_run_and_the_consumer_lives_on(
    rig: Rig, batch: list[Sample]
) -> None:
    """Each fuzzed message is parked once with the expected reason or run; valid tasks complete."""
    rig.require_inputs = MIN_INPUTS
    with collected_on_failure(rig):
        await rig.run_batch(batch)


# Inputs the consumer cannot handle today (bugs; the fuzz strategies leave them out) ---------------


async def _send_and_watch(rig: Rig, sample: Sample, timeout: float = 5.0) -> str:  # noqa: ASYNC109 - a polling deadline
    """Publish one sample; wait until it ended somewhere, or the consumer lost its connection."""
    key = await rig.publish(sample)
    deadline = time.monotonic() + timeout
    while not rig.outcomes.get(key) and time.monotonic() < deadline:
        if rig.errors.records or any(c.reconnects for c in rig.consumers.values()):
            break
        await asyncio.sleep(0.02)
    return key


def _assert_parked_once_quietly(rig: Rig, key: str, reasons: set[str]) -> None:
    rig.check_alive()
    assert rig.outcomes.get(key, []) in [[r] for r in reasons], (
        f"ended as {rig.outcomes.get(key)}, expected one of {sorted(reasons)}"
    )


FOREIGN_WIRE_CASES = [
    pytest.param(
        _c(NOT_JSON, headers={HEADER_ATTEMPT: 1, "ratio": Raw(b"d" + struct.pack(">d", 1e300))}),
        {ParkReason.UNDECODABLE},
        id="header_double_beyond_float32_range",
    ),
    pytest.param(
        _c(NOT_JSON, headers={HEADER_ATTEMPT: 1, "name": Raw(b"S\x00\x00\x00\x02\xff\xfe")}),
        {ParkReason.UNDECODABLE},
        id="header_longstr_not_utf8",
    ),
    pytest.param(
        _c(NOT_JSON, headers={HEADER_ATTEMPT: 1, b"\xff\xfe": 1}),
        {ParkReason.BAD_ENVELOPE},  # the headers cannot be read at all
        id="header_key_not_utf8",
    ),
    pytest.param(
        _c(message_id=Raw(b"\x02\xff\xfe")),
        {ParkReason.BAD_ENVELOPE},
        id="message_id_not_utf8",
    ),
    pytest.param(
        _c(properties={"timestamp": Raw(struct.pack(">Q", 2**63))}),
        {COMPLETED},
        id="timestamp_beyond_year_9999",
    ),
]


@pytest.mark.parametrize(("sample", "reasons"), FOREIGN_WIRE_CASES)
async def test_message_from_another_client_is_parked_without_a_reconnect(rig, sample, reasons):
    """Field values other AMQP clients send end parked (or run) and the consumer stays connected."""
    with collected_on_failure():
        key = await _send_and_watch(rig, sample)
        _assert_parked_once_quietly(rig, key, {str(r) for r in reasons})


async def test_task_whose_headers_nearly_fill_a_frame_is_parked(rig):
    """A message whose header table is just under frame_max is parked; the consumer stays up."""
    frame_max = rig.connection.transport.connection.connection_tune.frame_max
    empty = WireProperties({"headers": {HEADER_ATTEMPT: 1, "fuzz-pad": ""}}, "x").marshal()
    # frame payload limit = frame_max - 8; a content header is 12 bytes plus the properties.
    pad = frame_max - 8 - 12 - len(empty) - 150
    sample = _c(NOT_JSON, headers={HEADER_ATTEMPT: 1, "fuzz-pad": "x" * pad})
    with collected_on_failure():
        key = await _send_and_watch(rig, sample)
        _assert_parked_once_quietly(rig, key, {ParkReason.UNDECODABLE})


class Fragile(BaseModel):
    n: int

    @field_validator("n")
    @classmethod
    def _per_n(cls, value: int) -> int:
        return 100 // value  # a validator bug: ZeroDivisionError, not ValueError, for n=0


async def fragile(payload: Fragile) -> None:
    """A handler whose payload model has a buggy validator."""


async def test_payload_whose_validator_raises_is_parked_not_retried_by_reconnecting(rig):
    """A body that makes the payload model raise a non-ValueError is parked as invalid_payload."""
    rig.apps[CLASSIC].task("classic.fragile", workload=CLASSIC)(fragile)
    with collected_on_failure():
        key = await _send_and_watch(rig, _c(b'{"n": 0}', task="classic.fragile"))
        _assert_parked_once_quietly(rig, key, {ParkReason.INVALID_PAYLOAD})


async def test_message_expired_in_the_work_queue_is_parked_with_a_reason(rig):
    """A task whose AMQP expiration runs out before any consumer takes it is parked as expired:
    the broker dead-letters it with `x-death` only, and the parking lot reads the reason there."""
    sample = Sample(workload=IDLE, body=OK_BODY, task="idle.echo", properties={"expiration": "1"})
    with collected_on_failure():
        key = await _send_and_watch(rig, sample)
        assert rig.outcomes.get(key) == [ParkReason.EXPIRED]


def test_explicit_batch_expectations_cover_every_reason_the_input_can_cause():
    """The explicit batch reaches every park reason a message's own content can cause."""
    reached = set().union(*(expected_outcomes(s, time.time()) for s in EXPLICIT_BATCH))
    # not_retryable comes from a task's own rules, not from what a message carries
    # (tests/broker/test_task_rules.py covers it)
    from_content = PARK_REASONS - {ParkReason.UNROUTABLE_RETRY, ParkReason.NOT_RETRYABLE}
    assert reached == from_content | {COMPLETED}
