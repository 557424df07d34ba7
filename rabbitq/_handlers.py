"""Task definitions: a handler, the pydantic model it takes, and how it is called.

Pure of broker I/O. A handler is an async or a sync function taking one pydantic model and,
optionally, a `TaskContext`. Sync handlers run in a thread pool, never on the event loop: a
blocked loop misses heartbeats and the broker drops the connection with every task on it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, get_type_hints

from pydantic import BaseModel, TypeAdapter, ValidationError

from rabbitq import _tracing as tracing
from rabbitq._errors import ConfigError, HandlerTimeout, ParkReason, Poison
from rabbitq._outcome import TaskRules
from rabbitq._wire import error_text

P = TypeVar("P", bound=BaseModel)
R = TypeVar("R")

TASK_NAME_MAX = 200


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a handler may want to know about the delivery it runs.

    Attributes:
        message_id: the task's id (its idempotency key when one was given).
        task: the task name.
        workload: the workload it runs in.
        attempt: 1 on the first run, 2 on the first retry, ...
        deadline: seconds since the epoch after which the task is no use, or None.
        redelivered: the broker may have delivered this task before (a consumer died or the
            connection dropped mid-run): make side effects idempotent.
        priority: the message priority.
    """

    message_id: str
    task: str
    workload: str
    attempt: int
    deadline: float | None
    redelivered: bool
    priority: int


@dataclass(frozen=True, slots=True)
class Failure:
    """A task that failed, for the app's failure hooks (an error reporter such as Sentry).

    Attributes:
        workload: the workload it ran in.
        task: the task name, or None for a message that named none.
        message_id: the task's id, or None.
        attempt: the attempt that failed (0 for a message that could not be read).
        outcome: `retried`, `parked` or `expired`.
        reason: why it was parked (a `ParkReason` value), or None when it was retried.
        error: what the handler raised, or the `Poison` that stopped it before it ran.
        duration_seconds: how long the handler ran, or None if it did not run.
    """

    workload: str
    task: str | None
    message_id: str | None
    attempt: int
    outcome: str
    reason: str | None
    error: BaseException
    duration_seconds: float | None


FailureHook = Callable[[Failure], None]


ExceptionClasses = type[BaseException] | tuple[type[BaseException], ...]


