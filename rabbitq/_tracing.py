"""OpenTelemetry traces of publishes and of each delivery's processing (the `otel` extra).

When `opentelemetry-api` is importable (`pip install 'rabbitq[otel]'`), spans go to the
TracerProvider the app set (`trace.set_tracer_provider`); until it sets one there would only be
the API's no-op spans, so nothing is made (`active_tracer`). When the API is not importable,
`ENABLED` is False and the publish and consume paths skip everything here after that check.

What is traced, after the OpenTelemetry messaging conventions as they stand (messaging-spans.md
and rabbitmq.md of open-telemetry/semantic-conventions, still "development"): their current
`messaging.*` names, not the older `messaging.destination` / `messaging.operation` that
opentelemetry-instrumentation-aio-pika writes.

* a publish of one message (`Task.publish`, `publish_sync`, `call`, delayed or not) is one
  PRODUCER span `publish {exchange}:{routing key}` (operation type `send`), from before the
  write to the broker's confirm; its context is the message's creation context, injected into
  the headers as W3C `traceparent`/`tracestate` by the API's propagator;
* `publish_many` is a PRODUCER `create` span per message, whose context that message carries,
  and one CLIENT `publish` span for the batch that links to each;
* a delivery is one CONSUMER span `process {exchange}:{routing key}:{queue}` (operation type
  `process`), from decoding to the settling of its outcome, a child of the creation context the
  message carries (rabbitq's consumer has no ambient span, so the conventions' "MAY" for single
  messages is taken). Retried, recounted and parked copies keep the headers of the original
  (`_wire`), so a task's publish, each attempt's processing and its park are one trace. The span
  says the outcome (`rabbitq.outcome`: succeeded, retried, parked, redelivered, requeued), the
  attempt, the tier or the park reason; a failed attempt records its exception and status ERROR.

A delayed task's routing key carries its delay in binary (`_ladder`), so its span names use the
low-cardinality `messaging.destination.template` (`NS.delay.{level}:{delay}.W`) instead of the
name. Headers are untrusted: a `traceparent` that is not a string of the W3C form is ignored.

The names and attributes are `_trace_names`' pure functions; here they meet the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from rabbitq._connection import current_node
from rabbitq._outcome import Outcome
from rabbitq._trace_names import (
    Attributes,
    batch_attributes,
    error_type,
    outcome_attributes,
    process_attributes,
    publish_attributes,
    server_attributes,
    span_name,
)

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.propagators.textmap import Getter
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
except ImportError:  # the `otel` extra is not installed: tracing is off
    ENABLED = False
else:
    ENABLED = True

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from rabbitq._amqp import Delivery
    from rabbitq._wire import Outgoing

# The API: spans ---------------------------------------------------------------------------------

_tracer: Tracer | None = None
# whether OTEL_PYTHON_TRACER_PROVIDER names a provider for the API to make; read at first use
_provider_from_env: bool | None = None


def active_tracer() -> Tracer | None:
    """rabbitq's tracer once the app has set a TracerProvider, else None.

    Until then every span would be the API's no-op one: rather than build names, attributes
    and no-op spans per message (some 10 us a delivery), nothing is done, and no context is
    passed on. The API lets a provider be set once, so the tracer is taken once.
    """
    global _tracer, _provider_from_env
    if _tracer is not None:
        return _tracer
    if _provider_from_env is None:
        _provider_from_env = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
    # `get_tracer_provider()` looks the provider's environment variable up each time, a
    # KeyError raised and caught (some 10k instructions a delivery); the API keeps the one set
    # in `_TRACER_PROVIDER`, so while that is None and the variable unset there is none
    if not _provider_from_env and getattr(trace, "_TRACER_PROVIDER", False) is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    try:
        own: str | None = version("rabbitq")
    except PackageNotFoundError:
        own = None
    _tracer = provider.get_tracer("rabbitq", own)
    return _tracer


def _named(operation: str, attributes: Attributes) -> str:
    destination = attributes.get("messaging.destination.template") or attributes.get(
        "messaging.destination.name", ""
    )
    return span_name(operation, str(destination))


def _server(url: str | None) -> Attributes:
    """The node a connection to `url` uses now (the one that last answered), as attributes."""
    return {} if url is None else server_attributes(current_node(url))


def start_send(out: Outgoing, url: str | None = None) -> Span | None:
    """Start the producer span of one publish to `url`'s broker and put its context into
    `out`'s headers; None if no provider is set."""
    tracer = active_tracer()
    if tracer is None:
        return None
    attributes = publish_attributes(out.exchange, out.routing_key, out.message_id, out.task)
    attributes |= _server(url)
    span = tracer.start_span(
        _named("publish", attributes), kind=SpanKind.PRODUCER, attributes=attributes
    )
    propagate.inject(out.headers, context=trace.set_span_in_context(span))
    return span


def end(span: Span | None, error: BaseException | None = None) -> None:
    """End a span (once: a span already ended is left as it is), as failed if `error`."""
    if span is None or not span.is_recording():
        return
    if error is not None:
        _fail(span, error)
    span.end()


