"""The user's entry point: `App` holds the registered tasks and publishes them.

    app = rabbitq.App(namespace="shop", url="amqp://guest:guest@localhost:5672/")

    @app.task("emails.send", workload="emails")
    async def send_email(msg: SendEmail) -> None: ...

    await send_email.publish(SendEmail(to="a@b.c"))       # from async code
    send_email.publish_sync(SendEmail(to="a@b.c"))        # from Django, Flask, scripts
    result = await resize.call(Image(url=...), timeout=30)  # publish, wait for the result

A call waits for the task's result over direct reply-to (`_call.py`); results are not stored.

Inside a running consumer the app publishes over the consumer's own publishing connection, so a
handler can publish child tasks with the same calls (sync handlers too: they run in threads and
hand the publish to the consumer's event loop).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from importlib import import_module
from typing import TYPE_CHECKING, Any, Generic, TypedDict, TypeVar, Unpack

from pydantic import BaseModel

from rabbitq import _ladder as ladder
from rabbitq import _tracing as tracing
from rabbitq._call import Caller
from rabbitq._connection import DEFAULT_URL
from rabbitq._errors import ConfigError
from rabbitq._handlers import ExceptionClasses, FailureHook, TaskDef, task_rules
from rabbitq._metrics import Metrics
from rabbitq._publish import Publisher, raise_first
from rabbitq._topology import NAME_PATTERN, ExchangeName, RoutingKey, task_exchange, work_queue
from rabbitq._wire import Outgoing, new_task_headers

if TYPE_CHECKING:
    from opentelemetry.trace import Span

P = TypeVar("P", bound=BaseModel)
R = TypeVar("R")
T = TypeVar("T")

SYNC_PUBLISH_TIMEOUT_SECONDS = 60.0
CALL_TIMEOUT_SECONDS = 60.0
# `call_sync` waits this much longer than the call, so the call's own CallTimeout is what it
# raises, not the wait's
SYNC_CALL_MARGIN_SECONDS = 5.0
MAX_PRIORITY = 255
# AMQP's message-id is a short string: 255 bytes at most
MAX_KEY_BYTES = 255


def _check_key(key: str) -> None:
    """An idempotency key fits AMQP's message-id (a short string) and a log line."""
    if not key or len(key.encode()) > MAX_KEY_BYTES or not key.isprintable():
        raise ConfigError(f"idempotency_key must be 1 to {MAX_KEY_BYTES} bytes of printable text")


def _deadline_seconds(deadline: datetime | timedelta | None, now: float) -> float | None:
    if deadline is None:
        return None
    if isinstance(deadline, timedelta):
        return now + deadline.total_seconds()
    if deadline.tzinfo is None:
        raise ConfigError(f"deadline {deadline!r} has no time zone; use an aware datetime")
    return deadline.timestamp()


def _run_at(delay: timedelta | float | None, at: datetime | None, now: float) -> float | None:
    """When a task asked to run later should run (seconds since the epoch), or None for now."""
    if delay is not None and at is not None:
        raise ConfigError("give delay or at, not both")
    if at is not None:
        if at.tzinfo is None:
            raise ConfigError(f"at={at!r} has no time zone; use an aware datetime")
        return at.timestamp()
    if delay is None:
        return None
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if seconds < 0:
        raise ConfigError(f"delay={delay!r} is negative; a task cannot run in the past")
    return now + seconds


class PublishOptions(TypedDict, total=False):
    """How a task is published; see `Task.message`."""

    priority: int | None
    deadline: datetime | timedelta | None
    idempotency_key: str | None
    delay: timedelta | float | None
    at: datetime | None