class TaskDef(Generic[P, R]):
    """A registered handler: its name, workload, payload model, retry rules and how to call it."""

    def __init__(
        self,
        name: str,
        workload: str,
        fn: Callable[..., Any],
        timeout_seconds: float | None = None,
        rules: TaskRules | None = None,
    ) -> None:
        if not name or len(name) > TASK_NAME_MAX:
            raise ConfigError(f"task name {name!r} must be 1 to {TASK_NAME_MAX} characters")
        if timeout_seconds is not None and timeout_seconds <= 0:
            raise ConfigError(f"task {name!r} has timeout_seconds={timeout_seconds!r}; must be > 0")
        self.name = name
        self.workload = workload
        self.fn = fn
        self.timeout_seconds = timeout_seconds
        self.rules = rules or TaskRules()
        self.is_async = inspect.iscoroutinefunction(fn)
        self.model, self.wants_context, result = _inspect_handler(name, fn)
        self._result_adapter: TypeAdapter[Any] | None = (
            None if result is None else TypeAdapter(result)
        )

    def parse(self, body: bytes) -> P:
        """The payload model, validated straight from the JSON bytes.

        Raises:
            Poison: `undecodable` for bytes that are not JSON, `invalid_payload` otherwise.
        """
        try:
            return self.model.model_validate_json(body)  # type: ignore[return-value]  # model is P
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
            if errors and errors[0]["type"] == "json_invalid":
                detail = f"body is not JSON: {errors[0]['msg']}"
                raise Poison(ParkReason.UNDECODABLE, detail) from None
            raise Poison(ParkReason.INVALID_PAYLOAD, _summarise(exc)) from None
        except Exception as exc:  # a validator that raises something else is still bad input
            detail = f"the model raised {error_text(exc)}"
            raise Poison(ParkReason.INVALID_PAYLOAD, detail) from None

    def check_payload(self, payload: Any) -> BaseModel:
        """The payload to publish, validated before it leaves.

        Raises:
            ValidationError: the payload does not fit the model.
            ConfigError: the payload is an instance of another model.
        """
        if isinstance(payload, self.model):
            return payload
        if isinstance(payload, BaseModel):
            raise ConfigError(
                f"task {self.name!r} takes {self.model.__name__}, got {type(payload).__name__}"
            )
        return self.model.model_validate(payload)

    async def run(
        self, payload: BaseModel, ctx: TaskContext | None, executor: Executor | None
    ) -> Any:
        """Call the handler with its timeout; sync handlers go to `executor`.

        A sync handler that times out keeps its thread until it returns (threads cannot be
        killed); the task is treated as failed all the same.
        """
        args: tuple[Any, ...] = (payload, ctx) if self.wants_context else (payload,)
        if self.is_async:
            call = self.fn(*args)
        else:
            loop = asyncio.get_running_loop()
            if tracing.ENABLED:  # in the delivery's context: its tasks join its trace
                fn = functools.partial(contextvars.copy_context().run, self.fn, *args)
            else:
                fn = functools.partial(self.fn, *args)
            call = loop.run_in_executor(executor, fn)
        if self.timeout_seconds is None:
            result = await call
        else:
            try:
                async with asyncio.timeout(self.timeout_seconds) as scope:
                    result = await call
            except TimeoutError:
                if not scope.expired():
                    raise  # the handler's own TimeoutError, not ours
                raise HandlerTimeout(
                    f"handler ran longer than its timeout of {self.timeout_seconds}s"
                ) from None
        if self._result_adapter is not None:
            return self._result_adapter.validate_python(result)
        return result

    def dump_result(self, result: Any) -> bytes:
        """A result `run` returned, as the JSON a reply carries (`null` for no return type)."""
        if self._result_adapter is None:
            return b"null"
        return self._result_adapter.dump_json(result)

    def load_result(self, body: bytes) -> Any:
        """A reply's JSON as the handler's return type; None when it declares none.

        Raises:
            ValidationError: the JSON is not of the return type.
        """
        if self._result_adapter is None:
            return None
        return self._result_adapter.validate_json(body)


def task_rules(
    name: str,
    max_attempts: int | None = None,
    retry_on: ExceptionClasses | None = None,
    park_on: ExceptionClasses = (),
) -> TaskRules:
    """The rules `App.task` was given, checked.

    Raises:
        ConfigError: `max_attempts` is not an int >= 1, or `retry_on`/`park_on` is not an
            exception class or a tuple of them.
    """
    if max_attempts is not None and (
        not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1
    ):
        raise ConfigError(f"task {name!r} has max_attempts={max_attempts!r}; must be an int >= 1")
    return TaskRules(
        max_attempts=max_attempts,
        retry_on=None if retry_on is None else _exception_classes(name, "retry_on", retry_on),
        park_on=_exception_classes(name, "park_on", park_on),
    )


def _exception_classes(name: str, option: str, value: object) -> tuple[type[BaseException], ...]:
    classes = value if isinstance(value, tuple) else (value,)
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            raise ConfigError(
                f"task {name!r} has {option}={value!r}; must be an exception class or a tuple "
                "of exception classes"
            )
    return classes


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(body)"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _inspect_handler(name: str, fn: Callable[..., Any]) -> tuple[type[BaseModel], bool, Any | None]:
    """The payload model, whether the handler takes a context, and its result type."""
    try:
        hints = get_type_hints(fn)
    except Exception as exc:
        raise ConfigError(f"task {name!r}: cannot read the handler's type hints: {exc}") from exc
    params = list(inspect.signature(fn).parameters.values())
    if not 1 <= len(params) <= 2:
        raise ConfigError(
            f"task {name!r}: the handler must take one pydantic model and, optionally, a "
            f"TaskContext; it takes {len(params)} parameters"
        )
    model = hints.get(params[0].name)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ConfigError(
            f"task {name!r}: the first parameter {params[0].name!r} must be annotated with a "
            f"pydantic model, got {model!r}"
        )
    wants_context = len(params) == 2
    if wants_context and hints.get(params[1].name, TaskContext) is not TaskContext:
        raise ConfigError(
            f"task {name!r}: the second parameter {params[1].name!r} must be a TaskContext"
        )
    result = hints.get("return")
    if result is type(None):
        result = None
    return model, wants_context, result
