"""The consuming connection: AMQP 0-9-1 spoken directly, for the path every task takes.

A consumer's connection only receives deliveries and sends acks. aiormq reads each frame with
a lock and three reads, decodes it through pamqp's generic tables, queues it per channel and
reads it back: most of what a no-op task costs (docs/performance.md, "What the consumer
waited on"). Here one protocol object cuts frames out of whatever the socket gave, decodes a
delivery's three frames with `struct`, and writes an ack or nack as one 21-byte frame, in
order, at once. The rare rest (handshake, channel and consumer set-up, close, heartbeats)
goes through pamqp's marshalling. Declaring, checking and publishing stay on aio-pika.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import pamqp.frame
from pamqp import commands as spec
from pamqp.base import Frame
from pamqp.decode import field_table

CHANNEL = 1
FRAME_MAX = 131072  # what we accept in Tune (the broker's own default)
CLOSE_SECONDS = OPEN_SECONDS = 5.0
FRAME_END = 0xCE
_HEAD = struct.Struct(">BHI")
_DELIVER = (60 << 16) | 60  # Basic.Deliver: class 60, method 60
_U32, _U64 = struct.Struct(">I"), struct.Struct(">Q")
_CONTENT = struct.Struct(">HHQH")  # class, weight, body size, property flags
_SETTLE = struct.Struct(">BHIHHQBB")  # a whole Basic.Ack / Basic.Nack frame
_HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"


class Properties:
    """A delivery's AMQP properties, by pamqp's names (what `_wire` and `_settle` read)."""

    __slots__ = (
        "content_type",
        "content_encoding",
        "headers",
        "delivery_mode",
        "priority",
        "correlation_id",
        "reply_to",
        "expiration",
        "message_id",
        "timestamp_s",
        "message_type",
        "user_id",
        "app_id",
        "cluster_id",
        "broken",
    )

    def __init__(self) -> None:
        self.content_type = self.content_encoding = self.correlation_id = None
        self.reply_to = self.expiration = self.message_id = self.message_type = None
        self.user_id = self.app_id = self.cluster_id = None
        self.headers: dict[str, Any] | None = None
        self.delivery_mode = self.priority = self.timestamp_s = None
        self.broken: str | None = None  # why the properties could not be read, if they could not

    @property
    def timestamp(self) -> datetime | None:
        """As a datetime (what a copy carries on); None if unset or past what one can hold."""
        if self.timestamp_s is None:
            return None
        try:
            return datetime.fromtimestamp(self.timestamp_s, tz=UTC)
        except (OverflowError, ValueError, OSError):
            return None


# (flag bit, attribute, kind): the order and encoding AMQP 0-9-1 gives Basic's properties
_FIELDS = [
    (15, "content_type", "s"),
    (14, "content_encoding", "s"),
    (13, "headers", "t"),
    (12, "delivery_mode", "b"),
    (11, "priority", "b"),
    (10, "correlation_id", "s"),
    (9, "reply_to", "s"),
    (8, "expiration", "s"),
    (7, "message_id", "s"),
    (6, "timestamp_s", "q"),
    (5, "message_type", "s"),
    (4, "user_id", "s"),
    (3, "app_id", "s"),
    (2, "cluster_id", "s"),
]


def properties(buf: bytes | bytearray, at: int, flags: int) -> Properties:
    """Decode the property list that starts at `at`; what cannot be decoded is `broken`."""
    props = Properties()
    try:
        for bit, name, kind in _FIELDS:
            if not flags & (1 << bit):
                continue
            if kind == "s":
                size = buf[at]
                raw = bytes(buf[at + 1 : at + 1 + size])
                at += 1 + size
                try:
                    value: Any = raw.decode()
                except UnicodeDecodeError:  # kept readable; the task is parked, not lost
                    value, props.broken = raw.decode(errors="replace"), f"{name} is not UTF-8"
            elif kind == "b":
                value, at = buf[at], at + 1
            elif kind == "q":
                value, at = _U64.unpack_from(buf, at)[0], at + 8
                if value > 0xFFFFFFFF:  # milliseconds, as pamqp reads them
                    value /= 1000
            else:
                size = _U32.unpack_from(buf, at)[0]
                try:
                    value = field_table(bytes(buf[at : at + 4 + size]))[1]
                except Exception as exc:  # skipped whole: the properties after it still count
                    value, props.broken = None, f"its headers cannot be decoded ({exc})"
                at += 4 + size
            setattr(props, name, value)
    except Exception as exc:  # any malformed field: the delivery is parked with the reason
        props.broken = f"its AMQP properties could not be decoded ({type(exc).__name__})"
    return props


class Delivery:
    """One message delivered on the consuming channel."""

    __slots__ = ("tag", "redelivered", "exchange", "routing_key", "properties", "body")

    def __init__(self, tag: int, redelivered: bool, exchange: str, routing_key: str) -> None:
        self.tag, self.redelivered = tag, redelivered
        self.exchange, self.routing_key = exchange, routing_key
        self.properties = Properties()
        self.body = b""


class ClosedByBroker(ConnectionError):
    """The broker closed the connection or the channel, or cancelled the consumer."""


class ConsumeConnection(asyncio.Protocol):
    """One connection with one channel consuming one queue; `open_consumer` makes one."""

    def __init__(self, on_delivery: Callable[[Delivery], None], on_lost: Callable[[str], None]):
        self.on_delivery = on_delivery
        self.on_lost = on_lost
        self.is_closed = False
        self.consumer_tag = ""
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[Any] | None = None
        self._reading: Delivery | None = None  # the delivery whose content frames come next
        self._left = 0  # body bytes still to come for it
        self._parts: list[bytes] = []
        self._heartbeat = 0
        self._prefetch = 0
        self._seen = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        at, end = 0, len(buf)
        while end - at >= 8:
            kind, channel, size = _HEAD.unpack_from(buf, at)
            if size > FRAME_MAX:  # never negotiated: the stream is not AMQP any more
                self._lose("the broker sent a frame over frame_max", abort=True)
                return
            stop = at + 7 + size
            if stop >= end:
                break
            if buf[stop] != FRAME_END:
                self._lose("the broker sent a malformed frame", abort=True)
                return
            if kind == 3:
                self._body(bytes(buf[at + 7 : stop]))
            elif kind == 2:
                self._header(buf, at + 7)
            elif kind == 1:
                if channel == CHANNEL and _U32.unpack_from(buf, at + 7)[0] == _DELIVER:
                    self._deliver(buf, at + 11)
                else:
                    self._method(bytes(buf[at : stop + 1]))
            at = stop + 1
        del buf[:at]
        self._seen = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(f"connection lost: {exc or 'closed'}")

    # frames ------------------------------------------------------------------------------------

    def _deliver(self, buf: bytearray, at: int) -> None:
        at += 1 + buf[at]  # consumer tag: one consumer per connection
        tag = _U64.unpack_from(buf, at)[0]
        redelivered = bool(buf[at + 8])
        at += 9
        exchange = bytes(buf[at + 1 : at + 1 + buf[at]]).decode(errors="replace")
        at += 1 + buf[at]
        key = bytes(buf[at + 1 : at + 1 + buf[at]]).decode(errors="replace")
        self._reading = Delivery(tag, redelivered, exchange, key)

    def _header(self, buf: bytearray, at: int) -> None:
        delivery = self._reading
        if delivery is None:
            return  # content of a Basic.Return or Get: never asked for here
        _, _, size, flags = _CONTENT.unpack_from(buf, at)
        delivery.properties = properties(buf, at + 14, flags)
        if size:
            self._left, self._parts = size, []
        else:
            self._complete()

    def _body(self, chunk: bytes) -> None:
        if self._reading is None:
            return
        self._parts.append(chunk)
        self._left -= len(chunk)
        if self._left <= 0:
            self._complete()

    def _complete(self) -> None:
        delivery, self._reading = self._reading, None
        assert delivery is not None
        parts, self._parts = self._parts, []
        delivery.body = parts[0] if len(parts) == 1 else b"".join(parts)
        self.on_delivery(delivery)

    def _method(self, raw: bytes) -> None:
        try:
            _, channel, frame = pamqp.frame.unmarshal(raw)
        except Exception as exc:
            self._lose(f"the broker sent a frame that cannot be read ({exc})", abort=True)
            return
        if isinstance(frame, spec.Connection.Close):
            self._send(0, spec.Connection.CloseOk())
            self._lose(f"the broker closed the connection: {frame.reply_code} {frame.reply_text}")
        elif isinstance(frame, spec.Channel.Close):
            self._send(channel, spec.Channel.CloseOk())
            self._lose(f"the broker closed the channel: {frame.reply_code} {frame.reply_text}")
        elif isinstance(frame, spec.Basic.Cancel):
            self._lose("the broker cancelled the consumer (was the queue deleted?)")
        elif isinstance(frame, spec.Channel.Flow):
            self._send(channel, spec.Channel.FlowOk(active=frame.active))
        elif isinstance(frame, spec.Connection.Blocked | spec.Connection.Unblocked):
            pass  # they concern publishers; a consumer's acks still flow
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(frame)

    # writing -----------------------------------------------------------------------------------

    def _send(self, channel: int, frame: Frame) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(pamqp.frame.marshal(frame, channel))

    def ack(self, tag: int, multiple: bool = False) -> bool:
        """Write a Basic.Ack now; False if the connection is gone (the broker requeues)."""
        return self._write(_SETTLE.pack(1, CHANNEL, 13, 60, 80, tag, multiple, FRAME_END))

    def nack(self, tag: int) -> bool:
        """Write a Basic.Nack with requeue now; False if the connection is gone."""
        return self._write(_SETTLE.pack(1, CHANNEL, 13, 60, 120, tag, 2, FRAME_END))

    def _write(self, data: bytes) -> bool:
        transport = self._transport
        if self.is_closed or transport is None or transport.is_closing():
            return False
        transport.write(data)
        return True

    async def _call(self, channel: int, frame: Frame, reply: type[Frame]) -> Any:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._send(channel, frame)
        got = await waiter
        if not isinstance(got, reply):
            raise ClosedByBroker(f"expected {reply.__name__}, got {got.name}")
        return got

    # life --------------------------------------------------------------------------------------

    async def _open(
        self, url: str, name: str, queue: str, prefetch: int, exclusive: bool = False
    ) -> None:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self._write(b"AMQP\x00\x00\x09\x01")
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        start = await self._waiter
        if not isinstance(start, spec.Connection.Start):
            raise ClosedByBroker(f"expected Connection.Start, got {start.name}")
        user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
        properties_: dict[str, Any] = {
            "connection_name": name,
            "product": "rabbitq",
            "capabilities": {
                "consumer_cancel_notify": True,
                "connection.blocked": True,
                "authentication_failure_close": True,
                "basic.nack": True,
            },
        }
        login = spec.Connection.StartOk(
            client_properties=properties_, mechanism="PLAIN", response=f"\0{user}\0{password}"
        )
        tune = await self._call(0, login, spec.Connection.Tune)
        wanted = int(query.get("heartbeat", 60))
        heartbeat = min(wanted, tune.heartbeat) if wanted and tune.heartbeat else 0
        frame_max = min(tune.frame_max or FRAME_MAX, FRAME_MAX)
        self._send(0, spec.Connection.TuneOk(tune.channel_max, frame_max, heartbeat))
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        await self._call(0, spec.Connection.Open(virtual_host=vhost), spec.Connection.OpenOk)
        self._heartbeat, self._seen = heartbeat, time.monotonic()
        if heartbeat:
            self._timer = loop.call_later(heartbeat / 2, self._beat)
        await self._call(CHANNEL, spec.Channel.Open(), spec.Channel.OpenOk)
        self._prefetch = prefetch
        await self._call(CHANNEL, spec.Basic.Qos(prefetch_count=prefetch), spec.Basic.QosOk)
        ok = await self._call(
            CHANNEL, spec.Basic.Consume(queue=queue, exclusive=exclusive), spec.Basic.ConsumeOk
        )
        self.consumer_tag = ok.consumer_tag

    def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        if time.monotonic() - self._seen > 2 * self._heartbeat:
            self._lose("missed the broker's heartbeats", abort=True)
            return
        self._write(_HEARTBEAT)
        self._timer = loop.call_later(self._heartbeat / 2, self._beat)

    async def round_trip(self) -> None:
        """Return once the broker answered a no-op on the channel: every delivery it had
        sent the channel before that has arrived (they come first, in order)."""
        qos = spec.Basic.Qos(prefetch_count=self._prefetch)
        await asyncio.wait_for(self._call(CHANNEL, qos, spec.Basic.QosOk), CLOSE_SECONDS)

    async def cancel(self) -> None:
        """Stop deliveries (those already on the way still arrive)."""
        if not self.is_closed:
            cancel = spec.Basic.Cancel(consumer_tag=self.consumer_tag)
            await asyncio.wait_for(self._call(CHANNEL, cancel, spec.Basic.CancelOk), CLOSE_SECONDS)

    async def close(self) -> None:
        """Close gracefully: every ack written so far goes out before the Close."""
        if self.is_closed or self._transport is None:
            return
        try:
            close = spec.Connection.Close(200, "bye", 0, 0)
            await asyncio.wait_for(self._call(0, close, spec.Connection.CloseOk), CLOSE_SECONDS)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._lose("closed by us")

    def _lose(self, reason: str, abort: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ClosedByBroker(reason))
            self._waiter.exception()  # retrieved: nobody may be waiting
        if self.is_closed:
            return
        self.is_closed = True
        if self._transport is not None:
            (self._transport.abort if abort else self._transport.close)()
        self.on_lost(reason)


async def open_consumer(
    connection: ConsumeConnection,
    url: str,
    name: str,
    queue: str,
    prefetch: int,
    exclusive: bool = False,
    context: ssl.SSLContext | None = None,
) -> None:
    """Connect, log in, open the channel, set the prefetch and start consuming `queue` (as its
    only consumer if `exclusive`: the broker refuses it, 403, while another consumes).
    Deliveries may reach `connection.on_delivery` before this returns. An `amqps://` URL
    uses `context` (rabbitq/_connection.py `tls_for` makes it from the URL), else the
    system's CAs.

    Raises:
        OSError, TimeoutError or ClosedByBroker (with the broker's reply text).
    """
    parts = urlsplit(url)
    tls = parts.scheme == "amqps"
    if tls and context is None:
        context = ssl.create_default_context()
    loop = asyncio.get_running_loop()
    host, port = parts.hostname or "localhost", parts.port or (5671 if tls else 5672)
    async with asyncio.timeout(OPEN_SECONDS):
        await loop.create_connection(lambda: connection, host, port, ssl=context if tls else None)
        try:  # (asyncio and uvloop both set TCP_NODELAY on TCP transports)
            await connection._open(url, name, queue, prefetch, exclusive)
        except BaseException:
            connection._lose("could not open", abort=True)
            raise
