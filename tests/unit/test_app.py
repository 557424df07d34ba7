"""App and Task: registering handlers and building the message `publish` would send."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from rabbitq import App, HandlerTimeout, Task
from rabbitq._errors import ConfigError
from rabbitq._outcome import TaskRules
from rabbitq._wire import HEADER_ATTEMPT, HEADER_DEADLINE, HEADER_PUBLISHED_AT


class Email(BaseModel):
    to: str
    retries: int = 0


class Sms(BaseModel):
    number: str


def _app(namespace: str | None = "shop") -> tuple[App, Task[Any, Any]]:
    app = App(namespace=namespace)

    @app.task("emails.send", workload="emails")
    async def send(msg: Email) -> None: ...

    return app, send


# Registration ---------------------------------------------------------------------------------


def test_task_registers_the_handler_under_its_name() -> None:
    """app.task registers a TaskDef under the name, and returns a Task bound to the app."""
    app, send = _app()
    assert isinstance(send, Task)
    assert (send.app, send.name, send.workload) == (app, "emails.send", "emails")
    assert app.tasks["emails.send"] is send.definition
    assert app.workloads() == {"emails"}


def test_task_is_still_callable_as_the_function() -> None:
    """Calling a Task runs the handler in-process, like the plain function."""
    app = App(namespace="shop")

    @app.task("emails.render", workload="emails")
    def render(msg: Email) -> str:
        return f"to {msg.to}"

    assert render(Email(to="a@b.c")) == "to a@b.c"


def test_duplicate_task_name_is_a_config_error() -> None:
    """Registering a second handler under a taken name raises ConfigError naming it."""
    app, _ = _app()
    with pytest.raises(ConfigError, match=r"^task 'emails\.send' is registered twice$"):

        @app.task("emails.send", workload="other")
        async def again(msg: Email) -> None: ...

    assert app.tasks["emails.send"].workload == "emails"


@pytest.mark.parametrize("workload", ["", "Emails", "emails.send", "-emails", "e" * 64, "a b"])
def test_bad_workload_name_is_a_config_error(workload: str) -> None:
    """app.task with a workload name that cannot be a topology workload raises ConfigError."""
    with pytest.raises(ConfigError, match=rf"^workload {workload!r} must match"):
        App(namespace="shop").task("emails.send", workload=workload)


@pytest.mark.parametrize(
    ("options", "rules"),
    [
        ({}, TaskRules()),
        ({"max_attempts": 1}, TaskRules(max_attempts=1)),
        ({"retry_on": TimeoutError}, TaskRules(retry_on=(TimeoutError,))),
        (
            {"retry_on": (TimeoutError, ConnectionError), "park_on": (ValueError,)},
            TaskRules(retry_on=(TimeoutError, ConnectionError), park_on=(ValueError,)),
        ),
        ({"retry_on": ()}, TaskRules(retry_on=())),
        ({"park_on": HandlerTimeout}, TaskRules(park_on=(HandlerTimeout,))),
    ],
)
def test_retry_rules_are_kept_on_the_definition(options: dict[str, Any], rules: TaskRules) -> None:
    """max_attempts, retry_on and park_on end on TaskDef.rules, a single class as a 1-tuple."""
    app = App(namespace="shop")

    @app.task("emails.send", workload="emails", **options)
    async def send(msg: Email) -> None: ...

    assert send.definition.rules == rules


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_attempts": 0}, r"^task 'emails\.send' has max_attempts=0; must be an int >= 1$"),
        ({"max_attempts": -3}, r"has max_attempts=-3; must be an int >= 1$"),
        ({"max_attempts": 2.5}, r"has max_attempts=2\.5; must be an int >= 1$"),
        ({"max_attempts": True}, r"has max_attempts=True; must be an int >= 1$"),
        (
            {"retry_on": [ValueError]},
            r"^task 'emails\.send' has retry_on=\[<class 'ValueError'>\]; must be an exception "
            r"class or a tuple of exception classes$",
        ),
        ({"retry_on": ValueError()}, r"has retry_on=ValueError\(\); must be an exception"),
        ({"retry_on": (ValueError, "KeyError")}, r"has retry_on=\(<class 'ValueError'>, 'Key"),
        ({"park_on": int}, r"has park_on=<class 'int'>; must be an exception class"),
        ({"park_on": (KeyboardInterrupt,)}, r"has park_on=\(<class 'KeyboardInterrupt'>,\)"),
        ({"park_on": None}, r"has park_on=None; must be an exception class"),
    ],
)
def test_bad_retry_rules_are_a_config_error_at_registration(
    options: dict[str, Any], message: str
) -> None:
    """A max_attempts below 1 or not an int, or retry_on/park_on that are not exception classes,
    raise ConfigError from app.task, before any handler is registered."""
    app = App(namespace="shop")
    with pytest.raises(ConfigError, match=message):
        app.task("emails.send", workload="emails", **options)
    assert app.tasks == {}


# message() ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "body"),
    [
        (Email(to="a@b.c"), {"to": "a@b.c", "retries": 0}),
        ({"to": "a@b.c", "retries": 2}, {"to": "a@b.c", "retries": 2}),
        ({"to": "a@b.c", "retries": "3"}, {"to": "a@b.c", "retries": 3}),  # validated first
    ],
)
def test_message_goes_to_the_namespace_task_exchange_with_the_workload_key(
    payload: Any, body: dict[str, Any]
) -> None:
    """The message goes to NS.tasks with rk=workload, as the model's JSON, attempt 1."""
    _, send = _app()
    out = send.message(payload)
    assert (out.exchange, out.routing_key, out.task) == ("shop.tasks", "emails", "emails.send")
    assert json.loads(out.body) == body
    assert out.headers.keys() == {HEADER_ATTEMPT, HEADER_PUBLISHED_AT}
    assert out.headers[HEADER_ATTEMPT] == 1
    assert out.priority is None
    assert out.content_type == "application/json"


