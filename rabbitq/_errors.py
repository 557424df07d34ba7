"""Every error rabbitq raises, the two signals a handler may raise, and why tasks are parked.

The tree::

    RabbitqError
    ├── TopologyError
    │   ├── TopologyInvalid        a topology file does not validate
    │   ├── TopologyDrift          a queue exists with other arguments than declared
    │   └── TopologyMissing        an exchange or queue the consumer needs does not exist
    ├── ConnectionFailed           the broker cannot be reached
    ├── AccessRefused              the user lacks a permission (403 ACCESS_REFUSED)
    ├── SessionLost                a consumer's connection went away (it reconnects)
    ├── PublishError
    │   ├── NotConfirmed           the broker nacked, or the confirm did not come in time
    │   ├── Unroutable             the message was returned: no queue is bound for it
    │   └── PublishRefused         the user may not publish to the exchange (an AccessRefused)
    ├── TaskError
    │   ├── Poison                 a message that cannot be run; parked at once with a reason
    │   └── HandlerTimeout         a handler outran its timeout (also a TimeoutError)
    ├── CallError                  `Task.call` got no result
    │   ├── TaskFailed             the task was parked (retries exhausted, Park, poison)
    │   ├── CallTimeout            no result within the timeout (also a TimeoutError)
    │   ├── CallLost               the caller's channel closed while it waited
    │   └── ReplyInvalid           the reply could not be read as the task's result
    └── ConfigError                an App, task or option is used wrongly
        └── UsageError             a command line is wrong (the CLI exits 2)

    Retry(delay_seconds=...)       a handler asks to be retried after at least this delay
    Park(reason=...)               a handler asks to be parked at once, without retrying

    ParkReason                     why a task is in the parking lot (`Failure.reason`)

Messages are one sentence, lower-case first, no final period; each exception carries its
facts as attributes so the CLI can render them without parsing strings. This module imports
nothing from the broker side.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ParkReason(StrEnum):
    """Why a task is in the parking lot (the `rabbitq-park-reason` header). Bounded: usable as a
    metric label."""

    TOO_LARGE = "too_large"
    BAD_ENVELOPE = "bad_envelope"
    UNKNOWN_TASK = "unknown_task"
    UNDECODABLE = "undecodable"
    INVALID_PAYLOAD = "invalid_payload"
    EXPIRED = "expired"
    RETRIES_EXHAUSTED = "retries_exhausted"
    PARKED_BY_HANDLER = "parked_by_handler"
    NOT_RETRYABLE = "not_retryable"
    UNROUTABLE_RETRY = "unroutable_retry"
    CRASH_LOOP = "crash_loop"


class RabbitqError(Exception):
    """Base class of every error rabbitq raises on purpose."""

    #: the CLI's exit code for this error
    exit_code: int = 1

    def facts(self) -> dict[str, Any]:
        """The error's attributes, for `--json` output."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class ConfigError(RabbitqError):
    """An App, task, option or setting is used wrongly."""


class UsageError(ConfigError):
    """A command line names something wrongly: a bad option value or an unknown workload."""

    exit_code = 2


class TopologyError(RabbitqError):
    """Something is wrong with the declared or the actual topology."""


class TopologyInvalid(TopologyError):
    """A topology file does not validate; `field`, `value` and `problem` are the first problem."""

    def __init__(
        self, file: str, field: str, value: Any, problem: str, *more: tuple[str, Any, str]
    ) -> None:
        self.file, self.field, self.value, self.problem = file, field, value, problem
        self.problems = [
            f"{f} = {v!r}: {p}" if f else p for f, v, p in ((field, value, problem), *more)
        ]
        super().__init__(f"{file}: {'; '.join(self.problems)}")


class TopologyDrift(TopologyError):
    """An object exists on the broker with other arguments than the topology declares."""

    exit_code = 3

    def __init__(
        self, kind: str, name: str, argument: str, declared: str, found: str, more: int = 0
    ) -> None:
        self.kind, self.name, self.argument = kind, name, argument
        self.declared, self.found, self.more = declared, found, more
        tail = f" (and {more} more drifted objects)" if more else ""
        super().__init__(
            f"{kind} {name!r} has {argument}={found} but the topology declares {declared}; "
            f"arguments cannot change in place: drain and delete the {kind} and run "
            f"'rabbitq topology apply', or change the topology back{tail}"
        )


class CheckFailed(RabbitqError):
    """`rabbitq check` found the broker not as the app needs it (exit 3, as drift)."""

    exit_code = 3

    def __init__(self, failed: int, check: str, subject: str) -> None:
        self.failed, self.check, self.subject = failed, check, subject
        more = f" and {failed - 1} more" if failed > 1 else ""
        super().__init__(f"{failed} check(s) failed: {check} on {subject}{more}; see above")


class ParkingBusy(RabbitqError):
    """Another reader held the parking lot for longer than a read waits."""

    def __init__(self, queue: str, waited: float) -> None:
        self.queue, self.waited = queue, waited
        super().__init__(
            f"{queue} was being read by another consumer for {waited:.0f}s (parking list, "
            "replay or purge, the console, or a consumer of your own); try again"
        )


