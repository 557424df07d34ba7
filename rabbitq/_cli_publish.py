"""`rabbitq publish TASK`: tasks sent from the command line, validated before anything leaves.

A payload comes from `--json` or from an ndjson file (one task a line); every line is
validated against the task's model before the first one is published, so a bad line sends
nothing. Publishing goes through the library's own path (`Task.message`, then the
`Publisher`'s pipelined confirms): an id is printed only once the broker confirmed it.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ValidationError

from rabbitq import _tracing as tracing
from rabbitq._app import App, Task
from rabbitq._cli_parking import _safe
from rabbitq._errors import ConfigError, SendError, UsageError
from rabbitq._handlers import TaskDef, _summarise
from rabbitq._publish import Publisher, raise_first
from rabbitq._topology import NAMESPACE_PATTERN, load_topology, parse_duration
from rabbitq._wire import Outgoing, error_text

STDIN = "-"
# which option a ConfigError of Task.message is about, by how its message starts
_OPTION_OF_ERROR = (("priority", "--priority"), ("idempotency_key", "--idempotency-key"))
SHOWN_TASKS = 10  # an unknown task's error lists at most this many registered names


@dataclass(frozen=True, slots=True)
class BadLine:
    """The first line of an ndjson file that is not a valid payload.

    Attributes:
        number: the line's number, from 1, blank lines counted (as an editor numbers them).
        problem: what is wrong with it, one sentence.
    """

    number: int
    problem: str


def validate_payload(text: str, definition: TaskDef[Any, Any]) -> BaseModel:
    """The task's model, from one JSON document.

    Raises:
        ValueError: the text is not JSON, or does not fit the model; its message says where.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}" if "\n" in text else f"column {exc.colno}"
        raise ValueError(f"not JSON: {exc.msg} at {where}") from None
    except ValueError:  # the one other ValueError json raises: an integer past the limit
        limit = sys.get_int_max_str_digits()
        raise ValueError(f"not usable JSON: an integer has more than {limit} digits") from None
    except RecursionError:
        raise ValueError("not usable JSON: nested too deeply") from None
    try:
        return definition.check_payload(data)
    except ValidationError as exc:
        raise ValueError(f"{definition.model.__name__}: {_summarise(exc)}") from None
    except Exception as exc:  # a validator that raises something else is still bad input
        raise ValueError(
            f"{definition.model.__name__}: the model raised {error_text(exc)}"
        ) from None


def validate_ndjson(text: str, definition: TaskDef[Any, Any]) -> list[BaseModel] | BadLine:
    """Every non-blank line's payload, in order, or the first line that does not validate.

    Lines end at '\\n' only (a '\\r' before it is dropped): JSON strings may hold U+2028 and
    the other characters `str.splitlines` would also break at.
    """
    models = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            models.append(validate_payload(line.removesuffix("\r"), definition))
        except ValueError as exc:
            return BadLine(number, str(exc))
    return models


def task_named(
    tasks: Mapping[str, TaskDef[Any, Any]], name: str, app_spec: str
) -> TaskDef[Any, Any]:
    """The task registered as `name`.

    Raises:
        UsageError: no such task; the message suggests the closest names.
    """
    if name in tasks:
        return tasks[name]
    if not tasks:
        raise UsageError(f"task {name!r} is not registered: --app {app_spec!r} has no tasks")
    close = difflib.get_close_matches(name, tasks, n=3)
    if close:
        hint = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        known = sorted(tasks)
        hint = "its tasks are " + ", ".join(known[:SHOWN_TASKS])
        hint += f" and {len(known) - SHOWN_TASKS} more" if len(known) > SHOWN_TASKS else ""
    raise UsageError(f"task {name!r} is not registered on --app {app_spec!r}; {hint}")


def _read(file: str) -> str:
    try:
        return sys.stdin.read() if file == STDIN else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"cannot read --file {file!r}: {reason}") from None


def _label(file: str | None) -> str:
    return "stdin" if file == STDIN else _safe(str(file))


def _payloads(
    payload: str | None, file: str | None, definition: TaskDef[Any, Any]
) -> list[BaseModel]:
    if payload is not None and file is None:
        try:
            return [validate_payload(payload, definition)]
        except ValueError as exc:
            raise UsageError(f"--json: {_safe(str(exc))}") from None
    if file is not None and payload is None:
        found = validate_ndjson(_read(file), definition)
        if isinstance(found, BadLine):
            # a key quoted back by pydantic may hold a newline: the error stays one line
            where, problem = _label(file), _safe(found.problem)
            raise UsageError(f"{where} line {found.number}: {problem}; nothing was published")
        return found
    raise UsageError("give the payload with --json '{...}' or --file tasks.ndjson (one of them)")


def _later(delay: str | None, at: str | None) -> dict[str, Any]:
    """--delay or --at as `Task.message` options."""
    if delay is not None and at is not None:
        raise UsageError("give --delay or --at, not both")
    if delay is not None:
        try:
            return {"delay": timedelta(seconds=parse_duration(delay))}
        except ValueError as exc:
            raise UsageError(f"--delay {_safe(delay)!r}: {exc}") from None
    if at is not None:
        try:
            when = datetime.fromisoformat(at)
        except ValueError:
            raise UsageError(f"--at {_safe(at)!r} is not an ISO 8601 time") from None
        if when.tzinfo is None:
            raise UsageError(f"--at {_safe(at)!r} has no offset; add Z or +01:00")
        return {"at": when}
    return {}


