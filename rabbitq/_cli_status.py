"""`rabbitq status`: per workload, what waits, what runs, what is parked, and the rates.

The rows, the table, ages and the redraw are pure functions of a `_status.Status`; the
command reads one per round (`_status.read`) on one connection it keeps while it watches.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from rabbitq import _status as status_
from rabbitq._connection import connect
from rabbitq._errors import TopologyInvalid, UsageError
from rabbitq._management import Management, ManagementUnavailable
from rabbitq._topology import Topology, Workload, load_topology

UNKNOWN = "?"
HEADER = (
    "WORKLOAD",
    "QUEUE",
    "READY",
    "RUNNING",
    "CONSUMERS",
    "OLDEST",
    "PUBLISHED/s",
    "DELIVERED/s",
    "ACKED/s",
)
_LEFT = 2  # the first two columns are names, the rest numbers
# ANSI: cursor home, clear the whole screen, clear to the end of the line, clear below.
HOME, CLEAR_SCREEN, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[2J", "\x1b[K", "\x1b[J"


def format_age(seconds: float) -> str:
    """An age in its two largest units, as an operator reads it: 45s, 2m05s, 3h10m, 2d4h."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600}h"


def _count(value: int | None) -> str:
    return UNKNOWN if value is None else str(value)


def _rate(rates: status_.Rates | None, name: str) -> str:
    value = None if rates is None else getattr(rates, name)
    return UNKNOWN if value is None else f"{value:.1f}"


def rows(status: status_.Status, now: float) -> list[tuple[str, ...]]:
    """One row per queue: the work queue, each tier shortest first, the parking lot.

    A cell that does not apply is blank; one the broker did not say is `?`.
    """
    out: list[tuple[str, ...]] = []
    for w in status.workloads:
        out.append(
            (
                w.name,
                "work",
                str(w.ready),
                _count(w.running),
                str(w.consumers),
                "",
                _rate(w.rates, "published_per_second"),
                _rate(w.rates, "delivered_per_second"),
                _rate(w.rates, "acked_per_second"),
            )
        )
        out += [(w.name, f"retry {label}", str(depth), *[""] * 6) for label, depth in w.tiers]
        age = w.oldest_parked_age_seconds(now)
        oldest = "" if not w.parked else UNKNOWN if age is None else format_age(age)
        parked_rate = _rate(w.rates, "parked_per_second")
        out.append((w.name, "parking", str(w.parked), "", "", oldest, parked_rate, "", ""))
    return out


def table(lines: Sequence[tuple[str, ...]], header: tuple[str, ...] = HEADER) -> list[str]:
    """Aligned columns: names to the left, numbers to the right, two spaces apart."""
    every = [header, *lines]
    widths = [max(len(row[i]) for row in every) for i in range(len(header))]
    return [
        "  ".join(
            cell.ljust(width) if i < _LEFT else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in every
    ]


def text(status: status_.Status, now: float, title: str | None = None) -> list[str]:
    """The lines `rabbitq status` prints: a title, the table, then any notes."""
    head = f"namespace {status.namespace}"
    lines = [f"{head}  {title}" if title else head]
    lines += table(rows(status, now))
    if status.delayed is not None:
        lines.append(f"delayed: {_waiting(status.delayed)} in the delay ladder (every workload)")
    lines += [f"note: {note}" for note in status.notes]
    return lines


def _waiting(count: int) -> str:
    return "1 task waits" if count == 1 else f"{count} tasks wait"


def redraw(lines: Sequence[str], first: bool) -> str:
    """A frame drawn over the last one in place, as top does: home, each line cleared to its
    end, the rest of the screen cleared (the first frame clears the whole screen)."""
    start = CLEAR_SCREEN + HOME if first else HOME
    return start + "".join(f"{line}{CLEAR_LINE}\n" for line in lines) + CLEAR_BELOW


def clock(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%H:%M:%S UTC")


def _chosen(topology: Topology, name: str | None) -> list[Workload]:
    if name is None:
        return list(topology.workloads.values())
    try:
        return [topology.workload(name)]
    except TopologyInvalid as exc:  # the WORKLOAD argument is wrong, not the files
        raise UsageError(str(exc)) from exc


def _management(url: str, management_url: str | None) -> Management:
    try:
        return Management.from_urls(url, management_url)
    except ManagementUnavailable as exc:  # only a malformed --management-url raises here
        raise UsageError(str(exc)) from exc


async def _rounds(
    url: str,
    namespace: str,
    workloads: list[Workload],
    ladder: Sequence[str],
    api: Management,
    watch: float | None,
    as_json: bool,
    tty: bool,
) -> None:
    """Read and print once, or every `watch` seconds until cancelled (Ctrl-C)."""
    connection = await connect(url, "status")
    try:
        first = True
        while True:
            started = time.monotonic()
            status = await status_.read(connection, namespace, workloads, api, ladder)
            now = time.time()
            if as_json:
                document = status.document(now)
                typer.echo(json.dumps(document, indent=None if watch else 2))
            elif watch is None:
                typer.echo("\n".join(text(status, now)))
            elif tty:
                title = f"{clock(now)}  every {watch:g}s, Ctrl-C to stop"
                sys.stdout.write(redraw(text(status, now, title), first))
                sys.stdout.flush()
            else:  # a log or a pipe: one snapshot after another, a blank line apart
                typer.echo("\n".join(text(status, now, clock(now))) + "\n")
            if watch is None:
                return
            first = False
            await asyncio.sleep(max(0.0, started + watch - time.monotonic()))
    finally:
        await connection.close()


def register(cli: typer.Typer, options: dict[str, Any], run: Any, errors: Any) -> None:
    """Add `status` to the `rabbitq` command (options and helpers are `_cli`'s own)."""

    @cli.command("status")
    def status(
        workload: str | None = typer.Argument(
            None, help="Only this workload (default: every workload of the topology)."
        ),
        watch: bool = typer.Option(
            False, "--watch", help="Refresh every --interval seconds until Ctrl-C."
        ),
        interval: float = typer.Option(
            2.0, "--interval", min=0.1, help="Seconds between refreshes with --watch."
        ),
        topology: Path = options["topology"],
        namespace: str | None = options["namespace"],
        url: str = options["url"],
        management_url: str | None = options["management_url"],
        as_json: bool = options["json"],
        debug: bool = options["debug"],
    ) -> None:
        """Per workload: ready and running tasks and consumers of the work queue, each retry
        tier's depth, the parking lot's depth and its oldest task's age, and message rates.

        Ready counts, depths and consumers are read live over AMQP. Running (unacked) counts
        and rates come from the management API as of its last statistics round (up to 5 s
        old); where it does not answer they show as ? (null in --json), with a note.

        --watch redraws in place, as top does, until Ctrl-C (exit 0). When stdout is not a
        terminal, or with --json, it prints a fresh snapshot every interval instead (with
        --json one document per line), for a log or a pipe.

        Example: rabbitq status emails --watch
        """
        with errors(url, as_json, debug):
            topo = load_topology(topology, namespace)
            chosen = _chosen(topo, workload)
            api = _management(url, management_url)
            every = interval if watch else None
            tty = watch and not as_json and sys.stdout.isatty()
            try:
                ladder = [q.name for q in topo.ladder_queues()]
                run(_rounds(url, topo.namespace, chosen, ladder, api, every, as_json, tty))
            except KeyboardInterrupt:
                if not watch:
                    raise
            except BrokenPipeError:  # `rabbitq status --watch | head`: the reader left
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
