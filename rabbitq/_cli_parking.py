"""`rabbitq parking list|show|replay|purge`: what failed and why, and sending it back.

Everything printed from a message passes through `_safe`: a parked copy carries what any
publisher wrote, and a terminal must not take its control characters as commands.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from rabbitq import _parking as parking
from rabbitq._errors import TopologyInvalid, UsageError
from rabbitq._topology import Workload, load_topology, parse_duration

parking_cli = typer.Typer(
    help="Read the parking lot: what failed, why, and where. Nothing is moved or reordered.",
    no_args_is_help=True,
)

# The selection every parking command takes (list has no --all/--id: it shows everything).
TASK = typer.Option(None, "--task", help="Only this task name.")
REASON = typer.Option(None, "--reason", help="Only this park reason.")
ERROR = typer.Option(None, "--error", help="Only this error type.")
SINCE = typer.Option(None, "--since", help="Parked within, e.g. 1h.")
GROUP = typer.Option(None, "--group", help="Only this fingerprint.")
ALL = typer.Option(False, "--all", help="Every parked task.")
IDS = typer.Option([], "--id", help="This message id (repeatable).")


def _safe(text: str, keep_newlines: bool = False) -> str:
    """Control characters (escape sequences included) shown as escapes, never sent raw."""
    return "".join(
        c if c.isprintable() or (keep_newlines and c == "\n") else repr(c)[1:-1] for c in text
    )


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _age(seconds: float | None, now: float) -> str:
    if seconds is None:
        return "-"
    age = max(0.0, now - seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if age >= size:
            return f"{age / size:.0f}{unit}"
    return f"{age:.0f}s"


def _workload(topology: Path, namespace: str | None, name: str) -> Workload:
    topo = load_topology(topology, namespace)
    try:
        return topo.workload(name)
    except TopologyInvalid as exc:  # the WORKLOAD argument is wrong, not the files
        raise UsageError(str(exc)) from exc


def _filter(
    task: str | None, reason: str | None, error: str | None, since: str | None, group: str | None
) -> parking.Filter:
    try:
        within = None if since is None else parse_duration(since)
    except ValueError as exc:
        raise UsageError(f"--since {since!r}: {exc}") from None
    return parking.Filter(task, reason, error, within, group)


def register(cli: typer.Typer, options: dict[str, Any], run: Any, errors: Any) -> None:
    """Add `parking` to the `rabbitq` command (options and helpers are `_cli`'s own)."""
    cli.add_typer(parking_cli, name="parking")

    @parking_cli.command("list")
    def parking_list(
        workload: str = typer.Argument(..., help="The workload whose parking lot to read."),
        task: str | None = TASK,
        reason: str | None = REASON,
        error: str | None = ERROR,
        since: str | None = SINCE,
        group: str | None = GROUP,
        limit: int = typer.Option(50, "--limit", min=1, help="Show at most this many."),
        by_group: bool = typer.Option(False, "--groups", help="One line per failure site."),
        topology: Path = options["topology"],
        namespace: str | None = options["namespace"],
        url: str = options["url"],
        as_json: bool = options["json"],
        debug: bool = options["debug"],
    ) -> None:
        """List parked tasks (oldest first), or with --groups one line per fingerprint (the
        task, the error type and the frames of its traceback: one bug, one line).

        Example: rabbitq parking list emails --reason retries_exhausted --since 1h
        """
        with errors(url, as_json, debug):
            spec = _workload(topology, namespace, workload)
            chosen = _filter(task, reason, error, since, group)
            now = time.time()
            found = parking.select(run(parking.browse(url, spec)), chosen, now)
            if by_group:
                rows = parking.groups(found)
                if as_json:
                    typer.echo(json.dumps([g.facts() for g in rows[:limit]], indent=2))
                    return
                for g in rows[:limit]:
                    typer.echo(
                        f"{g.fingerprint}  {g.count:>6}  {_safe(g.task)}  {_safe(g.error_type)}"
                        f"  at {_safe(g.where) or '-'}  last {_when(g.last_seen)}"
                        f"  e.g. {_safe(g.example[:80])}"
                    )
                return
            if as_json:
                typer.echo(json.dumps([t.facts(now) for t in found[:limit]], indent=2))
                return
            for t in found[:limit]:
                typer.echo(
                    f"{_safe(t.message_id)}  {_safe(t.task)}  {_safe(t.reason)}  "
                    f"{_safe(t.error_type)}: {_safe(t.error[:80])}  attempts {t.attempts}  "
                    f"parked {_when(t.parked_at)} ({_age(t.parked_at, now)} ago)"
                )
            if len(found) > limit:
                typer.echo(f"... and {len(found) - limit} more (--limit)", err=True)

    @parking_cli.command("show")
    def parking_show(
        workload: str = typer.Argument(..., help="The workload whose parking lot to read."),
        message_id: str = typer.Argument(..., help="The parked task's message id."),
        topology: Path = options["topology"],
        namespace: str | None = options["namespace"],
        url: str = options["url"],
        as_json: bool = options["json"],
        debug: bool = options["debug"],
    ) -> None:
        """Everything about one parked task: its headers, traceback and payload.

        Example: rabbitq parking show emails 3f2a9c...
        """
        with errors(url, as_json, debug):
            spec = _workload(topology, namespace, workload)
            now = time.time()
            chosen = parking.Filter(ids=frozenset({message_id}))
            found = parking.select(run(parking.browse(url, spec)), chosen, now)
            if not found:
                raise UsageError(f"no parked task {message_id!r} in {spec.parking_queue}")
            t = found[0]
            if as_json:
                facts = t.facts(now) | {"traceback": t.traceback, "payload": t.payload()}
                typer.echo(json.dumps(facts | {"headers": t.headers}, indent=2, default=str))
                return
            for key, value in t.facts(now).items():
                typer.echo(f"{key}: {_safe(str(value))}")
            typer.echo("headers:")
            for key, value in sorted(t.headers.items()):
                typer.echo(f"  {_safe(str(key))}: {_safe(str(value))}")
            typer.echo("traceback:")
            typer.echo(_safe(t.traceback, keep_newlines=True) or "  (none)")
            typer.echo("payload:")
            typer.echo(_safe(t.pretty_payload(), keep_newlines=True))

    def _selection(
        all_: bool,
        ids: list[str],
        task: str | None,
        reason: str | None,
        error: str | None,
        since: str | None,
        group: str | None,
    ) -> parking.Filter:
        chosen = dataclasses.replace(_filter(task, reason, error, since, group), ids=frozenset(ids))
        if not all_ and chosen == parking.Filter():
            raise UsageError("say which tasks: --all, --id ID, or a filter (--task, --reason, ...)")
        return chosen

    def _rate(rate: str | None) -> float | None:
        if rate is None:
            return None
        try:
            per_second = float(rate.removesuffix("/s"))
        except ValueError:
            per_second = 0.0
        if per_second <= 0:
            raise UsageError(
                f"--rate {rate!r} must be a positive number of tasks a second, e.g. 100/s"
            )
        return per_second

    @parking_cli.command("replay")
    def parking_replay(
        workload: str = typer.Argument(..., help="The workload whose parked tasks to send back."),
        all_: bool = ALL,
        ids: list[str] = IDS,
        task: str | None = TASK,
        reason: str | None = REASON,
        error: str | None = ERROR,
        since: str | None = SINCE,
        group: str | None = GROUP,
        limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many."),
        rate: str | None = typer.Option(
            None, "--rate", help="At most this many a second, e.g. 50/s."
        ),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Print what would move; move nothing."
        ),
        topology: Path = options["topology"],
        namespace: str | None = options["namespace"],
        url: str = options["url"],
        as_json: bool = options["json"],
        debug: bool = options["debug"],
    ) -> None:
        """Send parked tasks back to the work queue with a fresh attempt budget (their earlier
        parks kept in the rabbitq-history header); the others stay parked, in their order.

        Each task's new copy is confirmed by the broker before its parked copy is removed. A
        replay stopped at any point (even kill -9) loses nothing: at worst the one task in
        hand is both sent and still parked, and running the same replay again sends it again.

        Example: rabbitq parking replay emails --group 3f2a9c01b7de --rate 50/s
        """
        with errors(url, as_json, debug):
            spec = _workload(topology, namespace, workload)
            chosen = _selection(all_, ids, task, reason, error, since, group)
            per_second = _rate(rate)
            if dry_run:
                found = parking.select(run(parking.browse(url, spec)), chosen)[:limit]
                _report("would replay", found, as_json)
                return

            moved = run(parking.replay(url, spec, chosen, limit, per_second))
            _report("replayed", moved, as_json)

    @parking_cli.command("purge")
    def parking_purge(
        workload: str = typer.Argument(..., help="The workload whose parked tasks to delete."),
        all_: bool = ALL,
        ids: list[str] = IDS,
        task: str | None = TASK,
        reason: str | None = REASON,
        error: str | None = ERROR,
        since: str | None = SINCE,
        group: str | None = GROUP,
        yes: bool = typer.Option(False, "--yes", help="Do not ask (needed without a terminal)."),
        topology: Path = options["topology"],
        namespace: str | None = options["namespace"],
        url: str = options["url"],
        as_json: bool = options["json"],
        debug: bool = options["debug"],
    ) -> None:
        """Delete parked tasks for good; asks first unless --yes. The others stay parked.

        Example: rabbitq parking purge emails --reason poison --yes
        """
        with errors(url, as_json, debug):
            spec = _workload(topology, namespace, workload)
            chosen = _selection(all_, ids, task, reason, error, since, group)
            if not yes:
                if not sys.stdin.isatty():
                    raise UsageError("purge deletes tasks for good: add --yes (no terminal to ask)")
                found = parking.select(run(parking.browse(url, spec)), chosen)
                if not typer.confirm(f"delete {len(found)} parked tasks for good?"):
                    raise typer.Exit(1)
            _report("purged", run(parking.purge(url, spec, chosen)), as_json)


def _report(what: str, tasks: list[parking.Parked], as_json: bool) -> None:
    now = time.time()
    if as_json:
        typer.echo(json.dumps({what.replace(" ", "_"): [t.facts(now) for t in tasks]}, indent=2))
        return
    for t in tasks:
        typer.echo(f"{what} {_safe(t.message_id)}  {_safe(t.task)}  {_safe(t.reason)}")
    typer.echo(f"{what} {len(tasks)} task{'' if len(tasks) == 1 else 's'}", err=True)
