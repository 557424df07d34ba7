"""One delivery, from arrival to ack: read it, decide, run its handler, carry the outcome out.

The outcome is made safe before the delivery is acked:

* the handler returned: ack;
* it raised with attempts left: a copy goes to the retry tier and the ack follows the broker's
  confirm of that copy, never the other way round;
* retrying is over, or the message is poison (too big, not a task, bad payload, unknown task,
  expired): a copy goes to the parking lot with the reason, and the ack follows its confirm.

If the copy cannot be confirmed the delivery is returned to the queue (nack with requeue) and
the consumer reconnects, so it is never lost; it may run again (a duplicate). A delivery is
settled only by the acker of the channel it came on (`_ack.py`).

A delivery that asks for a reply (a `Task.call`: direct reply-to, `_reply.py`) gets one once its
outcome is final and settled: the result when it succeeded, the park facts when it was parked;
none when it is retried (the retried copy carries the question on) or returned to the queue. A
reply is sent beside the settling, never before it, and whatever becomes of it (its caller gone,
not confirmed) is logged and changes nothing.

Each outcome is counted (metrics), logged as one line with its facts, and failures go to the
app's failure hooks. What to do is `_outcome.decide`'s; the copies are `_wire`'s.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rabbitq import _reply as reply
from rabbitq import _tracing as tracing
from rabbitq import _wire as wire
from rabbitq._ack import Acker
from rabbitq._amqp import Delivery
from rabbitq._app import App
from rabbitq._connection import scrub
from rabbitq._errors import ConnectionFailed, ParkReason, Poison, PublishError, Unroutable
from rabbitq._handlers import Failure, TaskContext, TaskDef
from rabbitq._metrics import WorkloadMetrics
from rabbitq._outcome import RAN, Outcome, ParkNow, Ran, Recount, RetryIn, Run, Succeeded, decide
from rabbitq._publish import Publisher
from rabbitq._topology import Workload

logger = logging.getLogger("rabbitq.settle")

TRACEBACK_LINES = 12
# A reply's confirm (and, after a loss, the publisher's reconnect) may take this long: a bound
# on how long a stopping consumer waits for replies still on their way.
REPLY_SECONDS = 5.0

# Told of a settled delivery: its envelope (None if it could not be read), its outcome, what
# the handler raised or the poison that stopped it, and its result as JSON (None unless it
# succeeded and an observer or a reply asked for it).
Observer = Callable[
    [Delivery, "wire.Envelope | None", Outcome, BaseException | None, bytes | None], None
]


@dataclass(slots=True)
class Settler:
    """Runs deliveries of one workload and settles each one's outcome.

    `publisher` confirms the copies sent to tiers, the work queue and the parking lot; sync
    handlers run in `executor`; `lose` ends the session (a copy was not confirmed); `host` is
    written on parked copies; the password of `url` is scrubbed from error texts that travel
    or are logged (a handler's library may quote a URL); `counts` counts settled deliveries by
    outcome.
    """

    app: App
    workload: Workload
    publisher: Publisher
    metrics: WorkloadMetrics
    executor: Executor
    lose: Callable[[str], None]
    url: str
    counts: Counter[str]
    host: str = field(default_factory=socket.gethostname)
    #: replies on their way (`_reply_later`)
    replies: set[asyncio.Task[None]] = field(default_factory=set)
    #: told of every settled outcome (`rabbitq.testing`); None, the default, costs one check
    observer: Observer | None = None

    async def handle(self, message: Delivery, acker: Acker) -> None:
        # the delivery's process span (`_tracing`), current until it is settled; with tracing
        # off this costs the check and a try, which costs nothing until something raises
        span = (
            tracing.start_process(
                message, self.workload.work_queue, self.workload.name, self.publisher.url
            )
            if tracing.ENABLED
            else None
        )
        try:
            props = message.properties
            spec = self.workload.spec
            redelivered = message.redelivered
            envelope: wire.Envelope | None = None
            error: BaseException | None = None
            duration: float | None = None
            result: bytes | None = None
            try:
                if props.broken:
                    raise Poison(ParkReason.BAD_ENVELOPE, props.broken)
                envelope = wire.decode(
                    body_size=len(message.body),
                    task=props.message_type,
                    message_id=props.message_id,
                    headers=props.headers,
                    max_message_bytes=spec.max_message_bytes,
                    content_type=props.content_type,
                )
            except Poison as poison:
                error, outcome = poison, decide(poison, spec, time.time())
            else:
                definition = self.app.tasks.get(envelope.task)
                outcome = decide(
                    envelope,
                    spec,
                    time.time(),
                    redelivered=redelivered,
                    registered=definition is not None,
                )
            if isinstance(outcome, Run):
                assert envelope is not None and definition is not None
                try:
                    payload = definition.parse(message.body)
                except Poison as poison:
                    error, outcome = poison, decide(poison, spec, time.time())
                else:
                    error, duration, result = await self._run(
                        message, envelope, definition, payload
                    )
                    ran = RAN if error is None else Ran(error)
                    outcome = decide(envelope, spec, time.time(), ran=ran, rules=definition.rules)
            await self._carry_out(message, acker, envelope, outcome, error, duration, result)
        except BaseException as exc:
            if span is not None:
                span.close(exc)
            raise
        if span is not None:
            span.close()

    async def _run(
        self,
        message: Delivery,
        envelope: wire.Envelope,
        definition: TaskDef[Any, Any],
        payload: Any,
    ) -> tuple[Exception | None, float, bytes | None]:
        """Run the handler; what it raised (None if it returned), how long it took, and its
        result as JSON if the delivery asks for a reply (else None)."""
        props = message.properties
        # built only for handlers that take it: most do not, and it is per-task work
        ctx = (
            TaskContext(
                message_id=envelope.message_id,
                task=envelope.task,
                workload=self.workload.name,
                attempt=envelope.attempt,
                deadline=envelope.deadline,
                redelivered=message.redelivered
                or envelope.redeliveries > 0
                or bool(envelope.delivery_count),
                priority=props.priority or 0,
            )
            if definition.wants_context
            else None
        )
        metrics = self.metrics.task(envelope.task)
        now = time.time()
        if envelope.ready_ms is not None:
            metrics.queue_latency.observe(max(0.0, now - envelope.ready_ms / 1000))
        elif (published := wire.timestamp_seconds(props)) is not None:  # a foreign publisher
            metrics.queue_latency.observe(max(0.0, now - published))
        started = time.monotonic()
        error: Exception | None = None
        result: bytes | None = None
        try:
            returned = await definition.run(payload, ctx, self.executor)
            # only for a reply we will send (or an observer); a result that cannot be encoded
            # fails as any error
            if self.observer is not None or (
                props.reply_to is not None
                and reply.wants_reply(props.reply_to, props.correlation_id)
            ):
                result = definition.dump_result(returned)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        duration = time.monotonic() - started
        metrics.duration.observe(duration)
        return error, duration, result

    async def _carry_out(
        self,
        message: Delivery,
        acker: Acker,
        envelope: wire.Envelope | None,
        outcome: Outcome,
        error: BaseException | None,
        duration: float | None,
        result: bytes | None = None,
    ) -> None:
        """The one place an outcome is carried out: send its copy and wait for the confirm,
        then settle the delivery on its own channel, count, log, report, and reply."""
        if isinstance(outcome, ParkNow) and error is None:  # stopped before it ran
            error = Poison(outcome.reason, outcome.detail)
        if type(outcome) is not Succeeded:  # Run never reaches here
            try:
                await self.publisher.send(self._copy(message, envelope, outcome, error))
            except (PublishError, ConnectionFailed) as exc:
                if isinstance(exc, Unroutable) and isinstance(outcome, RetryIn) and error:
                    why = f"{wire.error_text(error)}; then the retry copy was unroutable: {exc}"
                    park = ParkNow(ParkReason.UNROUTABLE_RETRY, self._clean(why))
                    await self._carry_out(message, acker, envelope, park, error, duration)
                    return
                # not confirmed: keep the original (requeue) and reconnect
                logger.error(
                    "message %s could not be moved (%s); returning it to the queue and "
                    "reconnecting",
                    message.properties.message_id,
                    exc,
                )
                acker.settle(message, requeue=True)
                self.lose(f"a forward was not confirmed: {exc}")
                if tracing.ENABLED:
                    tracing.record_requeued(f"its {type(outcome).__name__} copy was not confirmed")
                return
        if acker.settle(message):
            self._record(message, envelope, outcome, error, duration)
            if self.observer is not None:
                self.observer(message, envelope, outcome, error, result)
            props = message.properties
            if props.reply_to is not None and isinstance(outcome, Succeeded | ParkNow):
                self._reply_later(message, outcome, error, result)

    def _reply_later(
        self,
        message: Delivery,
        outcome: Succeeded | ParkNow,
        error: BaseException | None,
        result: bytes | None,
    ) -> None:
        """Send the reply of a settled outcome, in a task of its own.

        Why this order is safe: the reply follows the outcome. A parked task's reply is built
        only once its parked copy was confirmed and the delivery acked, so no caller hears
        "parked" of a task whose copy was lost and requeued (that path returns above, without
        a reply), and a success's reply follows its ack. Should that ack be lost with the
        connection, the broker redelivers the task, it runs again (at-least-once) and its
        second reply finds no call waiting: the caller ignores it.

        Why a task of its own: the ack is already written (a reply never holds it back), and
        a consumer that stops or loses its connection cancels the deliveries' tasks, which
        return an unsettled delivery to the queue; this one was settled, and the reply's
        confirm must not be mistaken for the delivery's.
        """
        props = message.properties
        if not reply.wants_reply(props.reply_to, props.correlation_id):
            logger.debug(
                "message %s asks for a reply to %r; only direct reply-to is answered",
                props.message_id,
                props.reply_to,
            )
            return
        assert props.reply_to is not None and props.correlation_id is not None
        if isinstance(outcome, ParkNow):
            assert error is not None
            out = reply.parked(
                props.reply_to,
                props.correlation_id,
                reason=str(outcome.reason),
                error_type=_error_type(error),
                error=outcome.detail or self._clean(str(error)),
            )
        else:
            out = reply.succeeded(props.reply_to, props.correlation_id, result or b"null")
        task = asyncio.get_running_loop().create_task(self._reply(props.message_id, out))
        self.replies.add(task)
        task.add_done_callback(self.replies.discard)

    async def _reply(self, message_id: str | None, out: wire.Outgoing) -> None:
        try:
            async with asyncio.timeout(REPLY_SECONDS):
                await self.publisher.reply(out, REPLY_SECONDS)
        except Exception as exc:  # not confirmed, or no connection: the outcome stands
            logger.info(
                "the reply to message %s was not confirmed (%s); the caller will not get it, "
                "the task's outcome stands",
                message_id,
                self._clean(str(exc)) if not isinstance(exc, TimeoutError) else "timed out",
            )
        else:
            # confirmed is all the broker says: a reply whose caller is gone is dropped there
            logger.debug("replied to message %s", message_id)

    async def finish_replies(self) -> None:
        """Wait for the replies on their way (each is bounded by `REPLY_SECONDS`)."""
        if self.replies:
            await asyncio.wait(set(self.replies), timeout=REPLY_SECONDS + 1)

    def _copy(
        self,
        message: Delivery,
        envelope: wire.Envelope | None,
        outcome: Outcome,
        error: BaseException | None,
    ) -> wire.Outgoing:
        """The copy an outcome sends: to a tier, back to the work queue, or to the parking lot."""
        props, workload, now = message.properties, self.workload, time.time()
        stamp = None
        if isinstance(outcome, RetryIn):
            assert envelope is not None and error is not None
            tier = workload.tiers[outcome.tier_index]
            text = self._clean(wire.error_text(error))
            headers = wire.retry_headers(props.headers, envelope, now, text, tier.delay_seconds)
            to, kind = (workload.retry_exchange, tier.routing_key), "retry"
        elif isinstance(outcome, Recount):
            headers = wire.recount_headers(props.headers, outcome.redeliveries)
            to, kind = (workload.task_exchange, workload.routing_key), "redeliver"
        else:
            assert isinstance(outcome, ParkNow) and error is not None
            headers = wire.park_headers(
                props.headers,
                reason=outcome.reason,
                error_type=_error_type(error),
                error_message=self._park_error(outcome, error),
                traceback=self._traceback(error),
                attempts=envelope.attempt if envelope is not None else 0,
                first_failure_ms=envelope.first_failure_ms if envelope else None,
                failed_at=now,
                host=self.host,
                workload=workload.name,
                published_at=wire.timestamp_seconds(props),
            )
            to, kind = (workload.parking_exchange, workload.routing_key), "park"
            # the broker reports the head message's timestamp: with the park time there, the
            # age of the oldest parked task is one PromQL expression
            stamp = datetime.fromtimestamp(now, UTC)
        return wire.copy(props, message.body, *to, headers, kind, timestamp=stamp)

    def _record(
        self,
        message: Delivery,
        envelope: wire.Envelope | None,
        outcome: Outcome,
        error: BaseException | None,
        duration: float | None,
    ) -> None:
        """Count, log and report a settled outcome."""
        props = message.properties
        if tracing.ENABLED:
            tier = (
                self.workload.tiers[outcome.tier_index].label
                if isinstance(outcome, RetryIn)
                else None
            )
            attempt = envelope.attempt if envelope is not None else 0
            tracing.record_outcome(outcome, attempt, error, tier, self._clean)
        # a task name is a label only if the app registered it: poison names anything
        task = envelope.task if envelope is not None else None
        metrics = self.metrics.task(task)
        if type(outcome) is Succeeded:  # the common case: count it, log only if asked
            self.counts["succeeded"] += 1
            metrics.succeeded.inc()
            if not logger.isEnabledFor(logging.DEBUG):
                return
        facts: dict[str, Any] = {
            "workload": self.workload.name,
            "task": task or props.message_type,
            "message_id": props.message_id,
            "attempt": envelope.attempt if envelope is not None else 0,
            "duration_seconds": None if duration is None else round(duration, 6),
        }
        if isinstance(outcome, Succeeded):
            logger.debug("task succeeded", extra={**facts, "outcome": "succeeded"})
        elif isinstance(outcome, Recount):
            self.counts["redelivered"] += 1
            metrics.redelivered.inc()
            logger.warning(
                "task came back unsettled (redelivery %d of at most %d): its consumer died or "
                "lost its connection while it ran; requeued",
                outcome.redeliveries,
                self.workload.spec.max_redeliveries - 1,
                extra={**facts, "outcome": "redelivered"},
            )
        elif isinstance(outcome, RetryIn) and error is not None:
            self.counts["retried"] += 1
            metrics.retried.inc()
            tier = self.workload.tiers[outcome.tier_index].label
            text = self._clean(wire.error_text(error))
            facts |= {"outcome": "retried", "tier": tier, "error": text}
            logger.info("task failed; retrying in %s", tier, extra=facts)
            self._report(task, facts, None, error)
        elif isinstance(outcome, ParkNow) and error is not None:
            self.counts[f"parked:{outcome.reason}"] += 1
            metrics.park(outcome.reason)
            expired = outcome.reason is ParkReason.EXPIRED
            detail = self._park_error(outcome, error)
            facts |= {
                "outcome": "expired" if expired else "parked",
                "reason": str(outcome.reason),
                "error": f"{_error_type(error)}: {detail}"[:500],
                "traceback": self._traceback(error),
            }
            level = logging.WARNING if expired else logging.ERROR
            logger.log(level, "task expired; parked" if expired else "task parked", extra=facts)
            self._report(task, facts, str(outcome.reason), error)

    def _park_error(self, outcome: ParkNow, error: BaseException) -> str:
        """The error text a parked copy and its log line carry."""
        if outcome.reason is ParkReason.NOT_RETRYABLE:  # the handler's text, then why
            return "; ".join(filter(None, (self._clean(str(error)), outcome.detail)))
        return outcome.detail or self._clean(str(error))

    def _traceback(self, error: BaseException) -> str:
        """The handler's traceback, last lines first to go; none for poison."""
        if isinstance(error, Poison):
            return ""
        return self._clean("".join(traceback.format_exception(error, limit=-TRACEBACK_LINES)))

    def _clean(self, text: str) -> str:
        return scrub(text, self.url) if self.url else text

    def _report(
        self, task: str | None, facts: dict[str, Any], reason: str | None, error: BaseException
    ) -> None:
        if not self.app.failure_hooks:
            return
        failure = Failure(
            workload=self.workload.name,
            task=task,
            message_id=facts["message_id"],
            attempt=facts["attempt"],
            outcome=facts["outcome"],
            reason=reason,
            error=error,
            duration_seconds=facts["duration_seconds"],
        )
        for hook in self.app.failure_hooks:
            try:
                hook(failure)
            except Exception:
                logger.exception("a failure hook raised; the task's outcome stands")


def _error_type(error: BaseException) -> str:
    return "Poison" if isinstance(error, Poison) else type(error).__name__
