"""Task definitions: handler inspection, payload parsing and checking, and running handlers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from rabbitq._errors import ConfigError, ParkReason, Poison
from rabbitq._handlers import TASK_NAME_MAX, TaskContext, TaskDef

EXECUTOR_PREFIX = "rabbitq-unit-test"


class Email(BaseModel):
    to: str
    retries: int = 0


class Sms(BaseModel):
    number: str


class Echo(BaseModel):
    value: Any


CTX = TaskContext(
    message_id="m-1",
    task="emails.send",
    workload="emails",
    attempt=2,
    deadline=None,
    redelivered=False,
    priority=0,
)


async def async_plain(msg: Email) -> None: ...


async def async_with_ctx(msg: Email, ctx: TaskContext) -> None: ...


def sync_plain(msg: Email) -> None: ...


def sync_with_ctx(msg: Email, ctx: TaskContext) -> int:
    return 0


def sync_unannotated_ctx(msg: Email, ctx) -> None:  # type: ignore[no-untyped-def]
    ...


def no_params() -> None: ...


def three_params(msg: Email, ctx: TaskContext, extra: int) -> None: ...


def unannotated(msg) -> None:  # type: ignore[no-untyped-def]
    ...


def dict_payload(msg: dict[str, Any]) -> None: ...


def int_payload(msg: int) -> None: ...


def model_instance_hint(msg: Email | None) -> None: ...


def str_ctx(msg: Email, ctx: str) -> None: ...


def unresolvable(msg: Email) -> None: ...


# An annotation naming nothing importable, as a typo in a handler module would leave it.
unresolvable.__annotations__ = {"msg": "Emial", "return": "None"}


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=EXECUTOR_PREFIX)
    yield pool
    pool.shutdown(wait=True)


# Inspection -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "is_async", "wants_context"),
    [
        (async_plain, True, False),
        (async_with_ctx, True, True),
        (sync_plain, False, False),
        (sync_with_ctx, False, True),
        (sync_unannotated_ctx, False, True),
    ],
)
def test_taskdef_reads_model_and_context_from_the_handler(
    fn: Callable[..., Any], is_async: bool, wants_context: bool
) -> None:
    """A handler taking a pydantic model and optionally a TaskContext is accepted as it is."""
    definition: TaskDef[Any, Any] = TaskDef("emails.send", "emails", fn)
    assert definition.model is Email
    assert (definition.is_async, definition.wants_context) == (is_async, wants_context)
    assert (definition.name, definition.workload, definition.fn) == ("emails.send", "emails", fn)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (no_params, r"must take one pydantic model and, optionally, a TaskContext; it takes 0"),
        (three_params, r"it takes 3 parameters"),
        (unannotated, r"first parameter 'msg' must be annotated with a pydantic model, got None"),
        (dict_payload, r"first parameter 'msg' must be annotated with a pydantic model, got dict"),
        (int_payload, r"must be annotated with a pydantic model, got <class 'int'>"),
        (model_instance_hint, r"must be annotated with a pydantic model"),
        (str_ctx, r"second parameter 'ctx' must be a TaskContext"),
        (unresolvable, r"cannot read the handler's type hints: name 'Emial' is not defined"),
    ],
)
def test_taskdef_rejects_wrong_handler_signatures(fn: Callable[..., Any], message: str) -> None:
    """A handler that does not take (model[, TaskContext]) raises ConfigError saying why."""
    with pytest.raises(ConfigError, match=r"^task 'emails\.send': " + f".*{message}"):
        TaskDef("emails.send", "emails", fn)


@pytest.mark.parametrize(
    ("name", "timeout_seconds", "message"),
    [
        ("", None, r"task name '' must be 1 to 200 characters"),
        ("x" * (TASK_NAME_MAX + 1), None, r"must be 1 to 200 characters"),
        ("emails.send", 0, r"task 'emails\.send' has timeout_seconds=0; must be > 0"),
        ("emails.send", -1.5, r"timeout_seconds=-1\.5; must be > 0"),
    ],
)
def test_taskdef_rejects_bad_name_and_timeout(
    name: str, timeout_seconds: float | None, message: str
) -> None:
    """An empty or overlong name, or a timeout that is not positive, raises ConfigError."""
    with pytest.raises(ConfigError, match=message):
        TaskDef(name, "emails", async_plain, timeout_seconds)


# parse ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason", "detail"),
    [
        (b"", ParkReason.UNDECODABLE, "body is not JSON"),
        (b"not json", ParkReason.UNDECODABLE, "body is not JSON"),
        (b'{"to": "a@b.c"', ParkReason.UNDECODABLE, "body is not JSON"),
        (b"\xff\xfe", ParkReason.UNDECODABLE, "body is not JSON"),
        (b"[1, 2]", ParkReason.INVALID_PAYLOAD, "(body): Input should be an object"),
        (b"null", ParkReason.INVALID_PAYLOAD, "(body)"),
        (b"{}", ParkReason.INVALID_PAYLOAD, "to: Field required"),
        (b'{"to": 5}', ParkReason.INVALID_PAYLOAD, "to: Input should be a valid string"),
        (b'{"to": "a", "retries": "many"}', ParkReason.INVALID_PAYLOAD, "retries:"),
    ],
)
def test_parse_bad_body_raises_poison(body: bytes, reason: ParkReason, detail: str) -> None:
    """Bytes that are not JSON are undecodable; JSON of the wrong shape is an invalid payload."""
    definition: TaskDef[Any, Any] = TaskDef("emails.send", "emails", async_plain)
    with pytest.raises(Poison) as exc_info:
        definition.parse(body)
    assert exc_info.value.reason == reason
    assert detail in exc_info.value.detail


def test_parse_invalid_payload_detail_never_quotes_the_payload() -> None:
    """The Poison detail names the fields, never the values (payloads are not logged)."""
    definition: TaskDef[Any, Any] = TaskDef("emails.send", "emails", async_plain)
    with pytest.raises(Poison) as exc_info:
        definition.parse(b'{"to": "a@b.c", "retries": "secret-token-123"}')
    assert "secret-token-123" not in exc_info.value.detail


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"to": "a@b.c"}', Email(to="a@b.c")),
        (b'{"to": "a@b.c", "retries": 3}', Email(to="a@b.c", retries=3)),
        ('{"to": "ü@b.c"}'.encode(), Email(to="ü@b.c")),
    ],
)
def test_parse_valid_body_gives_the_model(body: bytes, expected: Email) -> None:
    """A JSON body that fits the model parses to the model instance."""
    definition: TaskDef[Any, Any] = TaskDef("emails.send", "emails", async_plain)
    assert definition.parse(body) == expected


# check_payload --------------------------------------------------------------------------------


def test_check_payload_returns_a_model_instance_unchanged() -> None:
    """An instance of the task's model is returned as it is."""
    definition: TaskDef[Any, Any] = TaskDef("emails.send", "emails", async_plain)
    payload = Email(to="a@b.c")
    assert definition.check_payload(payload) is payload


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"to": "a@b.c"}, Email(to="a@b.c")),
        ({"to": "a@b.c", "retries": "2"}, Email(to="a@b.c", retries=2)),
    ],
)
def test_check_payload_validates_a_dict_into_the_model(
    payload: dict[str, Any], expected: Email
) -> None:
    """A dict is validated into the task's model."""
    definition: TaskDef[Any, Any] = TaskDef("emails.send", "emails", async_plain)
    assert definition.check_payload(payload) == expected


