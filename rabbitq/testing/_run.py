"""`run_task`: one attempt of a task, decided as the consumer decides it, without a broker.

The payload goes the consumer's way: encoded as a publish encodes it, its envelope read by
`_wire.decode`, `_outcome.decide` asked whether it runs, the payload validated from the bytes
by the task's own `parse`, the handler run by its `run` (with its timeout), and `decide` asked
again, under the task's rules, what becomes of it. Nothing here pretends to be a broker: no
queue holds the task, and nothing is sent. A handler that publishes still publishes (to the
app's broker), so run those with the broker fixture instead.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from rabbitq import _wire as wire
from rabbitq._app import App, Task, _deadline_seconds
from rabbitq._errors import ConfigError, ParkReason, Poison
from rabbitq._handlers import TaskContext, TaskDef
from rabbitq._outcome import RAN, Outcome, ParkNow, Ran, RetryIn, Run, Succeeded, decide
from rabbitq._topology import Topology, Workload, load_topology

DEFAULT_TOPOLOGY = Path("topology")


@dataclass(frozen=True, slots=True)
class TaskRun:
    """What the consumer would do with one attempt of a task (`run_task`).

    Attributes:
        task: the task name.
        attempt: the attempt that ran (1 the first time).
        outcome: `succeeded` (acked), `retried` (sent to a retry tier) or `parked`.
        result: what the handler returned, validated against its return annotation (None
            unless it succeeded).
        tier: the retry tier's label (`"1m"`), when retried.
        tier_index: its place among the workload's tiers, 0 first, when retried.
        delay_seconds: the tier's delay, when retried: the next attempt runs this much later.
        reason: why it was parked, when parked.
        detail: why, in words, when parked and the reason says more than the error
            (`not_retryable`: which rule; poison: what was wrong).
        error: what the handler raised, or the `Poison` that stopped it before it ran; None
            when it succeeded.
    """

    task: str
    attempt: int
    outcome: Literal["succeeded", "retried", "parked"]
    result: Any = None
    tier: str | None = None
    tier_index: int | None = None
    delay_seconds: float | None = None
    reason: ParkReason | None = None
    detail: str = ""
    error: BaseException | None = None

    @property
    def succeeded(self) -> bool:
        return self.outcome == "succeeded"

    @property
    def retried(self) -> bool:
        return self.outcome == "retried"

    @property
    def parked(self) -> bool:
        return self.outcome == "parked"


async def run_task(
    app: App,
    task: Task[Any, Any] | str,
    payload: BaseModel | dict[str, Any] | bytes,
    *,
    attempt: int = 1,
    topology: Topology | Path | str = DEFAULT_TOPOLOGY,
    deadline: datetime | timedelta | None = None,
    priority: int = 0,
    message_id: str | None = None,
) -> TaskRun:
    """Run one attempt of `task` in this event loop and say what the consumer would do.

    Args:
        app: the app the task is registered in.
        task: the task, or its registered name.
        payload: the task's model or a dict (validated as a publish validates it), or the
            body's bytes as they would arrive (to see what becomes of a bad body).
        attempt: the attempt number the delivery carries (1 the first time); the last one
            the rules allow is parked as `retries_exhausted` when it fails.
        topology: the app's topology (a `Topology`, or its directory; default `topology/`
            under the working directory): the task's workload gives the retry policy and
            the size limit.
        deadline: as `Task.message`; a deadline already past parks the task as `expired`.
        priority: what `TaskContext.priority` says.
        message_id: what `TaskContext.message_id` says (default: a fresh id).

    Returns:
        The outcome: succeeded (with the result), retried (in which tier, after what
        delay) or parked (with the reason).

    Raises:
        ConfigError: the task is not registered in `app`, or its workload is not in the
            topology, or `attempt` is below 1.
        pydantic.ValidationError: a model or dict payload does not fit the task's model
            (a publish would refuse it too; pass bytes to see the consumer park it).
        TopologyInvalid: the topology directory is missing or does not validate.
    """
    definition = _definition(app, task)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ConfigError(f"attempt={attempt!r} must be an int >= 1")
    if not isinstance(topology, Topology):
        topology = load_topology(Path(topology))
    if definition.workload not in topology.workloads:
        known = ", ".join(sorted(topology.workloads)) or "none"
        raise ConfigError(
            f"task {definition.name!r} runs in workload {definition.workload!r}, which the "
            f"topology does not declare (declared: {known})"
        )
    workload = topology.workloads[definition.workload]
    spec = workload.spec
    if isinstance(payload, bytes):
        body = payload
    else:
        model = definition.check_payload(payload)
        body = model.__pydantic_serializer__.to_json(model)  # as `Task.message` encodes it
    now = time.time()
    headers = wire.new_task_headers(_deadline_seconds(deadline, now), now)
    headers[wire.HEADER_ATTEMPT] = attempt
    message_id = message_id or os.urandom(16).hex()
    error: BaseException | None = None
    result: Any = None
    try:
        envelope = wire.decode(
            body_size=len(body),
            task=definition.name,
            message_id=message_id,
            headers=headers,
            max_message_bytes=spec.max_message_bytes,
            content_type=wire.CONTENT_TYPE,
        )
    except Poison as poison:
        return _task_run(
            definition.name, attempt, decide(poison, spec, now), poison, None, workload
        )
    outcome: Outcome = decide(envelope, spec, time.time())
    if isinstance(outcome, Run):
        try:
            parsed = definition.parse(body)
        except Poison as poison:
            error, outcome = poison, decide(poison, spec, time.time())
        else:
            ctx = TaskContext(
                message_id=message_id,
                task=definition.name,
                workload=workload.name,
                attempt=attempt,
                deadline=envelope.deadline,
                redelivered=False,
                priority=priority,
            )
            try:
                result = await definition.run(
                    parsed, ctx if definition.wants_context else None, None
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # what the consumer catches, too
                error = exc
            ran = RAN if error is None else Ran(error)
            outcome = decide(envelope, spec, time.time(), ran=ran, rules=definition.rules)
    return _task_run(definition.name, attempt, outcome, error, result, workload)


def run_task_sync(
    app: App,
    task: Task[Any, Any] | str,
    payload: BaseModel | dict[str, Any] | bytes,
    **options: Any,
) -> TaskRun:
    """`run_task` for code without an event loop (a plain `def test_...`): runs one.

    Raises:
        ConfigError: called on a running event loop (use `await run_task(...)` there), and
            whatever `run_task` raises.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_task(app, task, payload, **options))
    raise ConfigError("run_task_sync was called on a running event loop; use await run_task()")


def _definition(app: App, task: Task[Any, Any] | str) -> TaskDef[Any, Any]:
    name = task if isinstance(task, str) else task.name
    definition = app.tasks.get(name)
    if definition is None:
        known = ", ".join(sorted(app.tasks)) or "none"
        raise ConfigError(f"task {name!r} is not registered in the app (registered: {known})")
    return definition


def _task_run(
    task: str,
    attempt: int,
    outcome: Outcome,
    error: BaseException | None,
    result: Any,
    workload: Workload,
) -> TaskRun:
    if isinstance(outcome, Succeeded):
        return TaskRun(task, attempt, "succeeded", result=result)
    if isinstance(outcome, RetryIn):
        tier = workload.tiers[outcome.tier_index]
        return TaskRun(
            task,
            attempt,
            "retried",
            tier=tier.label,
            tier_index=tier.index,
            delay_seconds=tier.delay_seconds,
            error=error,
        )
    assert isinstance(outcome, ParkNow)  # Recount needs a redelivery, which never happens here
    if error is None:  # parked before it ran
        error = Poison(outcome.reason, outcome.detail)
    return TaskRun(
        task, attempt, "parked", reason=outcome.reason, detail=outcome.detail, error=error
    )
