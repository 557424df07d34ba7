"""An importable App for consumers run as subprocesses (`--app tests.broker.apps:app`).

It has no namespace: `rabbitq consume` takes it from the topology. Every task is registered
for the workload `proc`; tests write their topology with that workload name. Handlers append
`<message id> start` and `<message id> done` lines to the marker file named in the payload, so
a test can see what ran and what finished without talking to the process.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from pydantic import BaseModel

import rabbitq
from rabbitq import TaskContext

WORKLOAD = "proc"

app = rabbitq.App()


class Slow(BaseModel):
    """Sleep `seconds`, noting the start and the end in `marker`."""

    seconds: float
    marker: str


def _mark(marker: str, message_id: str, what: str) -> None:
    # One short append per line: lines from concurrent handlers never interleave mid-line.
    with Path(marker).open("a", encoding="utf-8") as f:
        f.write(f"{message_id} {what}\n")


@app.task("slow", workload=WORKLOAD)
async def slow(payload: Slow, ctx: TaskContext) -> None:
    """An async handler: cancellable while it sleeps."""
    _mark(payload.marker, ctx.message_id, "start")
    await asyncio.sleep(payload.seconds)
    _mark(payload.marker, ctx.message_id, "done")


@app.task("slow_sync", workload=WORKLOAD)
def slow_sync(payload: Slow, ctx: TaskContext) -> None:
    """A sync handler: runs in a worker thread, which cannot be cancelled."""
    _mark(payload.marker, ctx.message_id, "start")
    time.sleep(payload.seconds)
    _mark(payload.marker, ctx.message_id, "done")


def read_marks(marker: Path) -> tuple[set[str], set[str]]:
    """The ids that started and the ids that finished, from a marker file."""
    started: set[str] = set()
    done: set[str] = set()
    if not marker.exists():
        return started, done
    for line in marker.read_text(encoding="utf-8").splitlines():
        message_id, _, what = line.partition(" ")
        (started if what == "start" else done).add(message_id)
    return started, done


class Note(BaseModel):
    n: int


@app.task("quick", workload=WORKLOAD)
async def quick(payload: Note) -> None:
    """Does nothing: a success."""


@app.task("leaky", workload=WORKLOAD)
async def leaky(payload: Note) -> None:
    """Fails quoting the broker URL, as a library that puts its DSN in an error might."""
    raise ConnectionError(f"cannot reach {os.environ.get('RABBITQ_URL', '')} (task {payload.n})")
