"""Log lines: the fields of an outcome in text and JSON, one traceback, never a password."""

from __future__ import annotations

import io
import json
import logging

import pytest

from rabbitq import _logs as logs

URL = "amqp://worker:S3cret%2Fpw@broker:5672/"
PASSWORDS = ("S3cret%2Fpw", "S3cret/pw")
FACTS = {
    "workload": "emails",
    "task": "emails.send",
    "message_id": "m-1",
    "attempt": 2,
    "outcome": "parked",
    "reason": "retries_exhausted",
    "duration_seconds": 0.25,
    "error": "ValueError: smtp said no",
}


def _record(
    msg: str = "task parked", exc: BaseException | None = None, /, **extra: object
) -> logging.LogRecord:
    record = logging.LogRecord("rabbitq.settle", logging.ERROR, __file__, 1, msg, (), None)
    if exc is not None:
        record.exc_info = (type(exc), exc, exc.__traceback__)
    record.__dict__.update(extra)
    return record


def test_text_line_carries_the_outcome_fields_in_order() -> None:
    line = logs.TextFormatter().format(_record(**FACTS))
    assert line.endswith(
        "task parked workload=emails task=emails.send message_id=m-1 attempt=2 outcome=parked "
        'reason=retries_exhausted duration_seconds=0.250000 error="ValueError: smtp said no"'
    )
    assert " ERROR rabbitq.settle: " in line


def test_json_line_is_one_object_with_the_fields() -> None:
    line = logs.JsonFormatter().format(_record(**FACTS))
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "error" and data["logger"] == "rabbitq.settle"
    assert data["message"] == "task parked"
    assert {k: data[k] for k in FACTS} == FACTS
    assert data["time"].endswith("+00:00")


@pytest.mark.parametrize("formatter", [logs.TextFormatter(), logs.JsonFormatter()])
def test_a_parked_task_traceback_is_written_once(formatter: logging.Formatter) -> None:
    tb = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: no\n'
    out = formatter.format(_record(traceback=tb, **FACTS))
    text = json.loads(out)["traceback"] if isinstance(formatter, logs.JsonFormatter) else out
    assert text.count("Traceback (most recent call last)") == 1


@pytest.mark.parametrize(
    "record",
    [
        _record(f"could not connect to {URL}"),
        _record("lost", error=f"ConnectionError: {URL} refused"),
        _record("unexpected", RuntimeError("password is S3cret/pw")),
        _record("parked", traceback="ValueError: S3cret%2Fpw"),
    ],
    ids=["message", "field", "exception", "traceback"],
)
@pytest.mark.parametrize("formatter", [logs.TextFormatter((URL,)), logs.JsonFormatter((URL,))])
def test_no_formatter_writes_the_password(
    formatter: logging.Formatter, record: logging.LogRecord
) -> None:
    out = formatter.format(record)
    assert not any(p in out for p in PASSWORDS), out
    assert "***" in out


def test_setup_writes_json_lines_to_the_stream_and_quiets_libraries() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup("info", "json", (URL,), stream=stream)
        logging.getLogger("rabbitq.test").info("hello %s", URL)
        logging.getLogger("aiormq").info("narration")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["message"] == "hello amqp://worker:***@broker:5672/"