class Task(Generic[P, R]):
    """A registered task: call it like the function, or publish it for a consumer to run."""

    def __init__(self, app: App, definition: TaskDef[P, R]) -> None:
        self.app = app
        self.definition = definition
        self.name = definition.name
        self.workload = definition.workload

    def __call__(self, *args: Any) -> Any:
        """Run the handler in this process, as a plain function call (handy in tests)."""
        return self.definition.fn(*args)

    def message(
        self,
        payload: P | dict[str, Any],
        *,
        priority: int | None = None,
        deadline: datetime | timedelta | None = None,
        idempotency_key: str | None = None,
        delay: timedelta | float | None = None,
        at: datetime | None = None,
    ) -> Outgoing:
        """The message that `publish` would send, validated; for `App.publish_many`.

        Args:
            payload: the task's model (or a dict validated into it).
            priority: 0 (default) to 255, higher runs first; the broker queues anything above
                the workload's max_priority as that maximum.
            deadline: an aware datetime, or a timedelta from now, after which the task is not
                run but parked as expired.
            idempotency_key: becomes the message_id (1 to 255 bytes of printable text), so
                consumers can deduplicate.
            delay: run the task this long from now (a timedelta, or seconds), to the second,
                up to 8 years; it waits in the namespace's delay ladder, in the broker.
            at: run the task at this aware datetime (one in the past: now).

        Raises:
            ConfigError: a bad option, or a deadline before the time the task is to run.
        """
        namespace = self.app.require_namespace()
        model = self.definition.check_payload(payload)
        if priority is not None and not 0 <= priority <= MAX_PRIORITY:
            raise ConfigError(f"priority {priority!r} must be from 0 to {MAX_PRIORITY}")
        if idempotency_key is not None:
            _check_key(idempotency_key)
        now = time.time()
        deadline_at = _deadline_seconds(deadline, now)
        run_at = _run_at(delay, at, now)
        headers = new_task_headers(deadline_at, now, run_at)
        exchange, key, check = task_exchange(namespace), RoutingKey(self.workload), None
        if run_at is not None:
            if deadline_at is not None and deadline_at < run_at:
                raise ConfigError(
                    f"the deadline is {run_at - deadline_at:.0f}s before the task is to run; "
                    "it would only ever be parked as expired"
                )
            try:
                wait = ladder.whole_seconds(max(0.0, run_at - now))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if wait:
                to = ladder.route(namespace, self.workload, wait)
                exchange, key = ExchangeName(to.exchange), RoutingKey(to.routing_key)
                # the ladder confirms any key: whether the work queue is there is asked apart
                check = work_queue(namespace, self.workload)
        return Outgoing(
            exchange=exchange,
            routing_key=key,
            body=model.__pydantic_serializer__.to_json(model),  # as model_dump_json(), as bytes
            message_id=idempotency_key or os.urandom(16).hex(),  # uuid4's randomness, 3 us less
            headers=headers,
            task=self.name,
            priority=priority,
            timestamp=datetime.fromtimestamp(now, UTC),
            check_queue=check,
        )

    async def publish(self, payload: P | dict[str, Any], **options: Unpack[PublishOptions]) -> str:
        """Publish the task and wait for the broker's confirm; returns its message id.

        Raises:
            pydantic.ValidationError: the payload does not fit the model (nothing is sent).
            Unroutable: no work queue is bound for the workload (run `rabbitq topology apply`).
            NotConfirmed: the broker did not confirm it; it may or may not be queued.
        """
        out = self.message(payload, **options)
        if tracing.ENABLED:
            with tracing.sending(out, self.app._broker_url):
                await (await self.app.publisher()).send(out)
        else:
            await (await self.app.publisher()).send(out)
        return out.message_id

    async def publish_many(
        self, payloads: Iterable[P | dict[str, Any]], **options: Unpack[PublishOptions]
    ) -> list[str]:
        """Publish many with pipelined confirms, each with the same options; their ids."""
        return await self.app.publish_many([self.message(p, **options) for p in payloads])

    def publish_sync(self, payload: P | dict[str, Any], **options: Unpack[PublishOptions]) -> str:
        """`publish` for synchronous code: blocks until confirmed; needs no event loop."""
        out = self.message(payload, **options)
        if tracing.ENABLED:  # the span starts here, in the caller's thread and its context
            with tracing.sending(out, self.app._broker_url):
                self.app.run_sync(lambda: self._send(out))
        else:
            self.app.run_sync(lambda: self._send(out))
        return out.message_id

    async def _send(self, out: Outgoing) -> None:
        await (await self.app.publisher()).send(out)

    async def call(
        self,
        payload: P | dict[str, Any],
        *,
        # the call's own deadline, spelled as asyncio's; it bounds the publish too
        timeout: float = CALL_TIMEOUT_SECONDS,  # noqa: ASYNC109
        **options: Unpack[PublishOptions],
    ) -> R:
        """Publish the task, wait for a consumer to run it, and return its result.

        The result is validated against the handler's return annotation (None if it has
        none). It travels over direct reply-to and is not stored: if this caller is gone, the
        result is dropped. A retried task keeps the caller waiting for its final outcome.

        Args:
            payload: as `publish`.
            timeout: seconds for the whole call; the task is not cancelled when it passes.
            options: `priority`, `deadline`, `idempotency_key`, as `message`.

        Raises:
            TaskFailed: the task was parked (retries exhausted, `Park`, expired, poison).
            CallTimeout: no result within `timeout`; the task may still run.
            CallLost: the connection was lost while waiting; the task may still run.
            ReplyInvalid: the reply is not a result of the task's return type.
            pydantic.ValidationError, Unroutable, NotConfirmed: as `publish`.
        """
        out = self.message(payload, **options)
        if tracing.ENABLED:
            span = tracing.start_send(out, self.app._broker_url)
            try:
                return await self._call(out, timeout, span)
            except BaseException as exc:
                tracing.end(span, exc)  # unless it was sent: then the call failed later
                raise
        return await self._call(out, timeout)

    def call_sync(
        self,
        payload: P | dict[str, Any],
        *,
        timeout: float = CALL_TIMEOUT_SECONDS,
        **options: Unpack[PublishOptions],
    ) -> R:
        """`call` for synchronous code (and sync handlers): blocks until the result."""
        out = self.message(payload, **options)
        span = tracing.start_send(out, self.app._broker_url) if tracing.ENABLED else None
        try:
            return self.app.run_sync(
                lambda: self._call(out, timeout, span), timeout=timeout + SYNC_CALL_MARGIN_SECONDS
            )
        except BaseException as exc:
            if span is not None:
                tracing.end(span, exc)  # unless it was sent: then the call failed later
            raise

    async def _call(self, out: Outgoing, timeout_seconds: float, span: Span | None = None) -> R:
        caller = await self.app.caller()
        result: R = await caller.call(out, timeout_seconds, self.definition.load_result, span)
        return result


