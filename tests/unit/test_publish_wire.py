"""The batch publisher's own encoder writes exactly the bytes aiormq's `basic_publish` writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from aiormq.abc import ChannelFrame
from aiormq.channel import Channel
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from rabbitq._wire import Outgoing, frames

DEFAULT_MAX_BODY = 131_072 - 8  # frame_max minus a body frame's overhead


def reference(out: Outgoing, channel_number: int, max_body: int) -> bytes:
    """What aiormq 7's `Channel.basic_publish(mandatory=True)` puts on the write queue."""
    frames: list[Any] = [
        Basic.Publish(exchange=out.exchange, routing_key=out.routing_key, mandatory=True),
        ContentHeader(properties=out.amqp_properties(), body_size=len(out.body)),
    ]
    frames += Channel._split_body(SimpleNamespace(max_content_size=max_body), out.body)  # type: ignore[arg-type]
    return ChannelFrame.marshall(channel_number, frames).payload


def ours(out: Outgoing, channel_number: int, max_body: int) -> bytes:
    return frames(out, channel_number, max_body, {})


short_text = st.text(max_size=60)
header_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    short_text,
    st.none(),
    st.lists(st.integers(min_value=0, max_value=1000), max_size=3),
)
timestamps = st.one_of(
    st.none(),
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)),
    st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
    st.just(datetime(2026, 11, 28, 12, 0, tzinfo=timezone(timedelta(hours=5)))),
)
outgoing = st.builds(
    Outgoing,
    exchange=st.from_regex(r"[a-zA-Z0-9_.:-]{0,40}", fullmatch=True),
    routing_key=short_text,
    body=st.one_of(st.binary(max_size=300), st.integers(0, 3).map(lambda n: b"b" * (n * 50_000))),
    message_id=short_text,
    headers=st.one_of(st.none(), st.dictionaries(short_text, header_values, max_size=4)),
    task=st.one_of(st.none(), short_text),
    priority=st.one_of(st.none(), st.integers(min_value=0, max_value=255)),
    timestamp=timestamps,
    content_type=st.one_of(st.none(), st.just("application/json"), short_text),
    properties=st.one_of(
        st.none(),
        st.just({}),
        st.fixed_dictionaries({"correlation_id": short_text, "app_id": short_text}),
        st.fixed_dictionaries({"expiration": st.just("60000"), "reply_to": short_text}),
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    out=outgoing,
    channel_number=st.integers(min_value=1, max_value=65535),
    max_body=st.sampled_from([DEFAULT_MAX_BODY, 100, 7]),
)
def test_marshal_writes_what_basic_publish_writes(
    out: Outgoing, channel_number: int, max_body: int
) -> None:
    """Any message, any channel, any frame size: the same bytes, in the same frames."""
    assert ours(out, channel_number, max_body) == reference(out, channel_number, max_body)


def test_a_task_message_as_task_message_builds_it() -> None:
    """The common case, spelled out: rabbitq's own properties and headers."""
    out = Outgoing(
        exchange="ns.tasks",
        routing_key="emails",
        body=b'{"to":"a@b.c"}',
        message_id="0123456789abcdef0123456789abcdef",
        headers={"rabbitq-attempt": 1, "rabbitq-published-at": 1_795_000_000_000},
        task="emails.send",
        priority=None,
        timestamp=datetime.now(UTC),
    )
    assert ours(out, 1, DEFAULT_MAX_BODY) == reference(out, 1, DEFAULT_MAX_BODY)


@pytest.mark.parametrize("field", ["message_id", "task", "content_type"])
def test_a_short_string_over_255_bytes_is_refused_like_pamqp_does(field: str) -> None:
    base = Outgoing(exchange="x", routing_key="k", body=b"{}", message_id="m", headers={})
    too_long = Outgoing(**{**{f: getattr(base, f) for f in base.__slots__}, field: "é" * 128})
    with pytest.raises(TypeError):
        reference(too_long, 1, DEFAULT_MAX_BODY)
    with pytest.raises(TypeError):
        ours(too_long, 1, DEFAULT_MAX_BODY)


def test_an_exchange_name_amqp_does_not_allow_is_refused_like_pamqp_does() -> None:
    bad = Outgoing(exchange="a;b", routing_key="k", body=b"{}", message_id="m", headers={})
    with pytest.raises(ValueError):
        reference(bad, 1, DEFAULT_MAX_BODY)
    with pytest.raises(ValueError):
        ours(bad, 1, DEFAULT_MAX_BODY)
