"""The names and attributes of rabbitq's spans as tables (`_trace_names`), and what `_tracing`
does with untrusted headers and without a provider (the spans themselves:
tests/broker/test_tracing.py)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from opentelemetry import trace

from rabbitq import _ladder as ladder
from rabbitq import _trace_names as names
from rabbitq import _tracing as tracing
from rabbitq._errors import ParkReason, Poison
from rabbitq._outcome import Outcome, ParkNow, Recount, RetryIn, Succeeded
from rabbitq._wire import HEADER_DROPPED, Outgoing, keep_own_headers

DELAYED = ladder.route("ns", "emails", 13)


@pytest.mark.parametrize(
    ("exchange", "routing_key", "queue", "name"),
    [
        ("ns.tasks", "emails", None, "ns.tasks:emails"),
        ("", "emails", None, "emails"),
        ("ns.tasks", "", None, "ns.tasks"),
        ("", "", None, "amq.default"),
        ("ns.tasks", "emails", "ns.emails.work", "ns.tasks:emails:ns.emails.work"),
        ("", "ns.emails.work", "ns.emails.work", "ns.emails.work"),  # default exchange
        ("ns.tasks", "q", "q", "ns.tasks:q"),  # key and queue equal: once
    ],
)
def test_destination_names_follow_the_rabbitmq_conventions(exchange, routing_key, queue, name):
    """Producer `{exchange}:{routing key}`, consumer `...:{queue}`, empty parts left out."""
    assert names.destination_name(exchange, routing_key, queue) == name


@pytest.mark.parametrize(
    ("exchange", "routing_key", "queue", "template"),
    [
        (DELAYED.exchange, DELAYED.routing_key, None, "ns.delay.{level}:{delay}.emails"),
        (
            "ns.delay.due",
            DELAYED.routing_key,
            "ns.emails.work",
            "ns.delay.due:{delay}.emails:ns.emails.work",
        ),
        ("ns.tasks", "emails", None, None),
        ("ns.tasks", "1.0.emails", None, None),  # not 28 digits
    ],
)
def test_a_delayed_task_gets_a_template_without_its_delay(exchange, routing_key, queue, template):
    """The ladder's keys carry the delay: the template replaces it (and the level)."""
    assert names.destination_template(exchange, routing_key, queue) == template


def test_span_names_are_the_operation_and_the_destination():
    assert names.span_name("publish", "ns.tasks:emails") == "publish ns.tasks:emails"
    assert names.span_name("publish", "") == "publish"


def test_publish_attributes_use_the_current_messaging_names():
    """No `messaging.destination` / `messaging.operation` of the old conventions."""
    attributes = names.publish_attributes("ns.tasks", "emails", "id-1", "emails.send")
    assert attributes == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": "ns.tasks:emails",
        "messaging.rabbitmq.destination.routing_key": "emails",
        "messaging.message.id": "id-1",
        "rabbitq.task": "emails.send",
    }
    created = names.publish_attributes("ns.tasks", "emails", "", None, operation="create")
    assert created["messaging.operation.type"] == created["messaging.operation.name"] == "create"
    assert "messaging.message.id" not in created and "rabbitq.task" not in created
    delayed = names.publish_attributes(DELAYED.exchange, DELAYED.routing_key, "i", None)
    assert delayed["messaging.destination.template"] == "ns.delay.{level}:{delay}.emails"


@pytest.mark.parametrize(
    ("destinations", "count", "expected"),
    [
        ({"ns.tasks:a"}, 3, {"messaging.destination.name": "ns.tasks:a"}),
        ({"ns.tasks:a", "ns.tasks:b"}, 2, {}),  # several: no one destination
    ],
)
def test_a_batch_names_its_destination_only_when_it_has_one(destinations, count, expected):
    attributes = names.batch_attributes(destinations, count)
    assert attributes == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.batch.message_count": count,
        **expected,
    }


def test_process_attributes_name_the_queue_and_the_delivery():
    attributes = names.process_attributes(
        exchange="ns.tasks",
        routing_key="emails",
        queue="ns.emails.work",
        message_id="id-1",
        delivery_tag=7,
        correlation_id="c-1",
        task="emails.send",
        workload="emails",
    )
    assert attributes == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "ns.tasks:emails:ns.emails.work",
        "messaging.rabbitmq.destination.routing_key": "emails",
        "messaging.rabbitmq.message.delivery_tag": 7,
        "messaging.message.id": "id-1",
        "messaging.message.conversation_id": "c-1",
        "rabbitq.task": "emails.send",
        "rabbitq.workload": "emails",
    }


class Boom(Exception):
    pass