class _LoopThread:
    """An event loop in a daemon thread, for publishing from code that has no loop."""

    def __init__(self) -> None:
        try:  # uvloop where it is installed, as `rabbitq consume` runs: less CPU a publish
            self.loop: asyncio.AbstractEventLoop = import_module("uvloop").new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="rabbitq-publish", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class App:
    """The tasks of an application, and the publisher they share.

    Args:
        namespace: the topology namespace the tasks are published into; `rabbitq consume`
            fills it from the topology when left out.
        url: the broker to publish to (default `amqp://guest:guest@localhost:5672/`).
        metrics: where the app's own publishes are counted (a consumer counts its own).
    """

    def __init__(
        self,
        namespace: str | None = None,
        *,
        url: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.namespace = namespace
        self.url = url
        self.metrics = metrics
        self.tasks: dict[str, TaskDef[Any, Any]] = {}
        self.failure_hooks: list[FailureHook] = []
        self._publisher: Publisher | None = None
        self._caller: Caller | None = None  # on the publisher's connection, made on first call
        # a consumer's namespace, while the app publishes over that consumer's connection
        self._consumer_namespace: str | None = None
        self._closer: asyncio.Task[None] | None = None  # only while the app owns the publisher
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: _LoopThread | None = None
        self._sync_lock = threading.Lock()

    def task(
        self,
        name: str,
        *,
        workload: str,
        timeout_seconds: float | None = None,
        max_attempts: int | None = None,
        retry_on: ExceptionClasses | None = None,
        park_on: ExceptionClasses = (),
    ) -> Callable[[Callable[..., Any]], Task[Any, Any]]:
        """Register a handler under `name`, run by the consumers of `workload`.

        By default a task is retried on any exception, as its workload's `retry` policy says.
        The retry rules narrow that for this task. An exception that is an instance of a
        `park_on` class, or (when `retry_on` is given) of no `retry_on` class, is not retried:
        the task is parked at once as `not_retryable`, on any attempt. `park_on` wins when
        both match. Raising `rabbitq.Retry` always asks for a retry (still bounded by the
        attempts and the deadline) and `rabbitq.Park` always parks as `parked_by_handler`,
        whatever the rules say; a `HandlerTimeout` (a `TimeoutError`) is an exception like any
        other.

        Args:
            name: the task name, sent as the message `type`; unique in the app.
            workload: the workload (from `topology/`) whose queue the task goes to.
            timeout_seconds: the handler is cancelled (or, if sync, abandoned) after this long,
                and the task takes the retry path.
            max_attempts: at most this many attempts (>= 1); the workload's
                `retry.max_attempts` still caps it, so only a lower value changes anything.
                The last attempt's failure parks the task as `retries_exhausted`.
            retry_on: an exception class or a tuple of them: retry only these (and their
                subclasses).
            park_on: an exception class or a tuple of them: never retry these (and their
                subclasses).

        Raises:
            ConfigError: a bad workload name, `timeout_seconds`, `max_attempts`, `retry_on`
                or `park_on` (at registration, before any task is published).
        """
        if not re.match(NAME_PATTERN, workload):
            raise ConfigError(f"workload {workload!r} must match {NAME_PATTERN}")
        rules = task_rules(name, max_attempts, retry_on, park_on)

        def register(fn: Callable[..., Any]) -> Task[Any, Any]:
            if name in self.tasks:
                raise ConfigError(f"task {name!r} is registered twice")
            definition: TaskDef[Any, Any] = TaskDef(name, workload, fn, timeout_seconds, rules)
            self.tasks[name] = definition
            return Task(self, definition)

        return register

    def on_failure(self, hook: FailureHook) -> FailureHook:
        """Call `hook(failure)` whenever a task is retried or parked; usable as a decorator.

        For error reporters: `app.on_failure(lambda f: sentry_sdk.capture_exception(f.error))`.
        The hook runs on the consumer's event loop, so it must be quick (Sentry only queues);
        whatever it raises is logged and ignored: a hook never changes a task's outcome.
        """
        self.failure_hooks.append(hook)
        return hook

    def workloads(self) -> set[str]:
        return {t.workload for t in self.tasks.values()}

    def require_namespace(self) -> str:
        if self.namespace is None:
            if self._consumer_namespace is not None:
                return self._consumer_namespace
            raise ConfigError(
                "the App has no namespace; pass App(namespace=...) to publish outside a consumer"
            )
        return self.namespace

    # Publishing connection -------------------------------------------------------------------

    async def bind_publisher(self, publisher: Publisher, namespace: str) -> None:
        """Publish through `publisher` (a consumer's, in `namespace`), from its loop and from
        worker threads."""
        self._consumer_namespace = namespace
        if self._publisher is publisher:
            return
        await self.close()
        self._publisher, self._loop = publisher, asyncio.get_running_loop()

    def unbind_publisher(self, publisher: Publisher) -> None:
        """Stop using a consumer's publisher (it is closing); the app opens its own again."""
        if self._publisher is publisher:
            self._publisher, self._loop, self._consumer_namespace = None, None, None

    @property
    def _broker_url(self) -> str:
        """The broker this app publishes to: its publisher's (a consumer's, inside one), else
        its own `url`, else the default."""
        return self._publisher.url if self._publisher is not None else self.url or DEFAULT_URL

    async def publisher(self) -> Publisher:
        """The publisher of this app, connecting on first use."""
        loop = asyncio.get_running_loop()
        if self._publisher is not None and (self._loop is loop or self._closer is None):
            return self._publisher
        # A publisher belongs to the loop it connected on; a new loop gets its own.
        await self.close()
        metrics = self.metrics.publishing() if self.metrics is not None else None
        self._publisher = Publisher(self.url or DEFAULT_URL, name="app-publisher", metrics=metrics)
        # asyncio.run() cancels the tasks left at exit: the closer closes the connection in time
        self._loop, self._closer = loop, loop.create_task(_close_when_cancelled(self._publisher))
        return self._publisher

    async def caller(self) -> Caller:
        """The caller of this app's calls, on its publisher's connection."""
        publisher = await self.publisher()
        caller = self._caller
        if caller is None or caller.publisher is not publisher:
            # the old one's channel closes with its publisher's connection
            caller = self._caller = Caller(publisher)
        return caller

    async def publish_many(self, messages: Sequence[Outgoing]) -> list[str]:
        """Publish messages (from `Task.message`) with pipelined confirms; their message ids.

        Raises:
            PublishError: the first failure, noting how many others failed; the rest were
                confirmed.
        """
        publisher = await self.publisher()
        if tracing.ENABLED:
            with tracing.sending_batch(messages, publisher.url):
                errors = await publisher.send_many(messages)
                raise_first(messages, errors)
        else:
            errors = await publisher.send_many(messages)
            raise_first(messages, errors)
        return [m.message_id for m in messages]

    def publish_many_sync(self, messages: Sequence[Outgoing]) -> list[str]:
        """`publish_many` for synchronous code."""
        return self.run_sync(lambda: self.publish_many(messages))

    async def close(self) -> None:
        """Close the publishing connection this app opened (not a consumer's)."""
        closer, self._closer, self._publisher, self._loop = self._closer, None, None, None
        self._caller = None
        if closer is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nothing left to close
                closer.get_loop().call_soon_threadsafe(closer.cancel)  # it closes on its loop
            if closer.get_loop() is _running_loop():
                await asyncio.wait([closer])

    async def __aenter__(self) -> App:
        await (await self.publisher()).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def run_sync(
        self,
        make: Callable[[], Coroutine[Any, Any, T]],
        timeout: float = SYNC_PUBLISH_TIMEOUT_SECONDS,
    ) -> T:
        """Run a coroutine on the app's publishing loop from synchronous code, and wait."""
        loop = self._loop
        if loop is None or not loop.is_running():
            with self._sync_lock:
                if self._loop_thread is None:
                    self._loop_thread = _LoopThread()
                    atexit.register(self.close_sync)
                loop = self._loop_thread.loop
        elif _running_loop() is loop:
            raise ConfigError("publish_sync was called on the event loop; use await publish()")
        return asyncio.run_coroutine_threadsafe(make(), loop).result(timeout)

    def close_sync(self) -> None:
        """Close the connection and thread that `publish_sync` opened."""
        thread = self._loop_thread
        if thread is None:
            return
        if self._closer is not None and self._loop is thread.loop:
            with contextlib.suppress(Exception):  # closing at exit: no one left to report it to
                asyncio.run_coroutine_threadsafe(self.close(), thread.loop).result(10)
        thread.stop()
        self._loop_thread = None


async def _close_when_cancelled(publisher: Publisher) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await publisher.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