def test_message_id_is_the_idempotency_key() -> None:
    """An idempotency key becomes the message_id, the same on every call."""
    _, send = _app()
    ids = {send.message({"to": "a"}, idempotency_key="order-42").message_id for _ in range(3)}
    assert ids == {"order-42"}


@pytest.mark.parametrize("key", ["", "x" * 256, "é" * 128, "a\nb", "a\x1bb"])
def test_an_idempotency_key_that_is_no_message_id_is_refused(key: str) -> None:
    """Empty, past AMQP's 255-byte short string, or with control characters (it is logged)."""
    _, send = _app()
    with pytest.raises(ConfigError, match="idempotency_key must be 1 to 255 bytes"):
        send.message({"to": "a"}, idempotency_key=key)


def test_an_idempotency_key_of_255_bytes_is_the_message_id() -> None:
    _, send = _app()
    assert send.message({"to": "a"}, idempotency_key="é" * 127 + "x").message_id == "é" * 127 + "x"


def test_message_id_is_fresh_and_unique_without_a_key() -> None:
    """Without an idempotency key every message gets a new unique id."""
    _, send = _app()
    ids = [send.message({"to": "a"}).message_id for _ in range(100)]
    assert len(set(ids)) == 100
    assert all(ids)


def test_message_timestamp_is_now_in_utc() -> None:
    """The timestamp property is the publish time, timezone-aware."""
    _, send = _app()
    before = datetime.now(UTC)
    out = send.message({"to": "a"})
    after = datetime.now(UTC)
    assert out.timestamp is not None
    assert before - timedelta(seconds=1) <= out.timestamp <= after