@pytest.mark.parametrize(
    ("outcome", "error", "tier", "expected", "failed"),
    [
        (Succeeded(), None, None, {"rabbitq.outcome": "succeeded"}, False),
        (
            RetryIn(0),
            Boom("x"),
            "1s",
            {
                "rabbitq.outcome": "retried",
                "rabbitq.retry.tier": "1s",
                "error.type": "tests.unit.test_tracing.Boom",
            },
            True,
        ),
        (
            ParkNow(ParkReason.RETRIES_EXHAUSTED),
            ValueError("x"),
            None,
            {
                "rabbitq.outcome": "parked",
                "rabbitq.park.reason": "retries_exhausted",
                "error.type": "ValueError",
            },
            True,
        ),
        (
            ParkNow(ParkReason.INVALID_PAYLOAD),
            Poison(ParkReason.INVALID_PAYLOAD, "no"),
            None,
            {
                "rabbitq.outcome": "parked",
                "rabbitq.park.reason": "invalid_payload",
                "error.type": "invalid_payload",  # poison: no handler ran, the reason says it
            },
            True,
        ),
        (
            Recount(2),
            None,
            None,
            {"rabbitq.outcome": "redelivered", "rabbitq.redeliveries": 2},
            False,
        ),
    ],
)
def test_an_outcome_says_what_became_of_the_attempt(
    outcome: Outcome,
    error: BaseException | None,
    tier: str | None,
    expected: dict[str, Any],
    failed: bool,
) -> None:
    attributes, did_fail = names.outcome_attributes(outcome, 2, error, tier)
    assert attributes == {"rabbitq.attempt": 2, **expected}
    assert did_fail is failed


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    ("headers", "trace_id"),
    [
        ({"traceparent": TRACEPARENT}, 0x0AF7651916CD43DD8448EB211C80319C),
        ({"traceparent": TRACEPARENT, "tracestate": "a=b"}, 0x0AF7651916CD43DD8448EB211C80319C),
        (None, None),
        ({}, None),
        ({"traceparent": b"\xff\x00"}, 0),  # a message carries anything: no parent then
        ({"traceparent": 7}, 0),
        ({"traceparent": ["x"]}, 0),
        ({"traceparent": "00-zz-yy-01"}, 0),
        ({"traceparent": "x" * 10_000}, 0),
    ],
)
def test_a_creation_context_is_read_only_from_a_well_formed_traceparent(headers, trace_id):
    context = tracing.creation_context(headers)
    if trace_id is None:
        assert context is None
    else:
        assert trace.get_current_span(context).get_span_context().trace_id == trace_id


@pytest.mark.parametrize(
    ("value", "kept"),
    [(TRACEPARENT, True), ("a=b", True), ("x" * 513, False), (b"raw", False)],
)
def test_a_copy_whose_headers_cannot_travel_keeps_its_trace_context(value, kept):
    """Only rabbitq's headers and a plausible trace context survive a drop."""
    headers = {"rabbitq-attempt": 2, "traceparent": value, "tracestate": value, "other": 1}
    out = keep_own_headers(headers, "too big")
    assert out[HEADER_DROPPED] == "too big" and "other" not in out
    assert ("traceparent" in out) is kept and ("tracestate" in out) is kept


def test_without_a_provider_nothing_is_made_and_no_header_is_added():
    """The API alone (no `set_tracer_provider`): no spans, no trace context in the headers."""
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert tracing.active_tracer() is None
    out = Outgoing(exchange="ns.tasks", routing_key="w", body=b"{}", message_id="i", headers={})
    assert tracing.start_send(out) is None
    with tracing.sending_batch([out]) as span:
        assert span is None
    assert out.headers == {}


SET_LATER = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from rabbitq import _tracing
assert _tracing.active_tracer() is None
trace.set_tracer_provider(TracerProvider())
assert _tracing.active_tracer() is not None
print("ok")
"""


def test_a_provider_set_after_the_first_publish_is_used_from_then_on():
    """The no-provider check is cheap, not cached: the app may set its provider late."""
    # the cheap check reads the API's global; were it renamed, every check would take the
    # slow path (correct, some 10k instructions a delivery more)
    assert hasattr(trace, "_TRACER_PROVIDER")
    done = subprocess.run(
        [sys.executable, "-c", SET_LATER], capture_output=True, text=True, timeout=30
    )
    assert done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize(
    ("url", "attributes"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/",
         {"server.address": "127.0.0.1", "server.port": 5672}),
        ("amqp://app:s3cret@mq.example/prod",
         {"server.address": "mq.example", "server.port": 5672}),
        ("amqps://app:s3cret@mq.example/?cacertfile=/ca.pem",
         {"server.address": "mq.example", "server.port": 5671}),
        ("amqp://[::1]:5673/", {"server.address": "::1", "server.port": 5673}),
        ("amqp://h:notaport/", {}),
        ("not a url", {}),
    ],
)  # fmt: skip
def test_server_attributes_are_the_host_and_port_never_the_credentials(
    url: str, attributes: dict[str, Any]
) -> None:
    assert names.server_attributes(url) == attributes
