"""One delivery, from arrival to ack: read its envelope, run its handler, settle its outcome.

The outcome is made safe before the delivery is acked:

* the handler returned: ack;
* it raised with attempts left: a copy goes to the retry tier and the ack follows the broker's
  confirm of that copy, never the other way round;
* retrying is over, or the message is poison (too big, not a task, bad payload, unknown task,
  expired): a copy goes to the parking lot with the reason, and the ack follows its confirm.

If the copy cannot be confirmed the delivery is returned to the queue (nack with requeue) and
the consumer reconnects, so it is never lost; it may run again (a duplicate). A delivery whose
channel died is never acked later: its ack goes only to the channel it came on, and the broker
has requeued it.

Each outcome is counted (metrics), logged as one line with its facts, and failures go to the
app's failure hooks.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import Any

import pamqp.encode
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from rabbitq._ack import Acker
from rabbitq._app import App
from rabbitq._connection import scrub
from rabbitq._errors import ConnectionFailed, PublishError, Unroutable
from rabbitq._handlers import Failure, TaskContext, TaskDef
from rabbitq._metrics import WorkloadMetrics
from rabbitq._outcome import ParkNow, Recount, RetryIn, crash_guard, decide
from rabbitq._publish import Outgoing, Publisher
from rabbitq._topology import Workload
from rabbitq._wire import (
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

logger = logging.getLogger("rabbitq.settle")

# The whole header table travels in one frame (frame_max is 128 KiB by default): what came in
# fitted, but a parked copy adds up to ~5 KiB of its own headers.
MAX_HEADER_BYTES = 120 * 1024
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


def _timestamp(props: Basic.Properties) -> float | None:
    """The AMQP `timestamp` property in seconds since the epoch, if set (pamqp gives UTC)."""
    stamp = props.timestamp
    return stamp.replace(tzinfo=UTC).timestamp() if isinstance(stamp, datetime) else None


class Settler:
    """Runs deliveries of one workload and settles each one's outcome.

    Args:
        app: the tasks, and the failure hooks.
        workload: the workload.
        publisher: confirms the copies sent to tiers and the parking lot.
        metrics: the workload's metrics.
        executor: where sync handlers run.
        lose: called when the session must end (a copy was not confirmed).
        host: this machine, written on parked copies.
        url: the broker URL, whose password is scrubbed from error texts that travel or are
            logged (a handler's library may quote a URL).
    """

    def __init__(
        self,
        app: App,
        workload: Workload,
        publisher: Publisher,
        metrics: WorkloadMetrics,
        executor: Executor,
        lose: Callable[[str], None],
        host: str,
        url: str = "",
    ) -> None:
        self.app = app
        self.workload = workload
        self.publisher = publisher
        self.metrics = metrics
        self.executor = executor
        self.lose = lose
        self.host = host
        self.url = url
        self.counts: Counter[str] = Counter()
        # the channel deliveries arrive on now; replaced on every reconnect
        self.acker: Acker | None = None

    async def handle(self, message: DeliveredMessage) -> None:
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
                await self._recount(message, envelope, guard.redeliveries)
                return
            definition = self.app.tasks.get(envelope.task)
            if definition is None:
                raise Poison(ParkReason.UNKNOWN_TASK, f"no task is registered as {envelope.task!r}")
            if envelope.deadline is not None and time.time() > envelope.deadline:
                raise Poison(ParkReason.EXPIRED, "its deadline passed before it could run")
            payload = definition.parse(message.body)
        except Poison as poison:
            await self._park(message, envelope, poison.reason, poison, poison.detail, "", None)
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
        metrics = self.metrics.task(envelope.task)
        now = time.time()
        ready_ms = envelope.ready_ms
        if ready_ms is not None:
            metrics.queue_latency.observe(max(0.0, now - ready_ms / 1000))
        elif (published := _timestamp(props)) is not None:  # a publisher without our header
            metrics.queue_latency.observe(max(0.0, now - published))
        started = time.monotonic()
        try:
            await definition.run(payload, ctx, self.executor)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            duration = time.monotonic() - started
            metrics.duration.observe(duration)
            await self._failed(message, envelope, exc, duration)
            return
        duration = time.monotonic() - started
        metrics.duration.observe(duration)
        if self.settle(message):
            self.counts["succeeded"] += 1
            metrics.succeeded.inc()
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("task succeeded", extra=self._facts(
                    envelope.task, envelope.message_id, envelope.attempt, "succeeded", duration,
                ))

    async def _failed(
        self, message: DeliveredMessage, envelope: Envelope, exc: Exception, duration: float
    ) -> None:
        now = time.time()
        decision = decide(envelope.attempt, exc, self.workload.spec.retry, now, envelope.deadline)
        if isinstance(decision, ParkNow):
            tb = self._clean("".join(traceback.format_exception(exc, limit=-TRACEBACK_LINES)))
            await self._park(
                message, envelope, decision.reason, exc, self._clean(str(exc)), tb, duration
            )
            return
        assert isinstance(decision, RetryIn)
        tier = self.workload.tiers[decision.tier_index]
        out = self._copy(
            message, self.workload.retry_exchange, tier.routing_key,
            retry_headers(
                message.header.properties.headers, envelope, now, self._clean(error_text(exc)),
                tier.delay_seconds,
            ),
            "retry",
        )
        try:
            await self.publisher.send(out)
        except Unroutable as unroutable:
            await self._park(
                message, envelope, ParkReason.UNROUTABLE_RETRY, exc,
                self._clean(f"{error_text(exc)}; then the retry copy was unroutable: {unroutable}"),
                "",
                duration,
            )
            return
        except (PublishError, ConnectionFailed) as error:
            await self._not_forwarded(message, error)
            return
        if self.settle(message):
            self.counts["retried"] += 1
            self.metrics.task(envelope.task).retried.inc()
            logger.info("task failed; retrying in %s", tier.label, extra=self._facts(
                envelope.task, envelope.message_id, envelope.attempt, "retried", duration,
                tier=tier.label, error=self._clean(error_text(exc)),
            ))
            self._report(envelope.task, envelope.message_id, envelope.attempt, "retried", None,
                         exc, duration)

    async def _park(
        self,
        message: DeliveredMessage,
        envelope: Envelope | None,
        reason: ParkReason,
        error: BaseException,
        error_message: str,
        tb: str,
        duration: float | None,
    ) -> None:
        props = message.header.properties
        attempts = envelope.attempt if envelope is not None else 0
        error_type = "Poison" if isinstance(error, Poison) else type(error).__name__
        now = time.time()
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
                failed_at=now,
                host=self.host,
                workload=self.workload.name,
                published_at=_timestamp(props),
            ),
            "park",
            # the broker reports the head message's timestamp: with the park time there, the
            # age of the oldest parked task is one PromQL expression
            timestamp=datetime.fromtimestamp(now, UTC),
        )
        try:
            await self.publisher.send(out)
        except (PublishError, ConnectionFailed) as error_:
            await self._not_forwarded(message, error_)
            return
        if not self.settle(message):
            return
        # a task name is a label only if the app registered it: poison names anything
        task = envelope.task if envelope is not None else None
        metrics = self.metrics.task(task)
        self.counts[f"parked:{reason}"] += 1
        metrics.park(reason)
        outcome = "expired" if reason is ParkReason.EXPIRED else "parked"
        logger.log(
            logging.WARNING if outcome == "expired" else logging.ERROR,
            "task %s", "expired; parked" if outcome == "expired" else "parked",
            extra=self._facts(
                task or props.message_type, props.message_id, attempts, outcome, duration,
                reason=str(reason), error=f"{error_type}: {error_message}"[:500], traceback=tb,
            ),
        )
        self._report(task, props.message_id, attempts, outcome, str(reason), error, duration)

    async def _recount(
        self, message: DeliveredMessage, envelope: Envelope, redeliveries: int
    ) -> None:
        """Requeue a redelivered task with its redelivery count raised, then ack the delivery."""
        out = self._copy(
            message, self.workload.task_exchange, self.workload.routing_key,
            recount_headers(message.header.properties.headers, redeliveries), "redeliver",
        )
        try:
            await self.publisher.send(out)
        except (PublishError, ConnectionFailed) as error:
            await self._not_forwarded(message, error)
            return
        if self.settle(message):
            self.counts["redelivered"] += 1
            self.metrics.task(envelope.task).redelivered.inc()
            logger.warning(
                "task came back unsettled (redelivery %d of at most %d): its consumer died or "
                "lost its connection while it ran; requeued", redeliveries,
                self.workload.spec.max_redeliveries - 1,
                extra=self._facts(envelope.task, envelope.message_id, envelope.attempt,
                                  "redelivered", None),
            )

    async def _not_forwarded(self, message: DeliveredMessage, error: Exception) -> None:
        """The copy was not confirmed: keep the original (requeue) and back off."""
        logger.error(
            "message %s could not be moved (%s); returning it to the queue and reconnecting",
            message.header.properties.message_id, error,
        )
        self.settle(message, requeue=True)
        self.lose(f"a forward was not confirmed: {error}")

    def _copy(
        self,
        message: DeliveredMessage,
        exchange: str,
        routing_key: str,
        headers: dict[str, Any],
        kind: str,
        timestamp: datetime | None = None,
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
            timestamp=timestamp or props.timestamp,
            content_type=props.content_type,
            properties={k: getattr(props, k) for k in _KEPT_PROPERTIES if getattr(props, k)},
            kind=kind,
        )

    def settle(self, message: DeliveredMessage, requeue: bool = False) -> bool:
        """Ack (or nack with requeue) on the delivery's own channel; False if it is gone.

        Acks are batched by the channel's `Acker`; a delivery from a channel that has died is
        never settled on another one (the broker has requeued it already).
        """
        tag = message.delivery_tag
        assert tag is not None
        acker = self.acker
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

    def _clean(self, text: str) -> str:
        return scrub(text, self.url) if self.url else text

    def _facts(
        self, task: str | None, message_id: str | None, attempt: int, outcome: str,
        duration: float | None, **more: str,
    ) -> dict[str, Any]:
        return {
            "workload": self.workload.name, "task": task, "message_id": message_id,
            "attempt": attempt, "outcome": outcome,
            "duration_seconds": None if duration is None else round(duration, 6), **more,
        }

    def _report(
        self, task: str | None, message_id: str | None, attempt: int, outcome: str,
        reason: str | None, error: BaseException, duration: float | None,
    ) -> None:
        if not self.app.failure_hooks:
            return
        failure = Failure(
            workload=self.workload.name, task=task, message_id=message_id, attempt=attempt,
            outcome=outcome, reason=reason, error=error, duration_seconds=duration,
        )
        for hook in self.app.failure_hooks:
            try:
                hook(failure)
            except Exception:
                logger.exception("a failure hook raised; the task's outcome stands")

