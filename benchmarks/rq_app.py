"""The rabbitq side's tasks: one per benchmark workload, handlers that take a pydantic model.

`build_app(probe)` registers them on a fresh `App`; the consumer process hands in its `Probe`,
the runner (which only publishes) hands in none. The handlers do nothing but let the probe see
them, so what is measured is rabbitq's own path.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel

import rabbitq
from benchmarks.names import WORKLOADS
from benchmarks.probe import Probe
from benchmarks.wire import TASK_TYPE_PREFIX, pad_for


class Job(BaseModel):
    """The ~100-byte payload (see `benchmarks.wire.body`)."""

    id: int
    sent_at: float
    pad: str

    @classmethod
    def make(cls, task_id: int, sent_at: float = 0.0) -> Job:
        return cls(id=task_id, sent_at=sent_at, pad=pad_for(task_id, sent_at))


class FailOnce(Exception):
    """Raised by the first attempt of a retry-path task."""


def task_name(workload: str) -> str:
    return f"{TASK_TYPE_PREFIX}{workload}"


def build_app(
    probe: Probe | None = None,
) -> tuple[rabbitq.App, dict[str, rabbitq.Task[Any, Any]]]:
    """An App with one task per workload, and the tasks by workload."""
    app = rabbitq.App()
    seen = probe or Probe(expect=0, idle_seconds=0, gated=False)

    async def noop(msg: Job) -> None:
        if seen.admit():
            await seen.gate.wait()
        seen.finished()

    async def timed(msg: Job) -> None:
        now = time.time()
        if seen.admit():
            await seen.gate.wait()
        seen.latency(msg.sent_at, now)
        seen.finished()

    async def fail_once(msg: Job, ctx: rabbitq.TaskContext) -> None:
        if seen.admit():
            await seen.gate.wait()
        if ctx.attempt == 1:
            raise FailOnce("first attempt fails by design")
        seen.finished()

    async def forward(msg: Job, ctx: rabbitq.TaskContext) -> None:
        # Counted as it raises: the forward and its ack happen just after, in rabbitq.
        if seen.admit():
            await seen.gate.wait()
        if ctx.attempt == 1:
            seen.finished()
            raise FailOnce("first attempt fails by design")

    async def answer(msg: Job) -> int:
        # a call: the result depends on the payload, so each caller can check its own
        if seen.admit():
            await seen.gate.wait()
        seen.finished()
        return msg.id * 2

    handlers: dict[str, Callable[..., Awaitable[Any]]] = {
        "latency": timed,
        "retry": fail_once,
        "tiers": forward,
        "calls": answer,
    }
    tasks = {
        name: app.task(task_name(name), workload=name)(handlers.get(name, noop))
        for name in WORKLOADS
    }
    return app, tasks
