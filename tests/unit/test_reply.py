"""Replies over direct reply-to: which deliveries get one, how one is encoded and read back."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter

from rabbitq import ReplyInvalid, TaskFailed
from rabbitq._handlers import TaskDef
from rabbitq._reply import (
    HEADER_OUTCOME,
    PARKED,
    REPLY_TO,
    SUCCEEDED,
    parked,
    result,
    succeeded,
    wants_reply,
)
from rabbitq._wire import HEADER_PARK_ERROR, HEADER_PARK_ERROR_TYPE, HEADER_PARK_REASON

ANSWER_TO = REPLY_TO + ".g1h2AA1yZXBseUA5MjQ4ODg0AAAFjgAAAABrEFvj.ZBhymgZPJmNfkQnuxRx02A=="


class Item(BaseModel):
    n: int


class Doubled(BaseModel):
    n: int
    doubled: int


@pytest.mark.parametrize(
    ("reply_to", "correlation_id", "expected"),
    [
        (ANSWER_TO, "c1", True),
        (None, "c1", False),  # a plain publish
        (ANSWER_TO, None, False),  # nothing to match the reply by
        (ANSWER_TO, "", False),
        (REPLY_TO, "c1", False),  # the broker always rewrites it: not from a broker
        ("shop.emails.work", "c1", False),  # a named queue: never answered
        ("", "c1", False),
    ],
)
def test_only_direct_reply_to_with_a_correlation_id_is_answered(
    reply_to: str | None, correlation_id: str | None, expected: bool
) -> None:
    """Only a broker-rewritten direct reply-to name with a correlation id gets a reply."""
    assert wants_reply(reply_to, correlation_id) is expected


def test_a_success_reply_carries_the_result_and_the_correlation_id() -> None:
    out = succeeded(ANSWER_TO, "c1", b'{"n":1,"doubled":2}')
    assert (out.exchange, out.routing_key, out.body) == ("", ANSWER_TO, b'{"n":1,"doubled":2}')
    assert out.headers == {HEADER_OUTCOME: SUCCEEDED}
    props = out.amqp_properties()
    assert props.correlation_id == "c1"
    assert props.reply_to is None and props.message_type is None


def test_a_parked_reply_carries_the_park_facts_bounded() -> None:
    out = parked(ANSWER_TO, "c1", "retries_exhausted", "ValueError", "x" * 2000)
    assert out.body == b""
    assert out.headers[HEADER_OUTCOME] == PARKED
    assert out.headers[HEADER_PARK_REASON] == "retries_exhausted"
    assert out.headers[HEADER_PARK_ERROR_TYPE] == "ValueError"
    assert len(out.headers[HEADER_PARK_ERROR]) == 500


def _read(body: bytes, headers: dict[str, Any] | None, load: Any = None) -> Any:
    load = load or TypeAdapter(Doubled).validate_json
    return result(body, headers, task="calc.double", message_id="m1", load=load)


@pytest.mark.parametrize(
    ("body", "load", "expected"),
    [
        (b'{"n":1,"doubled":2}', TypeAdapter(Doubled).validate_json, Doubled(n=1, doubled=2)),
        (b"42", TypeAdapter(int).validate_json, 42),
        (b'{"a":[1]}', TypeAdapter(dict[str, list[int]]).validate_json, {"a": [1]}),
        (b"null", lambda body: None, None),
    ],
)
def test_a_success_reply_is_read_as_the_return_type(body: bytes, load: Any, expected: Any) -> None:
    assert _read(body, {HEADER_OUTCOME: SUCCEEDED}, load) == expected


def test_a_parked_reply_raises_task_failed_with_its_facts() -> None:
    headers = {
        HEADER_OUTCOME: PARKED,
        HEADER_PARK_REASON: "parked_by_handler",
        HEADER_PARK_ERROR_TYPE: b"Park",  # a client may hand a long string over as bytes
        HEADER_PARK_ERROR: "not wanted",
    }
    with pytest.raises(TaskFailed) as caught:
        _read(b"", headers)
    failed = caught.value
    assert (failed.task, failed.message_id) == ("calc.double", "m1")
    assert (failed.reason, failed.error_type, failed.error) == (
        "parked_by_handler",
        "Park",
        "not wanted",
    )
    assert str(failed) == (
        "task 'calc.double' (message 'm1') was parked (parked_by_handler): Park: not wanted"
    )


def test_a_parked_reply_with_missing_or_odd_facts_still_raises_task_failed() -> None:
    with pytest.raises(TaskFailed) as caught:
        _read(b"", {HEADER_OUTCOME: PARKED, HEADER_PARK_ERROR: 12, HEADER_PARK_REASON: "r" * 999})
    assert caught.value.error == "12" and caught.value.error_type == ""
    assert len(caught.value.reason) == 200


@pytest.mark.parametrize(
    ("body", "headers", "problem"),
    [
        (b'{"n":1}', {HEADER_OUTCOME: SUCCEEDED}, "doubled: Field required"),
        (b"{nope", {HEADER_OUTCOME: SUCCEEDED}, "Invalid JSON"),
        (b"{}", None, "header 'rabbitq-outcome' is None"),
        (b"{}", {HEADER_OUTCOME: "x" * 1000}, "header 'rabbitq-outcome' is 'xxx"),
    ],
)
def test_an_untrusted_reply_raises_reply_invalid(
    body: bytes, headers: dict[str, Any] | None, problem: str
) -> None:
    with pytest.raises(ReplyInvalid) as caught:
        _read(body, headers)
    assert problem in str(caught.value)
    assert len(str(caught.value)) < 600


def test_reply_invalid_does_not_quote_the_replys_body() -> None:
    """A result that does not validate is described by its problems, not its content."""
    with pytest.raises(ReplyInvalid) as caught:
        _read(b'{"n":"secret-value","doubled":2}', {HEADER_OUTCOME: SUCCEEDED})
    assert "secret-value" not in str(caught.value)


def test_a_validator_that_raises_something_else_is_reply_invalid_too() -> None:
    def load(body: bytes) -> Any:
        raise RuntimeError("validator broke")

    with pytest.raises(ReplyInvalid, match="RuntimeError: validator broke"):
        _read(b"1", {HEADER_OUTCOME: SUCCEEDED}, load)


def test_a_tasks_result_goes_through_the_reply_and_back_as_its_type() -> None:
    """What the responder encodes (`TaskDef.dump_result`) the caller reads (`load_result`)."""

    async def double(item: Item) -> Doubled:
        return Doubled(n=item.n, doubled=2 * item.n)

    async def nothing(item: Item) -> None:
        return None

    typed: TaskDef[Item, Doubled] = TaskDef("calc.double", "calc", double)
    out = succeeded(ANSWER_TO, "c1", typed.dump_result(Doubled(n=2, doubled=4)))
    back = result(
        out.body, out.headers, task="calc.double", message_id="m1", load=typed.load_result
    )
    assert back == Doubled(n=2, doubled=4)
    untyped: TaskDef[Item, None] = TaskDef("calc.nothing", "calc", nothing)
    assert untyped.dump_result(None) == b"null" and untyped.load_result(b"null") is None