def test_check_payload_rejects_another_model() -> None:
    """An instance of another model raises ConfigError naming both models."""
    definition: TaskDef[Any, Any] = TaskDef("emails.send", "emails", async_plain)
    with pytest.raises(ConfigError, match=r"^task 'emails\.send' takes Email, got Sms$"):
        definition.check_payload(Sms(number="123"))


@pytest.mark.parametrize("payload", [{}, {"to": 5}, {"to": "a", "retries": "many"}, "a@b.c", None])
def test_check_payload_rejects_what_does_not_fit(payload: Any) -> None:
    """A dict (or anything else) that does not validate raises pydantic's ValidationError."""
    definition: TaskDef[Any, Any] = TaskDef("emails.send", "emails", async_plain)
    with pytest.raises(ValidationError):
        definition.check_payload(payload)


# run ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_ctx", [False, True])
async def test_run_calls_an_async_handler_on_the_loop(with_ctx: bool) -> None:
    """An async handler is awaited on the event loop, with the context when it asks for one."""
    calls: list[tuple[Any, ...]] = []
    loop_thread = threading.get_ident()

    async def plain(msg: Email) -> None:
        calls.append((msg, threading.get_ident()))

    async def with_context(msg: Email, ctx: TaskContext) -> None:
        calls.append((msg, threading.get_ident(), ctx))

    definition: TaskDef[Any, Any] = TaskDef(
        "emails.send", "emails", with_context if with_ctx else plain
    )
    payload = Email(to="a@b.c")
    assert await definition.run(payload, CTX, None) is None
    assert calls == [(payload, loop_thread, CTX) if with_ctx else (payload, loop_thread)]


