"""The App of the ledger harness, for consumers run as `--app tests.ledger_app:app`.

Every handler writes an execution to the SQLite ledger named in its payload before it returns
(see tests/ledger.py): a `start` row when it begins, then `done` (it is about to return), or
`failed` (it is about to raise), or the fault it is about to inject. A task can ask for a fault:

* `exit`: `os._exit(1)`, the process dies with the task running (crash-loop tests);
* `hang`: sleep for an hour; only the handler's `timeout_seconds` ends it;
* `block_loop`: `time.sleep(block_ms)` inside an async handler, so the event loop (and with it
  every heartbeat and ack) stops for that long;
* `stubborn` (async only): the handler swallows its cancellation (as code with a broad
  `except BaseException` does), waits for its gate and returns normally, long after the
  channel its delivery came on died.

`behaviour_attempts` limits the fault to attempts 1..n (0: every attempt) and `behaviour_once`
to a first delivery (a redelivered task, one that may have run before, runs normally). A task
with a `gate` (a file path) waits after its `start` row until that file exists, so a test can
hold the running tasks until its fault is in place.

On a cluster a test puts a consumer on a node of its choosing first: `LEDGER_FIRST_NODE=i`
makes this process try the i-th node of its `RABBITQ_URL` first (then the others, as any
process does), instead of a node of its shuffled order.

The app has no namespace: `rabbitq consume` takes it from the topology. Task names do not pin
the queue a consumer reads: any workload whose consumer runs this app can carry these tasks,
so a test gives its workload a unique name and publishes there.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import rabbitq
from rabbitq import TaskContext
from rabbitq._connection import NODE_ORDER, nodes
from tests.ledger import (
    SHORT_TIMEOUT_SECONDS,
    TASK,
    TASK_SHORT,
    TASK_SYNC,
    TIMEOUT_SECONDS,
    Behaviour,
    Ledger,
    LedgerTask,
)

WORKLOAD = "ledger"  # only a default: a consumer of any workload runs these tasks
HANG_SECONDS = 3600.0
GATE_POLL_SECONDS = 0.01


def _gate_open(task: LedgerTask) -> bool:
    return not task.gate or Path(task.gate).exists()


def _fault(task: LedgerTask, ctx: TaskContext) -> Behaviour:
    """The fault this execution injects, or ""."""
    if not task.behaviour:
        return ""
    if task.behaviour_attempts and ctx.attempt > task.behaviour_attempts:
        return ""
    if task.behaviour_once and ctx.redelivered:
        return ""
    return task.behaviour


def _record(task: LedgerTask, ctx: TaskContext, event: str) -> None:
    Ledger(task.ledger).record(task.id, ctx.attempt, event, redelivered=ctx.redelivered)


def _finish(task: LedgerTask, ctx: TaskContext) -> None:
    if ctx.attempt <= task.fail_first_attempts:
        _record(task, ctx, "failed")
        raise RuntimeError(f"ledger task {task.id} fails on attempt {ctx.attempt}")
    _record(task, ctx, "done")


async def _wait_gate(task: LedgerTask) -> None:
    async with asyncio.timeout(TIMEOUT_SECONDS):
        while not _gate_open(task):  # noqa: ASYNC110 - another process creates the file
            await asyncio.sleep(GATE_POLL_SECONDS)


async def run_async(task: LedgerTask, ctx: TaskContext) -> None:
    _record(task, ctx, "start")
    fault = _fault(task, ctx)
    if fault == "stubborn":
        _record(task, ctx, fault)
        try:
            await _wait_gate(task)
        except asyncio.CancelledError:
            # The fault: cancelled (its channel died), it carries on and returns normally.
            _record(task, ctx, "ignored_cancel")
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            await _wait_gate(task)
    else:
        await _wait_gate(task)
        if fault:
            _record(task, ctx, fault)
    if fault == "exit":
        os._exit(1)
    elif fault == "hang":
        await asyncio.sleep(HANG_SECONDS)
    elif fault == "block_loop":
        time.sleep(task.block_ms / 1000)  # noqa: ASYNC251 - the fault: it blocks the loop
    if task.sleep_ms:
        await asyncio.sleep(task.sleep_ms / 1000)
    _finish(task, ctx)


def run_sync(task: LedgerTask, ctx: TaskContext) -> None:
    _record(task, ctx, "start")
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while not _gate_open(task) and time.monotonic() < deadline:
        time.sleep(GATE_POLL_SECONDS)
    fault = _fault(task, ctx)
    if fault:
        _record(task, ctx, fault)
    if fault == "exit":
        os._exit(1)
    elif fault == "hang":
        time.sleep(HANG_SECONDS)
    elif fault == "block_loop":
        time.sleep(task.block_ms / 1000)  # a thread: the loop runs on
    if task.sleep_ms:
        time.sleep(task.sleep_ms / 1000)
    _finish(task, ctx)


def make_app(namespace: str | None = None, url: str | None = None) -> rabbitq.App:
    """A fresh App with the ledger tasks (an in-process consumer binds its namespace to it)."""
    new = rabbitq.App(namespace, url=url)

    @new.task(TASK, workload=WORKLOAD, timeout_seconds=TIMEOUT_SECONDS)
    async def record(task: LedgerTask, ctx: TaskContext) -> None:
        """Async: records, optionally injects a fault, sleeps `sleep_ms`, records the end."""
        await run_async(task, ctx)

    @new.task(TASK_SYNC, workload=WORKLOAD, timeout_seconds=TIMEOUT_SECONDS)
    def record_sync(task: LedgerTask, ctx: TaskContext) -> None:
        """Sync (in a worker thread): the same steps."""
        run_sync(task, ctx)

    @new.task(TASK_SHORT, workload=WORKLOAD, timeout_seconds=SHORT_TIMEOUT_SECONDS)
    async def record_short(task: LedgerTask, ctx: TaskContext) -> None:
        """Async with a short timeout, for hanging handlers."""
        await run_async(task, ctx)

    return new


def pin_first_node(url: str, index: int) -> None:
    """This process tries node `index` of `url` first (see the module's docstring)."""
    NODE_ORDER.candidates(url)
    NODE_ORDER.answered(url, nodes(url)[index])


if os.environ.get("LEDGER_FIRST_NODE"):
    pin_first_node(os.environ.get("RABBITQ_URL", ""), int(os.environ["LEDGER_FIRST_NODE"]))

app = make_app()
