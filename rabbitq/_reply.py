"""The wire format of a result sent back over RabbitMQ's direct reply-to; encoded and decoded.

A caller publishes a task with `reply_to` "amq.rabbitmq.reply-to" and a `correlation_id`; the
broker rewrites `reply_to` to a name of the caller's channel ("amq.rabbitmq.reply-to.<token>").
The consumer answers once the task's outcome is final, on the default exchange with that name
as routing key:

* succeeded: `rabbitq-outcome` "succeeded", the result as JSON in the body;
* parked: `rabbitq-outcome` "parked", with the parked copy's `rabbitq-park-reason`,
  `rabbitq-park-error-type` and `rabbitq-park-error` headers (already scrubbed and bounded),
  and an empty body.

A retry sends nothing: the retried copy keeps `reply_to` and `correlation_id`, and its final
outcome answers. Replies are not stored: one whose caller is gone is dropped by the broker.

Pure: no I/O, no clock. A reply is untrusted input: whatever it carries that is not a result
of the task's type raises `ReplyInvalid` in the caller, never anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from rabbitq._errors import ReplyInvalid, TaskFailed
from rabbitq._wire import (
    HEADER_PARK_ERROR,
    HEADER_PARK_ERROR_TYPE,
    HEADER_PARK_REASON,
    MAX_ERROR_CHARS,
    Outgoing,
)

#: the pseudo-queue a caller consumes, and the `reply_to` it publishes with
REPLY_TO = "amq.rabbitmq.reply-to"
# What the broker rewrites `reply_to` to. Only such names are answered: a reply to any other
# name would go, over the default exchange, into whatever queue a message names.
REPLY_TO_PREFIX = REPLY_TO + "."
HEADER_OUTCOME = "rabbitq-outcome"
SUCCEEDED = "succeeded"
PARKED = "parked"
MAX_TYPE_CHARS = 200


def wants_reply(reply_to: str | None, correlation_id: str | None) -> bool:
    """Whether a delivery asks for a reply we may send: over direct reply-to, to match."""
    return bool(correlation_id) and reply_to is not None and reply_to.startswith(REPLY_TO_PREFIX)


def succeeded(reply_to: str, correlation_id: str, result_json: bytes) -> Outgoing:
    """The reply of a task whose handler returned `result_json`."""
    return _reply(reply_to, correlation_id, {HEADER_OUTCOME: SUCCEEDED}, result_json)


def parked(
    reply_to: str, correlation_id: str, reason: str, error_type: str, error: str
) -> Outgoing:
    """The reply of a task that was parked, with the facts its parked copy carries."""
    headers = {
        HEADER_OUTCOME: PARKED,
        HEADER_PARK_REASON: reason,
        HEADER_PARK_ERROR_TYPE: error_type[:MAX_TYPE_CHARS],
        HEADER_PARK_ERROR: error[:MAX_ERROR_CHARS],
    }
    return _reply(reply_to, correlation_id, headers, b"")


def _reply(reply_to: str, correlation_id: str, headers: dict[str, Any], body: bytes) -> Outgoing:
    return Outgoing(
        exchange="",  # the default exchange: direct reply-to names are routed from it
        routing_key=reply_to,
        body=body,
        message_id="",  # none of its own: the caller knows which task it called
        headers=headers,
        properties={"correlation_id": correlation_id},
        kind="reply",
    )


def result(
    body: bytes,
    headers: Mapping[str, Any] | None,
    *,
    task: str,
    message_id: str,
    load: Callable[[bytes], Any],
) -> Any:
    """The result a reply carries, read by `load` (the task's return type, from JSON).

    Raises:
        TaskFailed: the task was parked.
        ReplyInvalid: the reply is not one of ours, or its body does not load.
    """
    headers = headers or {}
    outcome = headers.get(HEADER_OUTCOME)
    if outcome == SUCCEEDED:
        try:
            return load(body)
        except ValidationError as exc:  # its text quotes the input: not that, only the problems
            problems = exc.errors(include_url=False, include_input=False)[:3]
            text = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(body)'}: {e['msg']}" for e in problems
            )
            raise ReplyInvalid(task, message_id, _bounded(text)) from None
        except Exception as exc:  # what a validator of the return type raised
            raise ReplyInvalid(task, message_id, _bounded(f"{type(exc).__name__}: {exc}")) from None
    if outcome == PARKED:
        raise TaskFailed(
            task,
            message_id,
            reason=_text(headers.get(HEADER_PARK_REASON), MAX_TYPE_CHARS),
            error_type=_text(headers.get(HEADER_PARK_ERROR_TYPE), MAX_TYPE_CHARS),
            error=_text(headers.get(HEADER_PARK_ERROR), MAX_ERROR_CHARS),
        )
    raise ReplyInvalid(task, message_id, f"header {HEADER_OUTCOME!r} is {_bounded(repr(outcome))}")


def _text(value: Any, limit: int) -> str:
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode(errors="replace")
    return (value if isinstance(value, str) else "" if value is None else repr(value))[:limit]


def _bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
