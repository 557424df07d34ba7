"""`rabbitq publish` without a broker: payloads validated line by line, and every bad input
stopped with one `error:` line before anything connects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, field_validator
from typer.testing import CliRunner, Result

from rabbitq import App
from rabbitq._cli import cli
from rabbitq._cli_publish import BadLine, task_named, validate_ndjson, validate_payload
from rabbitq._errors import UsageError
from rabbitq._handlers import TaskDef
from tests.helpers import free_port


class Item(BaseModel):
    n: int
    tags: dict[str, int] = {}

    @field_validator("n")
    @classmethod
    def _not_13(cls, n: int) -> int:
        if n == 13:
            raise TypeError("unlucky")  # not a ValueError: pydantic lets it through
        return n


async def _add(item: Item) -> None:
    pass


app = App(namespace="unit")
app.task("items.add", workload="items")(_add)
app.task("items.remove", workload="items")(_add)
nameless = App()  # takes its namespace from --namespace or the topology
nameless.task("items.add", workload="items")(_add)

ADD: TaskDef[Any, Any] = app.tasks["items.add"]
APP = f"{__name__}:app"
NOT_INT = "Input should be a valid integer, unable to parse string as an integer"
ONE_OF = "give the payload with --json '{...}' or --file tasks.ndjson (one of them)"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"n": 1', "not JSON: Expecting ',' delimiter at column 8"),
        ('{\n"n": }', "not JSON: Expecting value at line 2 column 6"),
        ("", "not JSON: Expecting value at column 1"),
        ('{"n": "x"}', f"Item: n: {NOT_INT}"),
        ("{}", "Item: n: Field required"),
        ("[1]", "Item: (body): Input should be a valid dictionary or instance of Item"),
        ('{"n": 1, "tags": {"a": "b"}}', f"Item: tags.a: {NOT_INT}"),
        ('{"n": 13}', "Item: the model raised TypeError: unlucky"),
        ('{"n": ' + "1" * 5000 + "}", "not usable JSON: an integer has more than 4300 digits"),
        ("[" * 100_000, "not usable JSON: nested too deeply"),
    ],
    ids=["unclosed", "multi-line", "empty", "wrong-type", "missing", "not-an-object",
         "nested", "validator-raises", "huge-int", "too-deep"],
)  # fmt: skip
def test_a_payload_that_does_not_fit_says_why(text: str, problem: str) -> None:
    """A payload that is not JSON, or does not fit the model, raises one sentence saying where."""
    with pytest.raises(ValueError) as caught:
        validate_payload(text, ADD)
    assert str(caught.value) == problem


def test_a_payload_that_fits_is_the_model() -> None:
    """A valid payload comes back as the task's model, coerced as pydantic coerces it."""
    assert validate_payload('{"n": "7"}', ADD) == Item(n=7)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"n": 1}\n{"n": 2}\n', [1, 2]),
        ('{"n": 1}\r\n\r\n  \n{"n": 2}', [1, 2]),
        ("", []),
        ("\n\n", []),
        ('{"n": 1, "tags": {"a\u2028b": 1}}\n', [1]),  # U+2028 inside a string is not a line end
        ('{"n": 1}\n{"n": 2}\n{"n": }\n{"n": "x"}\n',
         BadLine(3, "not JSON: Expecting value at column 7")),
        ('{"n": 1}\n\n{"m": 2}\n', BadLine(3, "Item: n: Field required")),
        ('{"n": 1}\n\n\n\n{"n": 1} {"n": 2}\n', BadLine(5, "not JSON: Extra data at column 10")),
    ],
    ids=["two", "crlf-and-blanks", "empty", "only-blank", "u2028", "bad-third",
         "blank-lines-counted", "two-on-one-line"],
)  # fmt: skip
def test_ndjson_lines_validate_in_order_or_name_the_first_bad_line(
    text: str, expected: list[int] | BadLine
) -> None:
    """Each non-blank line is one payload; the first bad one is named by its editor line number."""
    found = validate_ndjson(text, ADD)
    if isinstance(expected, BadLine):
        assert found == expected
    else:
        assert isinstance(found, list) and [m.n for m in found] == expected  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("tasks", "name", "message"),
    [
        (app.tasks, "items.add", None),
        (app.tasks, "items.ad", "task 'items.ad' is not registered on --app 'm:app'; "
         "did you mean 'items.add' or 'items.remove'?"),
        (app.tasks, "zzz", "task 'zzz' is not registered on --app 'm:app'; "
         "its tasks are items.add, items.remove"),
        ({f"t{i:02}": ADD for i in range(12)}, "zzz", "task 'zzz' is not registered on --app "
         "'m:app'; its tasks are t00, t01, t02, t03, t04, t05, t06, t07, t08, t09 and 2 more"),
        ({}, "items.add", "task 'items.add' is not registered: --app 'm:app' has no tasks"),
    ],
    ids=["known", "misspelt", "unknown", "many", "none"],
)  # fmt: skip
def test_a_task_is_found_by_name_or_the_error_suggests_one(
    tasks: dict[str, TaskDef[Any, Any]], name: str, message: str | None
) -> None:
    """A registered name is its TaskDef; another is a usage error naming what there is."""
    if message is None:
        assert task_named(tasks, name, "m:app") is tasks[name]
        return
    with pytest.raises(UsageError) as caught:
        task_named(tasks, name, "m:app")
    assert str(caught.value) == message


def _publish(*args: str, stdin: str | None = None) -> Result:
    # a broker URL where nothing listens: a command that tried to connect would exit 1
    url = f"amqp://guest:s3cret@127.0.0.1:{free_port()}/"
    env = {"RABBITQ_URL": url, "RABBITQ_APP": None, "RABBITQ_NAMESPACE": None}
    return CliRunner(env=env).invoke(cli, ["publish", *args], input=stdin)