@pytest.mark.parametrize(
    "delta", [timedelta(seconds=30), timedelta(minutes=5), timedelta(milliseconds=1500)]
)
def test_timedelta_deadline_is_now_plus_delta_in_ms(delta: timedelta) -> None:
    """A timedelta deadline becomes rabbitq-deadline = now + delta, in epoch milliseconds."""
    _, send = _app()
    before = time.time()
    out = send.message({"to": "a"}, deadline=delta)
    after = time.time()
    deadline_ms = out.headers[HEADER_DEADLINE]
    assert type(deadline_ms) is int
    low = int((before + delta.total_seconds()) * 1000) - 1
    high = int((after + delta.total_seconds()) * 1000) + 1
    assert low <= deadline_ms <= high
    assert out.headers[HEADER_ATTEMPT] == 1


@pytest.mark.parametrize(
    ("deadline", "deadline_ms"),
    [
        (datetime(2030, 1, 1, tzinfo=UTC), 1_893_456_000_000),
        (datetime(2030, 1, 1, 2, tzinfo=timezone(timedelta(hours=2))), 1_893_456_000_000),
        (datetime(2030, 1, 1, 0, 0, 0, 250_000, tzinfo=UTC), 1_893_456_000_250),
    ],
)
def test_aware_datetime_deadline_is_epoch_ms(deadline: datetime, deadline_ms: int) -> None:
    """An aware datetime deadline becomes rabbitq-deadline in epoch milliseconds, any zone."""
    _, send = _app()
    out = send.message({"to": "a"}, deadline=deadline)
    assert out.headers[HEADER_DEADLINE] == deadline_ms


def test_naive_datetime_deadline_is_a_config_error() -> None:
    """A datetime without a time zone raises ConfigError asking for an aware one."""
    _, send = _app()
    with pytest.raises(ConfigError, match=r"has no time zone; use an aware datetime"):
        send.message({"to": "a"}, deadline=datetime(2030, 1, 1))


@pytest.mark.parametrize(
    ("priority", "ok"),
    [(0, True), (4, True), (255, True), (-1, False), (256, False), (1000, False)],
)
def test_priority_must_be_from_0_to_255(priority: int, ok: bool) -> None:
    """A priority outside 0..255 raises ConfigError; inside, it is set on the message."""
    _, send = _app()
    if ok:
        assert send.message({"to": "a"}, priority=priority).priority == priority
    else:
        with pytest.raises(ConfigError, match=rf"^priority {priority} must be from 0 to 255$"):
            send.message({"to": "a"}, priority=priority)


@pytest.mark.parametrize("payload", [{}, {"to": 5}, {"to": "a", "retries": "many"}])
def test_invalid_dict_payload_raises_validation_error(payload: dict[str, Any]) -> None:
    """A dict that does not fit the model raises ValidationError from message()."""
    _, send = _app()
    with pytest.raises(ValidationError):
        send.message(payload)


def test_payload_of_another_model_is_a_config_error() -> None:
    """An instance of another model raises ConfigError from message()."""
    _, send = _app()
    with pytest.raises(ConfigError, match=r"takes Email, got Sms"):
        send.message(Sms(number="1"))


async def test_publish_validates_before_anything_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """publish() with an invalid payload raises ValidationError without asking for a publisher."""
    app, send = _app()

    async def no_publisher() -> Any:
        raise AssertionError("publish() reached for a connection with an invalid payload")

    monkeypatch.setattr(app, "publisher", no_publisher)
    with pytest.raises(ValidationError):
        await send.publish({"to": 5})
    with pytest.raises(ValidationError):
        await send.publish_many([{"to": "ok"}, {"to": 5}])


def test_publish_sync_validates_before_anything_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """publish_sync() with an invalid payload raises ValidationError and starts no thread."""
    app, send = _app()

    def no_run_sync(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("publish_sync() started sending an invalid payload")

    monkeypatch.setattr(app, "run_sync", no_run_sync)
    with pytest.raises(ValidationError):
        send.publish_sync({"to": 5})


def test_app_without_namespace_cannot_build_messages() -> None:
    """Without a namespace message() raises ConfigError saying to pass App(namespace=...)."""
    _, send = _app(namespace=None)
    with pytest.raises(
        ConfigError, match=r"the App has no namespace; pass App\(namespace=\.\.\.\)"
    ):
        send.message({"to": "a"})