class TopologyMissing(TopologyError):
    """An exchange or queue the consumer needs does not exist."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name
        super().__init__(f"{kind} {name!r} does not exist; run 'rabbitq topology apply' first")


class ConnectionFailed(RabbitqError):
    """The broker cannot be reached or refused us."""

    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = url, reason  # the url is always masked
        super().__init__(f"cannot connect to {url}: {reason}")


class AccessRefused(RabbitqError):
    """The broker refused an operation (403 ACCESS_REFUSED): the user lacks a permission.

    Attributes:
        user: the user the broker named.
        permission: what the operation needs ("configure", "write", "read", or several).
        action: the operation in words ("publish to", "consume from", "declare").
        kind, name, vhost: the exchange or queue it was refused on.
    """

    def __init__(
        self, user: str, permission: str, action: str, kind: str, name: str, vhost: str
    ) -> None:
        self.user, self.permission, self.action = user, permission, action
        self.kind, self.name, self.vhost = kind, name, vhost
        super().__init__(
            f"user {user!r} may not {action} {kind} {name!r} in vhost {vhost!r} (ACCESS_REFUSED, "
            f"it needs {permission}): grant it with 'rabbitq topology permissions'"
        )


class SessionLost(RabbitqError):
    """A consumer's connection or channel went away under it; it reconnects."""


class QueueUnavailable(SessionLost):
    """A queue exists but its node is down or cut off (a classic queue on a cluster).

    Not a mistake in the topology: the consumer waits for the node as for any outage.
    """

    def __init__(self, name: str, detail: str) -> None:
        self.name, self.detail = name, detail
        super().__init__(f"queue {name!r} is unavailable: {detail}")


class PublishError(RabbitqError):
    """A publish was not confirmed by the broker; the message may or may not be queued."""


class NotConfirmed(PublishError):
    """The broker nacked the message, or its confirm did not arrive in time."""

    def __init__(self, message_id: str, reason: str, *, nacked: bool = False) -> None:
        self.message_id, self.reason = message_id, reason
        self.nacked = nacked  # the broker said no (rather than: no answer)
        super().__init__(f"message {message_id!r} was not confirmed by the broker: {reason}")


class Unroutable(PublishError):
    """The broker returned the message: no queue is bound for its exchange and routing key."""

    def __init__(
        self, message_id: str, exchange: str, routing_key: str, missing_queue: str = ""
    ) -> None:
        self.message_id, self.exchange, self.routing_key = message_id, exchange, routing_key
        what = (
            f"was not sent: queue {missing_queue!r}, where it is to run, does not exist"
            if missing_queue
            else "was returned unroutable"
        )
        super().__init__(
            f"message {message_id!r} to exchange {exchange!r} with routing key {routing_key!r} "
            f"{what}; run 'rabbitq topology apply' or check the workload name"
        )


class PublishRefused(PublishError, AccessRefused):
    """The user may not publish to the exchange: nothing was sent (the broker closed the
    channel before routing it)."""


class TaskError(RabbitqError):
    """A task message cannot be matched to a handler or payload."""


class Poison(TaskError):
    """The message cannot be run at all (too big, not a task, bad payload, unknown, expired):
    it is parked at once with `reason`; failure hooks see it as the error."""

    def __init__(self, reason: ParkReason, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


class HandlerTimeout(TaskError, TimeoutError):
    """A handler ran longer than its task's `timeout_seconds`; the task takes the retry path."""


class Retry(Exception):
    """Raised by a handler to be retried after at least `delay_seconds`.

    The task goes to the shortest retry tier whose delay is at least `delay_seconds` (the
    longest tier if none is that long). It still counts as an attempt: a task that keeps
    asking to be retried is parked when its attempts run out.
    """

    def __init__(self, delay_seconds: float = 0.0, reason: str = "") -> None:
        self.delay_seconds, self.reason = delay_seconds, reason
        super().__init__(reason or f"retry requested after {delay_seconds}s")


class Park(Exception):
    """Raised by a handler to park the task at once: the error will not go away by retrying."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class CallError(RabbitqError):
    """`Task.call` returned no result: the task failed, or the caller stopped waiting."""


class TaskFailed(CallError):
    """The called task ended in the parking lot; its facts are those of the parked copy.

    Attributes:
        task: the task name.
        message_id: the task's id (find it with `rabbitq parking show`).
        reason: why it was parked (a `ParkReason` value, as the consumer sent it).
        error_type: the type of the error that parked it (`Poison` when it never ran).
        error: the error's message, scrubbed and bounded as on the parked copy.
    """

    def __init__(
        self, task: str, message_id: str, reason: str, error_type: str, error: str
    ) -> None:
        self.task, self.message_id = task, message_id
        self.reason, self.error_type, self.error = reason, error_type, error
        super().__init__(
            f"task {task!r} (message {message_id!r}) was parked ({reason}): {error_type}: {error}"
        )


class CallTimeout(CallError, TimeoutError):
    """No result came within the call's timeout; the task is not cancelled and may still run."""

    def __init__(self, task: str, message_id: str, timeout: float) -> None:
        self.task, self.message_id, self.timeout = task, message_id, timeout
        super().__init__(
            f"no result for task {task!r} (message {message_id!r}) within {timeout}s; the task "
            "is not cancelled and may still run, but its result will not reach this caller"
        )


class CallLost(CallError):
    """The caller's channel or connection closed while it waited: the reply can never come."""

    def __init__(self, task: str, message_id: str, detail: str) -> None:
        self.task, self.message_id, self.detail = task, message_id, detail
        super().__init__(
            f"lost the channel while waiting for task {task!r} (message {message_id!r}): "
            f"{detail}; the task may still run, but its result will not reach this caller"
        )


class ReplyInvalid(CallError):
    """The reply to a call is not a result of the task's return type (untrusted input)."""

    def __init__(self, task: str, message_id: str, problem: str) -> None:
        self.task, self.message_id, self.problem = task, message_id, problem
        super().__init__(
            f"the reply to task {task!r} (message {message_id!r}) is invalid: {problem}"
        )


#: what a publish that failed raises (or, in a batch, reports per message)
SendError = PublishError | ConnectionFailed
