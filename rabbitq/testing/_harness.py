"""`Harness`: an app's consumers on a real broker, in a namespace of one test's own.

`start` applies the app's topology under the test's namespace (with its retry tiers
shortened, see `for_test`), points the app at that namespace and runs one `Consumer` per
workload in the test's event loop. `settle` publishes tasks and waits until each one's
outcome is final, as the consumers' settle path reports it (`Settler.observer`: told of
every outcome once it is safe, so nothing polls a queue). `close` stops the consumers, gives
the app its namespace and URL back, and deletes every queue and exchange it declared.

It never touches a namespace but its own: a message built before `start` (for the app's real
namespace) is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aio_pika.abc import AbstractConnection

from rabbitq import _declare as declare
from rabbitq._amqp import Delivery
from rabbitq._app import App
from rabbitq._connection import connect, mask_url
from rabbitq._consume import Consumer
from rabbitq._errors import ConfigError, ParkReason
from rabbitq._outcome import Outcome, ParkNow, Recount, RetryIn, Succeeded
from rabbitq._topology import Topology, Workload, derive_workload, load_topology
from rabbitq._wire import Envelope, Outgoing

logger = logging.getLogger("rabbitq.testing")

TIER_SECONDS = 0.05
SETTLE_SECONDS = 10.0
READY_SECONDS = 10.0
GRACE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class TaskReport:
    """The final outcome of one task on the broker (`Harness.settle`).

    Attributes:
        message_id: the task's id.
        task: the task name.
        outcome: `succeeded` or `parked`.
        result: what the handler returned, as `Task.call` would return it (None unless it
            succeeded, or if the task returns nothing).
        attempts: the attempt that settled it (1 if it was never retried).
        tiers: the retry tiers it waited in, in order, by label (`["1s", "10s"]`): the tiers
            of the app's topology, though the test's are shortened.
        reason: why it was parked, when parked.
        detail: why, in words, when the reason says more than the error.
        error: the exception of its last failure (the handler's, or the `Poison` that stopped
            it before it ran); None when its first attempt succeeded.
        redeliveries: times it came back unsettled and was requeued (a consumer died).
    """

    message_id: str
    task: str
    outcome: Literal["succeeded", "parked"]
    result: Any = None
    attempts: int = 1
    tiers: tuple[str, ...] = ()
    reason: ParkReason | None = None
    detail: str = ""
    error: BaseException | None = None
    redeliveries: int = 0

    @property
    def retries(self) -> int:
        """How often it was retried."""
        return len(self.tiers)

    @property
    def succeeded(self) -> bool:
        return self.outcome == "succeeded"

    @property
    def parked(self) -> bool:
        return self.outcome == "parked"


@dataclass(slots=True)
class _Seen:
    """What the observer has heard of one task so far."""

    task: str
    tiers: list[str] = field(default_factory=list)
    redeliveries: int = 0
    error: BaseException | None = None
    report: TaskReport | None = None

    def where(self) -> str:
        if self.tiers:
            return f"retried {len(self.tiers)} times, last in tier {self.tiers[-1]}"
        return "delivered and requeued" if self.redeliveries else "not settled once"


def for_test(
    topology: Topology,
    namespace: str,
    *,
    workloads: Iterable[str] | None = None,
    delays: bool = False,
    tier_seconds: float | None = TIER_SECONDS,
) -> Topology:
    """`topology` renamed into `namespace`, for one test.

    Args:
        topology: the app's.
        namespace: the test's.
        workloads: only these (default: all).
        delays: with the namespace's delay ladder (28 quorum queues, about a second to
            declare and delete; only for tests that publish with `delay=` or `at=`).
        tier_seconds: every retry tier's TTL, so a retried task comes back at once; the tiers
            keep their labels and the retry policy its delays, so every decision (which tier,
            whether a deadline allows the retry) is the one the real topology makes. None:
            the real TTLs.
    """
    chosen = list(topology.workloads) if workloads is None else list(workloads)
    for name in chosen:
        topology.workload(name)  # raises, naming the declared ones
    derived = {}
    for name in chosen:
        original = topology.workloads[name]
        workload = derive_workload(namespace, name, original.spec, original.source)
        if tier_seconds is not None:
            short = tuple(
                dataclasses.replace(t, delay_seconds=tier_seconds) for t in workload.tiers
            )
            workload = dataclasses.replace(workload, tiers=short)
        derived[name] = workload
    return Topology(namespace, derived, delays)


class Harness:
    """One test's namespace on a real broker, with the app's consumers running in it.

    Made by the `rabbitq_harness` fixture (`pytest -p rabbitq.testing`); `start` it with the
    app, then `settle` tasks. The fixture closes it.

    Args:
        url: the broker.
        namespace: the test's own.
        topology_dir: where the app's `*.toml` files are (the fixture's ini option
            `rabbitq_topology`), unless `start` is handed a topology.
    """

    def __init__(self, url: str, namespace: str, topology_dir: Path) -> None:
        self.url = url
        self.namespace = namespace
        self.topology_dir = topology_dir
        #: the topology declared for the test (None before `start`)
        self.topology: Topology | None = None
        #: every task settled so far, by message id: the ones `settle` published and any their
        #: handlers published
        self.reports: dict[str, TaskReport] = {}
        self.consumers: list[Consumer] = []
        self._app: App | None = None
        self._app_was: tuple[str | None, str | None] = (None, None)
        self._seen: dict[str, _Seen] = {}
        self._changed = asyncio.Event()
        self._runs: list[asyncio.Task[None]] = []

    async def start(
        self,
        app: App,
        topology: Topology | Path | str | None = None,
        *,
        workloads: Iterable[str] | None = None,
        delays: bool = False,
        tier_seconds: float | None = TIER_SECONDS,
    ) -> None:
        """Declare the topology in the test's namespace and run the app's consumers.

        Until `close`, `app` publishes into the test's namespace on the test's broker (its
        `namespace` and `url` are set, and given back on close).

        Args:
            app: the app under test.
            topology: its topology, or the directory of its files (default: the fixture's).
            workloads: the workloads to run (default: those the app's tasks name).
            delays, tier_seconds: as `for_test`.

        Raises:
            ConfigError: started twice, or a workload the app's tasks name is not declared.
            TopologyInvalid: the files do not validate.
            ConnectionFailed: the broker cannot be reached.
        """
        if self._app is not None:
            raise ConfigError("the harness is already started; one app per test")
        if not isinstance(topology, Topology):
            topology = _load(Path(topology or self.topology_dir))
        chosen = sorted(app.workloads() if workloads is None else set(workloads))
        missing = [w for w in chosen if w not in topology.workloads]
        if missing:
            known = ", ".join(sorted(topology.workloads)) or "none"
            raise ConfigError(
                f"the app's tasks run in workload {missing[0]!r}, which the topology does not "
                f"declare (declared: {known}); add it, or pass workloads="
            )
        self.topology = for_test(
            topology, self.namespace, workloads=chosen, delays=delays, tier_seconds=tier_seconds
        )
        connection = await connect(self.url, f"rabbitq-testing {self.namespace}")
        try:
            await declare.apply(connection, self.topology)
        finally:
            await connection.close()
        self._app, self._app_was = app, (app.namespace, app.url)
        app.namespace, app.url = self.namespace, self.url
        for workload in self.topology.workloads.values():
            await self._run(app, workload)

    async def _run(self, app: App, workload: Workload) -> None:
        consumer = Consumer(app, workload, self.url, grace_seconds=GRACE_SECONDS)
        consumer._settler.observer = functools.partial(self._observe, workload)
        self.consumers.append(consumer)
        run = asyncio.create_task(consumer.run(), name=f"rabbitq-testing {workload.name}")
        self._runs.append(run)
        ready = asyncio.ensure_future(consumer.ready.wait())
        await asyncio.wait({run, ready}, timeout=READY_SECONDS, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            if run.done():
                run.result()  # raises what stopped it
            raise AssertionError(
                f"the consumer of {workload.name!r} was not ready within {READY_SECONDS}s"
            )

    def _observe(
        self,
        workload: Workload,
        message: Delivery,
        envelope: Envelope | None,
        outcome: Outcome,
        error: BaseException | None,
        result: bytes | None,
    ) -> None:
        """A consumer settled a delivery: note where the task went, and whether it is done."""
        props = message.properties
        task = envelope.task if envelope is not None else props.message_type or ""
        seen = self._seen.setdefault(props.message_id or "", _Seen(task))
        if error is not None:
            seen.error = error
        attempt = envelope.attempt if envelope is not None else 0
        if isinstance(outcome, RetryIn):
            seen.tiers.append(workload.tiers[outcome.tier_index].label)
        elif isinstance(outcome, Recount):
            seen.redeliveries += 1
        elif isinstance(outcome, Succeeded | ParkNow):
            seen.report = self._report(props.message_id or "", seen, outcome, attempt, result)
            self.reports[seen.report.message_id] = seen.report
        self._changed.set()

    def _report(
        self,
        message_id: str,
        seen: _Seen,
        outcome: Succeeded | ParkNow,
        attempt: int,
        result: bytes | None,
    ) -> TaskReport:
        facts: dict[str, Any] = {
            "message_id": message_id,
            "task": seen.task,
            "attempts": attempt,
            "tiers": tuple(seen.tiers),
            "error": seen.error,
            "redeliveries": seen.redeliveries,
        }
        if isinstance(outcome, ParkNow):
            return TaskReport(
                outcome="parked", reason=outcome.reason, detail=outcome.detail, **facts
            )
        definition = self._app.tasks.get(seen.task) if self._app is not None else None
        value = None
        if definition is not None and result is not None:
            value = definition.load_result(result)
        return TaskReport(outcome="succeeded", result=value, **facts)

    async def settle(
        self,
        *messages: Outgoing,
        timeout: float = SETTLE_SECONDS,  # noqa: ASYNC109 - the wait's deadline, spelled as asyncio's
    ) -> list[TaskReport]:
        """Publish `messages` (from `Task.message`, built after `start`) and wait until each
        one succeeded or was parked; their reports, in order.

        Raises:
            ConfigError: not started, or a message was built for another namespace.
            AssertionError: not all settled within `timeout` seconds (it says where each
                unsettled task was last seen), or a consumer stopped.
            PublishError: as `App.publish_many`.
        """
        app = self._app
        if app is None:
            raise ConfigError("start the harness first: await rabbitq_harness.start(app)")
        for out in messages:
            if not out.exchange.startswith(f"{self.namespace}."):
                raise ConfigError(
                    f"message {out.message_id!r} goes to exchange {out.exchange!r}, outside the "
                    f"test's namespace {self.namespace!r}; build it after start()"
                )
        ids = await app.publish_many(messages)
        await self.wait(ids, timeout=timeout)
        return [self.reports[i] for i in ids]

    async def wait(
        self,
        message_ids: Iterable[str],
        *,
        timeout: float = SETTLE_SECONDS,  # noqa: ASYNC109 - as `settle`
    ) -> list[TaskReport]:
        """Wait until the tasks of `message_ids` (published some other way: `Task.publish`,
        a handler) succeeded or were parked; their reports, in order.

        Raises:
            AssertionError: as `settle`.
        """
        ids = list(message_ids)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not all(i in self.reports for i in ids):
            stopped = [run for run in self._runs if run.done()]
            if stopped:
                stopped[0].result()  # raises what stopped it
                raise AssertionError("a consumer stopped while tasks were still unsettled")
            self._changed.clear()
            changed = asyncio.ensure_future(self._changed.wait())
            left = deadline - loop.time()
            await asyncio.wait(
                {changed, *self._runs}, timeout=max(left, 0), return_when=asyncio.FIRST_COMPLETED
            )
            changed.cancel()
            if loop.time() >= deadline and not all(i in self.reports for i in ids):
                raise AssertionError(self._unsettled(ids, timeout))
        return [self.reports[i] for i in ids]

    def _unsettled(self, ids: list[str], timeout: float) -> str:
        lines = [
            f"{i} ({self._seen[i].task}): {self._seen[i].where()}"
            if i in self._seen
            else f"{i}: never delivered"
            for i in ids
            if i not in self.reports
        ]
        return f"{len(lines)} tasks did not settle within {timeout}s: " + "; ".join(lines)

    async def close(self) -> None:
        """Stop the consumers, give the app back its namespace and URL, delete the queues and
        exchanges."""
        for consumer in self.consumers:
            consumer.stop()
        if self._runs:
            await asyncio.wait(self._runs, timeout=GRACE_SECONDS + 10)
        for run in self._runs:
            if run.done() and not run.cancelled() and run.exception() is not None:
                # what `wait` raised already, or a consumer that failed after the last one
                logger.warning("a consumer had stopped: %r", run.exception())
            elif not run.done():
                run.cancel()
        app, self._app = self._app, None
        if app is not None:
            await app.close()
            app.namespace, app.url = self._app_was
        if self.topology is not None:
            try:
                connection = await connect(self.url, f"rabbitq-testing cleanup {self.namespace}")
            except Exception as exc:
                logger.warning(
                    "cannot delete namespace %s at %s: %s", self.namespace, mask_url(self.url), exc
                )
                return
            try:
                await delete(connection, self.topology)
            finally:
                await connection.close()


def _load(directory: Path) -> Topology:
    # a few small files, read once per test: not worth a thread
    if not directory.exists():
        raise ConfigError(
            f"no topology at {str(directory)!r}; set rabbitq_topology in the pytest ini "
            "(relative to the rootdir) or pass start(app, topology=...)"
        )
    return load_topology(directory)


async def delete(connection: AbstractConnection, topology: Topology) -> None:
    """Delete every queue and exchange of `topology` (a test's: never an app's own)."""
    channel = await connection.channel()
    for kind, names in (
        ("queue", [q.name for q in topology.queues()]),
        ("exchange", [x.name for x in topology.exchanges()]),
    ):
        for name in names:
            with contextlib.suppress(Exception):  # gone already: what we wanted
                if kind == "queue":
                    await channel.queue_delete(name)
                else:
                    await channel.exchange_delete(name)
            if channel.is_closed:
                channel = await connection.channel()
    if not channel.is_closed:
        await channel.close()