def _key(key: str | None, file: str | None) -> str | None:
    """--idempotency-key: one task's message id, so never one shared by a file's lines."""
    if key is None:
        return None
    if file is not None:
        raise UsageError("--idempotency-key names one task: use it with --json, not --file")
    return key


def _namespace(option: str | None, app: App, topology: Path) -> str:
    """--namespace, else the App's own, else the topology's (as `rabbitq consume` takes it)."""
    if option is not None:
        if not re.match(NAMESPACE_PATTERN, option):
            raise UsageError(f"--namespace {option!r} must match {NAMESPACE_PATTERN}")
        return option
    if app.namespace is not None:
        return app.namespace
    if not topology.exists():
        raise UsageError(
            f"the App has no namespace and --topology {str(topology)!r} does not exist; "
            "pass --namespace NS or point --topology at the topology files"
        )
    return load_topology(topology).namespace


def register(
    cli: typer.Typer,
    options: dict[str, Any],
    run: Callable[[Coroutine[Any, Any, Any]], Any],
    errors: Callable[..., AbstractContextManager[None]],
    load_app: Callable[[str], App],
    quiet_logs: Callable[[], None],
) -> None:
    """Add `publish` to the `rabbitq` command (options and helpers are `_cli`'s own)."""

    @cli.command("publish")
    def publish(
        task: str = typer.Argument(..., help="The task name, as registered with @app.task."),
        payload: str | None = typer.Option(
            None,
            "--json",
            help="The payload: one JSON document (here --json is input, not an output format).",
        ),
        file: str | None = typer.Option(
            None, "--file", help="An ndjson file, one payload a line ('-' reads stdin)."
        ),
        priority: int | None = typer.Option(
            None, "--priority", help="0 to 255, higher runs first (capped at max_priority)."
        ),
        deadline: str | None = typer.Option(
            None, "--deadline", help="Parked as expired, not run, if not started within, e.g. 5m."
        ),
        delay: str | None = typer.Option(
            None, "--delay", help="Run it this long from now, e.g. 90s, 10m, 2h, 3d."
        ),
        at: str | None = typer.Option(
            None,
            "--at",
            help="Run it at this ISO 8601 time with its offset, e.g. 2027-01-01T09:00Z.",
        ),
        idempotency_key: str | None = typer.Option(
            None,
            "--idempotency-key",
            help="The task's message id (with --json): run the command again with the same key "
            "and consumers can tell it is the same task.",
        ),
        app_spec: str = typer.Option(
            ..., "--app", envvar="RABBITQ_APP", help="Where the App is: 'package.module:app'."
        ),
        topology: Path = options["topology"],
        namespace: str | None = options["namespace"],
        url: str = options["url"],
        debug: bool = options["debug"],
    ) -> None:
        """Publish tasks, validated against the task's model; prints each message id, one per
        line, once the broker confirmed it.

        The namespace is --namespace, else the App's own, else the one --topology declares.
        An ndjson file is validated whole first: a bad line is reported with its number
        and nothing of the file is sent. --json is the payload, not an output format:
        ids one per line are already machine-readable.

        Example:
        rabbitq publish emails.send --app emails:app --json '{"to": "a@b.example", "subject": "hi"}'
        rabbitq publish emails.send --app emails:app --file tasks.ndjson --priority 3 --deadline 5m
        rabbitq publish emails.send --app emails:app --json '{"to": "a@b.example"}' --delay 2h
        """
        quiet_logs()
        with errors(url, debug=debug):
            app = load_app(app_spec)
            definition = task_named(app.tasks, task, app_spec)
            try:
                within = None if deadline is None else timedelta(seconds=parse_duration(deadline))
            except ValueError as exc:
                raise UsageError(f"--deadline {deadline!r}: {exc}") from None
            later = _later(delay, at)
            key = _key(idempotency_key, file)
            models = _payloads(payload, file, definition)
            # A Task of an App in the chosen namespace: the user's App is left as it was.
            sender = Task(App(namespace=_namespace(namespace, app, topology)), definition)
            try:
                messages = [
                    sender.message(
                        m, priority=priority, deadline=within, idempotency_key=key, **later
                    )
                    for m in models
                ]
            except ConfigError as exc:  # an option is out of range (the payloads are valid)
                option = next(
                    (o for p, o in _OPTION_OF_ERROR if str(exc).startswith(p)), "--delay/--at"
                )
                raise UsageError(f"{option}: {exc}") from None
            if not messages:
                typer.echo(f"no tasks in {_label(file)}: nothing was published", err=True)
                return
            outcome = run(_send(url, messages))
            for out, error in zip(messages, outcome, strict=True):
                if error is None:
                    typer.echo(out.message_id)
            failed = sum(e is not None for e in outcome)
            if 0 < failed < len(messages):
                typer.echo(
                    f"published {len(messages) - failed} of {len(messages)} tasks (their ids are "
                    f"on stdout); {failed} {'was' if failed == 1 else 'were'} not confirmed",
                    err=True,
                )
            raise_first(messages, outcome)


async def _send(url: str, messages: list[Outgoing]) -> list[SendError | None]:
    """Each message's error, or None once confirmed; cannot connect raises before any is sent."""
    publisher = Publisher(url, name="publish")
    try:
        await publisher.start()
        if tracing.ENABLED:  # traced if the --app module set a TracerProvider
            with tracing.sending_batch(messages, url) as span:
                errors = await publisher.send_many(messages)
                if span is not None and (failed := [e for e in errors if e is not None]):
                    tracing.end(span, failed[0])
                return errors
        return await publisher.send_many(messages)
    finally:
        await publisher.close()
