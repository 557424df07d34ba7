"""The consuming connection's frame reading, against pamqp's reading of the same frames.

Whatever pamqp (and so every aio-pika publisher) encodes, `_amqp` must read as pamqp (and so
aiormq) reads it; a
property list it cannot read is reported as `broken` (the delivery is then parked), never
raised into the connection.
"""

from __future__ import annotations

import struct
import time
from datetime import UTC, datetime
from typing import Any

import pamqp.frame
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from rabbitq._amqp import ConsumeConnection, Delivery, properties

NAMES = (
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "message_type",
    "user_id",
    "app_id",
    "cluster_id",
)
short = st.text(max_size=40)
values = st.one_of(st.integers(-(2**63), 2**63 - 1), st.booleans(), short, st.none())
amqp_properties = st.fixed_dictionaries(
    {},
    optional={
        "content_type": short,
        "content_encoding": short,
        "headers": st.dictionaries(short, values, max_size=4),
        "delivery_mode": st.integers(1, 2),
        "priority": st.integers(0, 255),
        "correlation_id": short,
        "reply_to": short,
        "expiration": st.integers(0, 10**6).map(str),
        "message_id": short,
        "timestamp": st.datetimes(
            min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
        ).map(lambda d: d.replace(microsecond=0)),
        "message_type": short,
        "user_id": short,
        "app_id": short,
    },
)


def frames(tag: int, redelivered: bool, body: bytes, props: spec.Basic.Properties) -> bytes:
    deliver = spec.Basic.Deliver("ctag", tag, redelivered, "ex", "key")
    out = pamqp.frame.marshal(deliver, 1)
    out += pamqp.frame.marshal(ContentHeader(0, len(body), props), 1)
    for start in range(0, len(body), 1000):  # a body split over several frames
        out += pamqp.frame.marshal(ContentBody(body[start : start + 1000]), 1)
    return out


def read(data: bytes, chunk: int) -> list[Delivery]:
    got: list[Delivery] = []
    connection = ConsumeConnection(got.append, lambda _reason: None)
    for start in range(0, len(data), chunk):  # however the socket splits it
        connection._buf += data[start : start + chunk]
        connection.data_received(b"")
    return got


@settings(max_examples=200, deadline=None)
@given(
    props=amqp_properties,
    body=st.binary(max_size=3000),
    tag=st.integers(1, 2**63 - 1),
    redelivered=st.booleans(),
    chunk=st.sampled_from([1, 7, 100, 65536]),
)
def test_a_delivery_reads_back_as_pamqp_wrote_it(
    props: dict[str, Any], body: bytes, tag: int, redelivered: bool, chunk: int
) -> None:
    header = pamqp.frame.marshal(ContentHeader(0, len(body), spec.Basic.Properties(**props)), 1)
    read_back = pamqp.frame.unmarshal(header)[2]  # as aiormq would have read them
    assert isinstance(read_back, ContentHeader)
    encoded = read_back.properties
    [delivery] = read(frames(tag, redelivered, body, spec.Basic.Properties(**props)), chunk)
    assert (delivery.tag, delivery.redelivered, delivery.body) == (tag, redelivered, body)
    assert (delivery.exchange, delivery.routing_key) == ("ex", "key")
    got = delivery.properties
    assert got.broken is None
    for name in NAMES:
        mine = getattr(got, name)
        if name == "cluster_id":  # pamqp reads an absent one as ""; nothing reads it
            mine = mine or ""
        assert mine == getattr(encoded, name), name
    assert got.timestamp == encoded.timestamp


def test_many_deliveries_in_one_chunk_each_arrive_in_order() -> None:
    data = b"".join(frames(n, False, b"%d" % n, spec.Basic.Properties()) for n in range(1, 50))
    assert [d.tag for d in read(data, 65536)] == list(range(1, 50))


def test_an_unreadable_header_table_is_broken_not_raised() -> None:
    # a table whose length runs past the frame: pamqp cannot decode it
    raw = bytes([0x00, 0x00, 0x00, 0x10]) + b"\x01abc"
    props = properties(raw, 0, 1 << 13)
    assert props.broken is not None and "cannot be decoded" in props.broken
    assert props.headers is None


def test_a_malformed_frame_end_loses_the_connection() -> None:
    lost: list[str] = []
    connection = ConsumeConnection(lambda _d: None, lost.append)
    bad = bytearray(pamqp.frame.marshal(spec.Basic.Deliver("c", 1, False, "e", "k"), 1))
    bad[-1] = 0
    connection.data_received(bytes(bad))
    assert lost == ["the broker sent a malformed frame"]


def test_a_timestamp_past_what_a_datetime_holds_reads_as_none_not_an_error() -> None:
    props = properties(struct.pack(">Q", 2**62), 0, 1 << 6)
    assert props.broken is None and props.timestamp_s == 2**62 / 1000
    assert props.timestamp is None


class Transport:
    """What the protocol writes to, and whether it was aborted."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    close = abort


async def test_a_broker_silent_for_two_heartbeats_loses_the_connection() -> None:
    lost: list[str] = []
    connection = ConsumeConnection(lambda _d: None, lost.append)
    transport = Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection._heartbeat = 1
    connection._seen = time.monotonic()
    connection._beat()  # heard from lately: a heartbeat goes out
    assert transport.written == [b"\x08\x00\x00\x00\x00\x00\x00\xce"] and not lost
    connection._seen = time.monotonic() - 2.5
    connection._beat()
    assert lost == ["missed the broker's heartbeats"] and transport.aborted