@contextlib.contextmanager
def sending(out: Outgoing, url: str | None = None) -> Iterator[Span | None]:
    """`start_send` and `end` around a publish."""
    with _ending(start_send(out, url)) as span:
        yield span


@contextlib.contextmanager
def _ending(span: Span | None) -> Iterator[Span | None]:
    """`span` for the body, ended after it with what it raised."""
    try:
        yield span
    except BaseException as exc:
        end(span, exc)
        raise
    end(span)


@contextlib.contextmanager
def sending_batch(messages: Sequence[Outgoing], url: str | None = None) -> Iterator[Span | None]:
    """A `create` span per message (its context into that message's headers), then the batch's
    span to `url`'s broker, linked to each, around the publish."""
    tracer = active_tracer()
    if tracer is None:
        yield None
        return
    links = []
    destinations = set()
    for out in messages:
        attributes = publish_attributes(
            out.exchange, out.routing_key, out.message_id, out.task, operation="create"
        )
        destinations.add(str(attributes["messaging.destination.name"]))
        create = tracer.start_span(
            _named("create", attributes), kind=SpanKind.PRODUCER, attributes=attributes
        )
        propagate.inject(out.headers, context=trace.set_span_in_context(create))
        create.end()
        links.append(Link(create.get_span_context()))
    attributes = batch_attributes(destinations, len(messages)) | _server(url)
    span = tracer.start_span(
        _named("publish", attributes), kind=SpanKind.CLIENT, attributes=attributes, links=links
    )
    with _ending(span):
        yield span


if ENABLED:  # a class of the API's: only where it is installed

    class _HeaderGetter(Getter[Mapping[str, Any]]):
        """Reads the trace headers of a delivery: strings only (a header is untrusted input)."""

        def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
            value = carrier.get(key)
            return [value] if isinstance(value, str) else None

        def keys(self, carrier: Mapping[str, Any]) -> list[str]:
            return [k for k in carrier if isinstance(k, str)]

    _GETTER = _HeaderGetter()


def creation_context(headers: Mapping[str, Any] | None) -> otel_context.Context | None:
    """The creation context a delivery carries, if any (None: the span starts a trace)."""
    if not headers or "traceparent" not in headers:
        return None
    try:
        return propagate.extract(headers, getter=_GETTER)
    except Exception:  # a propagator that chokes on what a message carries: no parent then
        return None


class Processing:
    """The process span of one delivery, current while it is handled (`start_process`)."""

    __slots__ = ("span", "_token")

    def __init__(self, span: Span) -> None:
        self.span = span
        # current while the handler runs: the tasks it publishes are children of this span
        self._token = otel_context.attach(trace.set_span_in_context(span))

    def close(self, error: BaseException | None = None) -> None:
        otel_context.detach(self._token)
        if isinstance(error, asyncio.CancelledError):
            # the consumer stopped or lost its connection: the broker delivers it again
            self.span.set_attribute("rabbitq.outcome", "requeued")
            error = None
        end(self.span, error)


def start_process(
    message: Delivery, queue: str, workload: str, url: str | None = None
) -> Processing | None:
    """Start a delivery's process span (it came from `url`'s broker), a child of the creation
    context it carries; None if no provider is set."""
    tracer = active_tracer()
    if tracer is None:
        return None
    props = message.properties
    attributes = process_attributes(
        exchange=message.exchange,
        routing_key=message.routing_key,
        queue=queue,
        message_id=props.message_id,
        delivery_tag=message.tag,
        correlation_id=props.correlation_id,
        task=props.message_type,
        workload=workload,
    ) | _server(url)
    span = tracer.start_span(
        _named("process", attributes),
        context=creation_context(props.headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    )
    return Processing(span)


def record_outcome(
    outcome: Outcome,
    attempt: int,
    error: BaseException | None,
    tier: str | None,
    clean: Callable[[str], str],
) -> None:
    """Put a settled outcome on the current process span; `clean` scrubs the error's texts
    (a handler's library may quote the broker URL)."""
    if _tracer is None:  # no provider: no span was started
        return
    span = trace.get_current_span()
    if not span.is_recording():
        return
    attributes, failed = outcome_attributes(outcome, attempt, error, tier)
    span.set_attributes(attributes)
    if failed and error is not None:
        message = clean(str(error))
        stack = clean("".join(traceback.format_exception(error)))
        span.record_exception(error, {"exception.message": message, "exception.stacktrace": stack})
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {message}"[:500]))
    elif failed:
        span.set_status(Status(StatusCode.ERROR))


def record_requeued(reason: str) -> None:
    """The delivery went back to the queue (its copy was not confirmed): it runs again."""
    if _tracer is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("rabbitq.outcome", "requeued")
        span.set_status(Status(StatusCode.ERROR, reason))


def _fail(span: Span, error: BaseException) -> None:
    span.set_attribute("error.type", error_type(error))
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
