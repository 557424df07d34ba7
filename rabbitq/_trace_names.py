"""The names and attributes of rabbitq's spans (`_tracing`): pure functions, no OpenTelemetry.

After the OpenTelemetry messaging conventions as they stand (messaging-spans.md and rabbitmq.md
of open-telemetry/semantic-conventions): a span is named `{messaging.operation.name}
{destination}`, the destination being `messaging.destination.template` where there is one (a
delayed task's, whose routing key holds its delay), else `messaging.destination.name`:
`{exchange}:{routing key}` for a producer, `{exchange}:{routing key}:{queue}` for a consumer.
rabbitq's own facts (task, workload, attempt, outcome) are `rabbitq.*` attributes.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from rabbitq._errors import Poison
from rabbitq._ladder import LEVELS
from rabbitq._outcome import Outcome, ParkNow, Recount, RetryIn, Succeeded

SYSTEM = "rabbitmq"

Attributes = dict[str, str | int]


def destination_name(exchange: str, routing_key: str, queue: str | None = None) -> str:
    """`messaging.destination.name` as rabbitmq.md defines it.

    Producer side (`queue` None): `{exchange}:{routing key}`, or the one that is not empty, or
    `amq.default`. Consumer side: `{exchange}:{routing key}:{queue}`, empty parts left out,
    and the queue left out when it equals the routing key.
    """
    parts = [exchange, routing_key]
    if queue is not None and queue != routing_key:
        parts.append(queue)
    return ":".join(p for p in parts if p) or "amq.default"


_LADDER_KEY = re.compile(rf"(?:[01]\.){{{LEVELS}}}")
_LADDER_LEVEL = re.compile(r"\.delay\.\d\d$")


def destination_template(exchange: str, routing_key: str, queue: str | None = None) -> str | None:
    """`messaging.destination.template` of a delayed task (its key holds its delay, one name
    per delay), with the delay and the ladder level as placeholders; None for other keys."""
    match = _LADDER_KEY.match(routing_key)
    if match is None:
        return None
    workload = routing_key[match.end() :]
    exchange = _LADDER_LEVEL.sub(".delay.{level}", exchange)
    return destination_name(exchange, f"{{delay}}.{workload}", queue)


# the ports the AMQP URI spec gives each scheme when the URL leaves the port out
_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}


def server_attributes(node_url: str) -> Attributes:
    """`server.address` and `server.port` of the node a span's message goes through or came
    from: the host and port of its URL, never the credentials; nothing if the URL has no host."""
    try:
        parts = urlsplit(node_url)
        port = parts.port
    except ValueError:  # a port that is not a number: the connection fails on its own
        return {}
    if not parts.hostname:
        return {}
    return {
        "server.address": parts.hostname,
        "server.port": port or _DEFAULT_PORTS.get(parts.scheme, 5672),
    }


def span_name(operation: str, destination: str) -> str:
    """`{messaging.operation.name} {destination}`; the operation alone without a destination."""
    return f"{operation} {destination}" if destination else operation


def _destination(exchange: str, routing_key: str, queue: str | None = None) -> Attributes:
    attributes: Attributes = {
        "messaging.destination.name": destination_name(exchange, routing_key, queue)
    }
    if routing_key:
        attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
    template = destination_template(exchange, routing_key, queue)
    if template is not None:
        attributes["messaging.destination.template"] = template
    return attributes


def publish_attributes(
    exchange: str, routing_key: str, message_id: str, task: str | None, operation: str = "send"
) -> Attributes:
    """The attributes of a message's producer span: `send` (one publish) or `create` (one
    message of a batch)."""
    attributes: Attributes = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": operation,
        "messaging.operation.name": "publish" if operation == "send" else operation,
        **_destination(exchange, routing_key),
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    if task:
        attributes["rabbitq.task"] = task
    return attributes


def batch_attributes(destinations: set[str], count: int) -> Attributes:
    """The attributes of a batch publish's span; the destination only if all share one."""
    attributes: Attributes = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.batch.message_count": count,
    }
    if len(destinations) == 1:
        attributes["messaging.destination.name"] = next(iter(destinations))
    return attributes


def process_attributes(
    *,
    exchange: str,
    routing_key: str,
    queue: str,
    message_id: str | None,
    delivery_tag: int,
    correlation_id: str | None,
    task: str | None,
    workload: str,
) -> Attributes:
    """The attributes a delivery's process span starts with (the outcome comes later)."""
    attributes: Attributes = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        **_destination(exchange, routing_key, queue),
        "messaging.rabbitmq.message.delivery_tag": delivery_tag,
        "rabbitq.workload": workload,
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    if correlation_id:
        attributes["messaging.message.conversation_id"] = correlation_id
    if task:
        attributes["rabbitq.task"] = task
    return attributes


def error_type(error: BaseException) -> str:
    """`error.type`: the exception's class, or for poison (no handler ran) its park reason."""
    if isinstance(error, Poison):
        return str(error.reason)
    cls = type(error)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def outcome_attributes(
    outcome: Outcome, attempt: int, error: BaseException | None, tier: str | None = None
) -> tuple[Attributes, bool]:
    """What a settled outcome adds to its process span, and whether the attempt failed."""
    attributes: Attributes = {"rabbitq.attempt": attempt}
    failed = False
    if isinstance(outcome, Succeeded):
        attributes["rabbitq.outcome"] = "succeeded"
    elif isinstance(outcome, Recount):
        attributes["rabbitq.outcome"] = "redelivered"
        attributes["rabbitq.redeliveries"] = outcome.redeliveries
    elif isinstance(outcome, RetryIn):
        attributes["rabbitq.outcome"] = "retried"
        if tier is not None:
            attributes["rabbitq.retry.tier"] = tier
        failed = True
    elif isinstance(outcome, ParkNow):
        attributes["rabbitq.outcome"] = "parked"
        attributes["rabbitq.park.reason"] = str(outcome.reason)
        failed = True
    if failed and error is not None:
        attributes["error.type"] = error_type(error)
    return attributes, failed