@pytest.fixture
def ndjson(tmp_path: Path) -> Path:
    path = tmp_path / "tasks.ndjson"
    path.write_text('{"n": 1}\n{"n": 2}\n{"n": 3, "tags": {"a\\nb": "x"}}\n')
    return path


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["items.sub", "--json", "{}"], "task 'items.sub' is not registered on --app "
         f"'{APP}'; did you mean 'items.add'?"),
        (["items.add", "--json", '{"n": "x"}'], f"--json: Item: n: {NOT_INT}"),
        (["items.add"], ONE_OF),
        (["items.add", "--json", "{}", "--file", "-"], ONE_OF),
        (["items.add", "--file", "NDJSON"],
         f"NDJSON line 3: Item: tags.a\\nb: {NOT_INT}; nothing was published"),
        (["items.add", "--file", "NDJSON.missing"], "cannot read --file 'NDJSON.missing': "
         "No such file or directory"),
        (["items.add", "--json", '{"n": 1}', "--priority", "256"], "--priority: priority 256 "
         "must be from 0 to 255"),
        (["items.add", "--json", '{"n": 1}', "--deadline", "soon"], "--deadline 'soon': expected "
         "a duration such as '500ms', '10s', '5m', '1h' or '2d'"),
        (["items.add", "--json", '{"n": 1}', "--namespace", "Bad NS"], "--namespace 'Bad NS' "
         "must match ^[a-z0-9][a-z0-9_.-]{0,62}$"),
        (["items.add", "--json", '{"n": 1}', "--delay", "later"], "--delay 'later': expected "
         "a duration such as '500ms', '10s', '5m', '1h' or '2d'"),
        (["items.add", "--json", '{"n": 1}', "--delay", "4000d"], "--delay/--at: a delay of "
         "345600000s is past the ladder's longest, 268435455s (8y186d)"),
        (["items.add", "--json", '{"n": 1}', "--at", "tomorrow"], "--at 'tomorrow' is not an "
         "ISO 8601 time"),
        (["items.add", "--json", '{"n": 1}', "--at", "2030-01-01T09:00"], "--at "
         "'2030-01-01T09:00' has no offset; add Z or +01:00"),
        (["items.add", "--json", '{"n": 1}', "--at", "2030-01-01T09:00Z", "--delay", "1m"],
         "give --delay or --at, not both"),
        (["items.add", "--json", '{"n": 1}', "--delay", "1h", "--deadline", "10m"],
         "--delay/--at: the deadline is 3000s before the task is to run; it would only ever "
         "be parked as expired"),
        (["items.add", "--file", "NDJSON", "--idempotency-key", "k"], "--idempotency-key "
         "names one task: use it with --json, not --file"),
        (["items.add", "--json", '{"n": 1}', "--idempotency-key", "x" * 256],
         "--idempotency-key: idempotency_key must be 1 to 255 bytes of printable text"),
    ],
    ids=["unknown-task", "invalid-json-payload", "no-payload", "two-payloads", "bad-line",
         "missing-file", "priority", "deadline", "namespace", "delay", "delay-too-long",
         "at-not-a-time", "at-without-offset", "delay-and-at", "deadline-before-delay",
         "key-with-file", "key-too-long"],
)  # fmt: skip
def test_bad_input_is_one_error_line_and_exit_2_before_connecting(
    args: list[str], error: str, ndjson: Path
) -> None:
    """Each bad input prints only its `error:` line, exits 2 and never reaches the broker."""
    args = [a.replace("NDJSON", str(ndjson)) for a in args]
    result = _publish(*args, "--app", APP)
    assert result.stderr.splitlines() == [f"error: {error.replace('NDJSON', str(ndjson))}"]
    assert result.exit_code == 2
    assert result.stdout == ""


def test_a_bad_line_from_stdin_is_named_by_its_number() -> None:
    """`--file -` reads stdin; a bad line there is `stdin line N`."""
    result = _publish("items.add", "--file", "-", "--app", APP, stdin='{"n": 1}\n\n{"n": []}\n')
    assert result.exit_code == 2
    assert result.stderr.startswith("error: stdin line 3: Item: n: Input should be a valid integer")


def test_an_app_without_a_namespace_needs_one_from_somewhere(tmp_path: Path) -> None:
    """No --namespace, none in the App and no topology directory: a usage error saying so."""
    missing = tmp_path / "topology"
    result = _publish(
        "items.add", "--json", '{"n": 1}', "--app", f"{__name__}:nameless", "-t", str(missing)
    )
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: the App has no namespace and --topology {str(missing)!r} does not exist; "
        "pass --namespace NS or point --topology at the topology files"
    ]


def test_an_empty_file_publishes_nothing_and_says_so(tmp_path: Path) -> None:
    """A file of blank lines sends nothing (it does not even connect) and exits 0."""
    empty = tmp_path / "empty.ndjson"
    empty.write_text("\n\n")
    result = _publish("items.add", "--file", str(empty), "--app", APP)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr == f"no tasks in {empty}: nothing was published\n"


def test_a_broker_that_cannot_be_reached_is_exit_1_without_the_password() -> None:
    """Valid input and no broker: one `error: cannot connect` line, password masked."""
    result = _publish("items.add", "--json", '{"n": 1}', "--app", APP)
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("error: cannot connect to amqp://guest:***@127.0.0.1:")
    assert "s3cret" not in result.output


def test_help_shows_an_example() -> None:
    """`publish --help` explains --json and shows a runnable example."""
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["publish", "--help"])
    assert result.exit_code == 0
    assert "rabbitq publish emails.send --app emails:app --json" in result.stdout
    assert "not an output format" in result.stdout
