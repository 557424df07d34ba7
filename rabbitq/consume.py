"""The consumer of one workload: take a delivery, run its handler, settle its outcome, then ack.

Delivery guarantee: at-least-once. A delivery is acked only once its outcome is safe:

* the handler returned: ack;
* it raised with attempts left: a copy goes to the retry tier and the ack follows the broker's
  confirm of that copy, never the other way round;
* retrying is over, or the message is poison (too big, not a task, bad payload, unknown task,
  expired): a copy goes to the parking lot with the reason, and the ack follows its confirm.

If the copy cannot be confirmed the delivery is returned to the queue (nack with requeue) and
the consumer reconnects, so it is never lost; it may run again (a duplicate). A delivery whose
channel died is never acked later: its ack goes only to the channel it came on, which raises
once closed, and the broker has requeued it. Handlers of a lost connection are cancelled, so a
redelivered copy does not run beside its original (sync handlers in threads finish on their own).

The consumer never declares; it checks that its queues exist and stops if not.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiormq
import pamqp.encode
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage

from rabbitq.ack import Acker
from rabbitq.app import App
from rabbitq.connection import connect
from rabbitq.declare import check_exists
from rabbitq.envelope import (
    Envelope,
    ParkReason,
    Poison,
    decode,
    error_text,
    keep_own_headers,
    park_headers,
    recount_headers,
    retry_headers,
    sanitize_header_value,
)
from rabbitq.errors import ConfigError, ConnectionFailed, PublishError, Unroutable
from rabbitq.handlers import TaskContext, TaskDef
from rabbitq.publish import Outgoing, Publisher
from rabbitq.retry import ParkNow, Recount, RetryIn, crash_guard, decide
from rabbitq.topology import Workload

logger = logging.getLogger(__name__)

RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 10.0
BURST_POLL_SECONDS = 0.2
LOOP_WATCH_SECONDS = 0.25
# The whole header table travels in one frame (frame_max is 128 KiB by default): what came in
# fitted, but a parked copy adds up to ~5 KiB of its own headers.
MAX_HEADER_BYTES = 120 * 1024
# A blocked loop sends no heartbeats; the broker drops the connection after about two missed
# intervals. Long before that, a pause this long is worth a warning.
LOOP_BLOCKED_SECONDS = 1.0
TRACEBACK_LINES = 12
# Properties a forwarded copy keeps from the original. `expiration` is dropped (it would
# shorten a tier's delay or expire a parked task) and so is `user_id` (the broker rejects a
# user_id that is not the publishing connection's user).
_KEPT_PROPERTIES = ("content_encoding", "correlation_id", "reply_to", "app_id")


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


class SessionLost(Exception):
    """The connection or channel went away; reconnect."""


class Consumer:
    """Runs the handlers of one workload until stopped.

    Args:
        app: the tasks; its publisher is bound to this consumer's publishing connection.
        workload: the workload, derived from the topology.
        url: the broker (credentials are never logged).
        grace_seconds: on stop, how long running handlers may take to finish; the rest are
            returned to the queue.
        burst: stop by itself once the work queue and its tiers are empty and nothing runs.
    """

    def __init__(
        self,
        app: App,
        workload: Workload,
        url: str,
        *,
        grace_seconds: float = 30.0,
        burst: bool = False,
    ) -> None:
        if app.namespace is None:
            app.namespace = workload.namespace
        elif app.namespace != workload.namespace:
            raise ConfigError(
                f"the app publishes to namespace {app.namespace!r} but the topology's is "
                f"{workload.namespace!r}; use one namespace"
            )
        self.app = app
        self.workload = workload
        self.url = url
        self.grace_seconds = grace_seconds
        self.burst = burst
        self.host = socket.gethostname()
        self.counts: Counter[str] = Counter()
        self.reconnects = 0
        self.loop_blocked_seconds = 0.0
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._established = False
        self._established_at = 0.0
        self._running: set[asyncio.Task[Any]] = set()
        self._acker: Acker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=workload.capacity, thread_name_prefix=f"rabbitq-{workload.name}"
        )
        self.publisher = Publisher(url, name=f"consumer-publisher {workload.name}")

    @property
    def running(self) -> int:
        """Handlers running now."""
        return len(self._running)

    def stop(self) -> None:
        """Stop taking deliveries; running handlers get `grace_seconds` to finish."""
        self._stop.set()

    async def run(self) -> None:
        """Consume until `stop()` (or, in burst mode, until drained); reconnect on loss.

        Raises:
            ConnectionFailed: the broker cannot be reached at start.
            TopologyMissing: a queue or exchange is missing (run `rabbitq topology apply`).
        """
        delay = RECONNECT_MIN_SECONDS
        watchdog = asyncio.create_task(self._watch_loop())
        try:
            while not self._stop.is_set():
                try:
                    if await self._session():
                        return
                except (ConnectionFailed, SessionLost) as exc:
                    if not self._established and isinstance(exc, ConnectionFailed):
                        raise
                    if self._established_at and time.monotonic() - self._established_at > 30:
                        delay = RECONNECT_MIN_SECONDS
                    self.reconnects += 1
                    logger.warning(
                        "workload %s: connection lost (%s); reconnecting in %.1fs",
                        self.workload.name, exc, delay,
                    )
                    try:
                        await asyncio.wait_for(self._stop.wait(), delay)
                    except TimeoutError:
                        pass
                    delay = min(delay * 2, RECONNECT_MAX_SECONDS)
        finally:
            watchdog.cancel()
            self.ready.clear()
            self.app.unbind_publisher(self.publisher)
            await self.publisher.close()
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _watch_loop(self) -> None:
        """Say so when something blocks the event loop (an async handler doing blocking work)."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LOOP_WATCH_SECONDS)
            blocked = loop.time() - before - LOOP_WATCH_SECONDS
            if blocked >= LOOP_BLOCKED_SECONDS:
                self.counts["loop_blocked"] += 1
                self.loop_blocked_seconds += blocked
                logger.warning(
                    "workload %s: the event loop was blocked for %.1fs, so no heartbeat or ack "
                    "went out; an async handler is running blocking code (declare it as a "
                    "plain def: sync handlers run in threads). If this outlasts the heartbeat "
                    "timeout the broker drops the connection and every running task is "
                    "redelivered", self.workload.name, blocked,
                )

    def _lose(self, reason: str) -> None:
        if not self._lost.is_set():
            self._lost_reason = reason
            self._lost.set()

    async def _session(self) -> bool:
        """One connection's life. True when done for good (stopped or drained)."""
        try:
            return await self._connected_session()
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
            # aio-pika reports a connection that died under a call as one of these
            raise SessionLost(f"{type(exc).__name__}: {exc}") from None

    async def _connected_session(self) -> bool:
        self._lost.clear()
        self._loop = asyncio.get_running_loop()
        connection = await connect(self.url, f"consumer {self.workload.name}")
        # The URL works: from now on an unreachable broker is an outage to wait out, not a
        # mistake to report by exiting.
        self._established = True
        connection.close_callbacks.add(
            lambda _c, exc=None: self._lose(f"connection closed: {exc or 'by us'}")
        )
        try:
            await check_exists(connection, self.workload)
            channel = await connection.channel(publisher_confirms=False)
            channel.close_callbacks.add(
                lambda _c, exc=None: self._lose(f"channel closed: {exc or 'by us'}")
            )
            # Prefetch is the capacity: every delivery runs at once, none waits in a buffer
            # where it would age toward consumer_timeout or jump ahead of a higher priority.
            await channel.set_qos(prefetch_count=self.workload.capacity)
            await self.publisher.start()
            await self.app.bind_publisher(self.publisher)
            underlay = await channel.get_underlay_channel()
            self._acker = Acker(underlay, self.workload.capacity)
            consume_ok = await underlay.basic_consume(
                self.workload.work_queue, self._on_delivery, no_ack=False
            )
            logger.info(
                "workload %s: consuming %s with capacity %d (tiers: %s)",
                self.workload.name, self.workload.work_queue, self.workload.capacity,
                ", ".join(t.label for t in self.workload.tiers) or "none",
            )
            self.ready.set()
            self._established = True
            self._established_at = time.monotonic()
            done = await self._wait(connection)
            if self._lost.is_set() and not done:
                raise SessionLost(self._lost_reason)
            await self._drain(underlay, consume_ok.consumer_tag or "")
            return True
        finally:
            self.ready.clear()
            if not connection.is_closed:
                await connection.close()

    async def _wait(self, connection: AbstractConnection) -> bool:
        """Until stopped, lost or (burst) drained; True if stopped or drained."""
        waiters: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(self._stop.wait()),
            asyncio.ensure_future(self._lost.wait()),
        ]
        if self.burst:
            waiters.append(asyncio.ensure_future(self._drained(connection)))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return self._stop.is_set() or (self.burst and waiters[2].done()
                                       and not waiters[2].cancelled()
                                       and not self._lost.is_set())

    async def _drained(self, connection: AbstractConnection) -> None:
        """Returns once the work queue and tiers were empty, with nothing running, twice."""
        names = [self.workload.work_queue, *(t.queue for t in self.workload.tiers)]
        channel: AbstractChannel = await connection.channel(publisher_confirms=False)
        empty_checks = 0
        try:
            while empty_checks < 2:
                await asyncio.sleep(BURST_POLL_SECONDS)
                if self._running:
                    empty_checks = 0
                    continue
                counts = [
                    (await channel.declare_queue(n, passive=True)).declaration_result.message_count
                    for n in names
                ]
                empty_checks = empty_checks + 1 if not any(counts) else 0
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _drain(self, channel: aiormq.abc.AbstractChannel, consumer_tag: str) -> None:
        """Stop deliveries, give running handlers the grace period, return the rest."""
        try:
            await channel.basic_cancel(consumer_tag)
        except Exception:  # the channel may be closing already; the broker requeues then
            logger.debug("cancel of consumer %s failed", consumer_tag, exc_info=True)
        if self._running:
            logger.info(
                "workload %s: stopping; waiting up to %gs for %d running tasks",
                self.workload.name, self.grace_seconds, len(self._running),
            )
            _, late = await asyncio.wait(set(self._running), timeout=self.grace_seconds)
            if late:
                logger.warning(
                    "workload %s: %d tasks did not finish within %gs; returning them to the "
                    "queue", self.workload.name, len(late), self.grace_seconds,
                )
                for task in late:
                    task.cancel()
                await asyncio.wait(late, timeout=5)
        if self._acker is not None:
            # Acks still batched must reach the broker before the connection closes, or
            # finished tasks would be redelivered.
            await self._acker.settled()

    # One delivery ----------------------------------------------------------------------------

    async def _on_delivery(self, message: DeliveredMessage) -> None:
        # passing the loop skips a get_running_loop() per delivery (Python 3.11)
        task = asyncio.current_task(self._loop)
        assert task is not None
        self._running.add(task)
        acker = self._acker
        if acker is not None and acker.channel is message.channel:
            acker.delivered()
        try:
            await self._handle(message)
        except asyncio.CancelledError:
            # Stopping after the grace period, or the channel died: give the delivery back if
            # its channel still lives; otherwise the broker already requeued it.
            await self._settle(message, requeue=True)
            raise
        except Exception:
            logger.exception("unexpected error handling message; returning it to the queue")
            await self._settle(message, requeue=True)
            self._lose("unexpected error in the consume path")
        finally:
            self._running.discard(task)

    async def _handle(self, message: DeliveredMessage) -> None:
        props = message.header.properties
        envelope: Envelope | None = None
        try:
            envelope = decode(
                body_size=len(message.body),
                task=props.message_type,
                message_id=props.message_id,
                headers=props.headers,
                max_message_bytes=self.workload.spec.max_message_bytes,
            )
            guard = crash_guard(
                bool(getattr(message.delivery, "redelivered", False)),
                envelope.redeliveries,
                envelope.delivery_count,
                self.workload.spec.max_redeliveries,
            )
            if isinstance(guard, ParkNow):
                raise Poison(
                    ParkReason.CRASH_LOOP,
                    f"cut off {self.workload.spec.max_redeliveries} times while running (its "
                    "consumer died or lost its connection); not run again",
                )
            if isinstance(guard, Recount):
                await self._recount(message, guard.redeliveries)
                return
            definition = self.app.tasks.get(envelope.task)
            if definition is None:
                raise Poison(ParkReason.UNKNOWN_TASK, f"no task is registered as {envelope.task!r}")
            if envelope.deadline is not None and time.time() > envelope.deadline:
                raise Poison(ParkReason.EXPIRED, "its deadline passed before it could run")
            payload = definition.parse(message.body)
        except Poison as poison:
            await self._park(
                message, envelope, poison.reason, "Poison", poison.detail, "",
            )
            return
        await self._run(message, envelope, definition, payload)

    async def _run(
        self, message: DeliveredMessage, envelope: Envelope, definition: TaskDef[Any, Any],
        payload: Any,
    ) -> None:
        props = message.header.properties
        delivery = message.delivery
        # built only for handlers that take it: most do not, and it is per-task work
        ctx = (
            TaskContext(
                message_id=envelope.message_id,
                task=envelope.task,
                workload=self.workload.name,
                attempt=envelope.attempt,
                deadline=envelope.deadline,
                redelivered=bool(getattr(delivery, "redelivered", False))
                or envelope.redeliveries > 0
                or bool(envelope.delivery_count),
                priority=props.priority or 0,
            )
            if definition.wants_context
            else None
        )
        started = time.monotonic()
        try:
            await definition.run(payload, ctx, self._executor)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._failed(message, envelope, exc)
            return
        logger.debug(
            "task %s %s attempt %d succeeded in %.3fs",
            envelope.task, envelope.message_id, envelope.attempt, time.monotonic() - started,
        )
        if await self._settle(message):
            self.counts["succeeded"] += 1

    async def _failed(self, message: DeliveredMessage, envelope: Envelope, exc: Exception) -> None:
        now = time.time()
        decision = decide(envelope.attempt, exc, self.workload.spec.retry, now, envelope.deadline)
        if isinstance(decision, ParkNow):
            tb = "".join(traceback.format_exception(exc, limit=-TRACEBACK_LINES))
            await self._park(
                message, envelope, decision.reason, type(exc).__name__, str(exc), tb
            )
            return
        assert isinstance(decision, RetryIn)
        tier = self.workload.tiers[decision.tier_index]
        out = self._copy(
            message, self.workload.retry_exchange, tier.routing_key,
            retry_headers(message.header.properties.headers, envelope, now, exc),
        )
        try:
            await self.publisher.send(out)
        except Unroutable as unroutable:
            await self._park(
                message, envelope, ParkReason.UNROUTABLE_RETRY, type(exc).__name__,
                f"{error_text(exc)}; then the retry copy was unroutable: {unroutable}", "",
            )
            return
        except (PublishError, ConnectionFailed) as error:
            await self._not_forwarded(message, error)
            return
        logger.info(
            "task %s %s attempt %d failed (%s); retrying in %s",
            envelope.task, envelope.message_id, envelope.attempt, error_text(exc), tier.label,
        )
        if await self._settle(message):
            self.counts["retried"] += 1

    async def _park(
        self,
        message: DeliveredMessage,
        envelope: Envelope | None,
        reason: ParkReason,
        error_type: str,
        error_message: str,
        tb: str,
    ) -> None:
        props = message.header.properties
        attempts = envelope.attempt if envelope is not None else 0
        out = self._copy(
            message, self.workload.parking_exchange, self.workload.routing_key,
            park_headers(
                props.headers,
                reason=reason,
                error_type=error_type,
                error_message=error_message,
                traceback=tb,
                attempts=attempts,
                first_failure_ms=envelope.first_failure_ms if envelope else None,
                failed_at=time.time(),
                host=self.host,
                workload=self.workload.name,
            ),
        )
        try:
            await self.publisher.send(out)
        except (PublishError, ConnectionFailed) as error:
            await self._not_forwarded(message, error)
            return
        logger.warning(
            "task %s %s attempt %d parked (%s): %s: %s%s",
            props.message_type, props.message_id, attempts, reason, error_type, error_message,
            f"\n{tb}" if tb else "",
        )
        if await self._settle(message):
            self.counts[f"parked:{reason}"] += 1

    async def _recount(self, message: DeliveredMessage, redeliveries: int) -> None:
        """Requeue a redelivered task with its redelivery count raised, then ack the delivery."""
        out = self._copy(
            message, self.workload.task_exchange, self.workload.routing_key,
            recount_headers(message.header.properties.headers, redeliveries),
        )
        try:
            await self.publisher.send(out)
        except (PublishError, ConnectionFailed) as error:
            await self._not_forwarded(message, error)
            return
        logger.info(
            "task %s %s came back unsettled (redelivery %d of at most %d); requeued",
            message.header.properties.message_type, message.header.properties.message_id,
            redeliveries, self.workload.spec.max_redeliveries - 1,
        )
        if await self._settle(message):
            self.counts["redelivered"] += 1

    async def _not_forwarded(self, message: DeliveredMessage, error: Exception) -> None:
        """The copy was not confirmed: keep the original (requeue) and back off."""
        logger.error(
            "message %s could not be moved (%s); returning it to the queue and reconnecting",
            message.header.properties.message_id, error,
        )
        await self._settle(message, requeue=True)
        self._lose(f"a forward was not confirmed: {error}")

    def _copy(
        self, message: DeliveredMessage, exchange: str, routing_key: str, headers: dict[str, Any]
    ) -> Outgoing:
        """The original body and properties, with new headers, for a tier or the parking lot."""
        props = message.header.properties
        return Outgoing(
            exchange=exchange,
            routing_key=routing_key,
            body=message.body,
            message_id=props.message_id or "",
            headers=_travelling(headers),
            task=props.message_type,
            priority=props.priority,
            timestamp=props.timestamp,
            content_type=props.content_type,
            properties={k: getattr(props, k) for k in _KEPT_PROPERTIES if getattr(props, k)},
        )

    async def _settle(self, message: DeliveredMessage, requeue: bool | None = None) -> bool:
        """Ack (or nack with requeue) on the delivery's own channel; False if it is gone.

        Acks are batched by the channel's `Acker`; a delivery from a channel that has died is
        never settled on another one (the broker has requeued it already).
        """
        tag = message.delivery_tag
        assert tag is not None
        acker = self._acker
        if acker is None or acker.channel is not message.channel or acker.dead \
                or message.channel.is_closed:
            logger.info(
                "message %s not %s: its channel is closed; the broker redelivers it",
                message.header.properties.message_id, "returned" if requeue else "acked",
            )
            return False
        if requeue:
            acker.nack(tag)
        else:
            acker.ack(tag)
        return True