@pytest.mark.parametrize("with_ctx", [False, True])
async def test_run_calls_a_sync_handler_in_the_executor_thread(
    with_ctx: bool, executor: ThreadPoolExecutor
) -> None:
    """A sync handler runs in a thread of the given executor, never on the loop's thread."""
    seen: list[tuple[int, str, Any]] = []

    def plain(msg: Email) -> str:
        seen.append((threading.get_ident(), threading.current_thread().name, None))
        return msg.to

    def with_context(msg: Email, ctx: TaskContext) -> str:
        seen.append((threading.get_ident(), threading.current_thread().name, ctx))
        return msg.to

    definition: TaskDef[Any, Any] = TaskDef(
        "emails.send", "emails", with_context if with_ctx else plain
    )
    assert await definition.run(Email(to="a@b.c"), CTX, executor) == "a@b.c"
    [(ident, thread_name, ctx)] = seen
    assert ident != threading.get_ident()
    assert thread_name.startswith(EXECUTOR_PREFIX)
    assert ctx == (CTX if with_ctx else None)


async def test_run_propagates_the_handler_error() -> None:
    """An exception from the handler reaches the caller unchanged."""

    async def fails(msg: Email) -> None:
        raise ValueError("smtp said no")

    definition: TaskDef[Any, Any] = TaskDef("emails.send", "emails", fails, timeout_seconds=5)
    with pytest.raises(ValueError, match="^smtp said no$"):
        await definition.run(Email(to="a@b.c"), CTX, None)


async def test_run_times_out_a_slow_async_handler() -> None:
    """An async handler that outlives timeout_seconds is cancelled with a TimeoutError."""
    cancelled = asyncio.Event()

    async def hangs(msg: Email) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    definition: TaskDef[Any, Any] = TaskDef("emails.send", "emails", hangs, timeout_seconds=0.01)
    with pytest.raises(TimeoutError, match=r"handler ran longer than its timeout of 0\.01s"):
        await definition.run(Email(to="a@b.c"), CTX, None)
    assert cancelled.is_set()


async def test_run_times_out_a_slow_sync_handler(executor: ThreadPoolExecutor) -> None:
    """A sync handler that outlives timeout_seconds fails with TimeoutError; its thread runs on."""
    release = threading.Event()

    def blocks(msg: Email) -> None:
        release.wait(timeout=10)

    definition: TaskDef[Any, Any] = TaskDef("emails.send", "emails", blocks, timeout_seconds=0.01)
    try:
        with pytest.raises(TimeoutError, match=r"handler ran longer than its timeout of 0\.01s"):
            await definition.run(Email(to="a@b.c"), CTX, executor)
    finally:
        release.set()


async def _returns_int(msg: Echo) -> int:
    return msg.value  # type: ignore[no-any-return]


def _returns_email(msg: Echo) -> Email:
    return msg.value  # type: ignore[no-any-return]


async def _returns_untyped(msg: Echo):  # type: ignore[no-untyped-def]
    return msg.value


async def _returns_none(msg: Echo) -> None:
    return msg.value  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("fn", "value", "expected"),
    [
        (_returns_int, 5, 5),
        (_returns_int, "5", 5),  # coerced to the annotation
        (_returns_email, {"to": "a@b.c"}, Email(to="a@b.c")),
        (_returns_untyped, "anything", "anything"),  # no annotation: no check
        (_returns_none, "anything", "anything"),  # -> None is not checked either
    ],
)
async def test_run_validates_the_result_against_the_return_annotation(
    fn: Callable[..., Any], value: Any, expected: Any, executor: ThreadPoolExecutor
) -> None:
    """A typed handler's result is validated (and coerced) against its return annotation."""
    definition: TaskDef[Any, Any] = TaskDef("t", "w", fn)
    assert await definition.run(Echo(value=value), CTX, executor) == expected


@pytest.mark.parametrize(
    ("fn", "value"),
    [(_returns_int, "five"), (_returns_int, None), (_returns_email, {"number": "1"})],
)
async def test_run_rejects_a_result_that_does_not_fit_the_annotation(
    fn: Callable[..., Any], value: Any, executor: ThreadPoolExecutor
) -> None:
    """A result that does not fit the return annotation raises ValidationError."""
    definition: TaskDef[Any, Any] = TaskDef("t", "w", fn)
    with pytest.raises(ValidationError):
        await definition.run(Echo(value=value), CTX, executor)
