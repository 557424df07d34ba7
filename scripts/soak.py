"""The soak: many ledger tasks through consumer processes while faults are injected, then a count.

Run from the repository root, against a RabbitMQ you may restart (this script stops and starts
the broker's app, raises a memory alarm and closes every connection, other clients' too):

    .venv/bin/python -m scripts.soak --tasks 100000 --faults 24

It reuses the ledger harness of `tests/ledger.py` (see `docs/reliability.md`):

1. declares one workload in a namespace of its own (`soak-<random>`): a classic work queue,
   tiers 100ms and 1s (quorum queues, as rabbitq declares every tier), three attempts;
2. starts `--consumers` processes (`rabbitq consume --app tests.ledger_app:app`) and a
   publisher that keeps at most `--window` tasks ready in the work queue (QueueProbe) and
   retries, under the same id, every publish that raised. Of the tasks, 5% fail once (the retry
   path), 0.2% always fail (parked as retries_exhausted) and 0.2% are poison (not JSON, an
   invalid payload, an unknown task, a deadline already past, no attempt header), parked at once;
3. injects `--faults` faults, one after the other, spread over the publishing (fault i when
   i+1 / faults+1 of the tasks are out; the publisher waits at the next mark until it is over),
   rotating SIGKILL of a consumer (restarted at once), `rabbitmqctl close_all_connections`,
   `stop_app`/`start_app` and a memory alarm; each broker fault restores the broker itself;
4. waits until the work queue and tiers are empty, stops the consumers (SIGTERM), drains what is
   left with a `--burst` consumer, runs the ledger check and prints one table.

Exit status: 0 when the check is ok (nothing lost, no leftover, nothing unexpected), 1 when it
is not or the run was aborted (a deadline passed, a fault could not be injected), 130 on Ctrl-C.
Every wait has a deadline and the whole run has `--max-minutes`. On the way out, always: a
fault in progress is finished (so it restores the broker), the consumers are killed, the broker
is restored (start_app, watermark 0.4) and, unless `--keep`, the namespace's queues and
exchanges and the run's directory (ledger, consumer logs) are deleted; a failed run keeps its
directory for inspection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aio_pika

from rabbitq import Outgoing
from rabbitq import _declare as declare
from rabbitq._topology import Topology, Workload, parse_topology
from rabbitq._wire import HEADER_ATTEMPT, HEADER_DEADLINE
from tests.helpers import queue_depth, wait_until
from tests.ledger import (
    TASK,
    TASK_SYNC,
    ConsumerProcess,
    Ledger,
    LedgerPublisher,
    LedgerReport,
    QueueProbe,
    actl,
    alarm_active,
    broker_answers,
    broker_stopped,
    check,
    close_all_connections,
    memory_alarm,
    restore_broker,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
WORKLOAD = "soak"
TIERS = ("100ms", "1s")
MAX_ATTEMPTS = 3
MAX_REDELIVERIES = 5

FAULT_KINDS = ("sigkill", "close_all_connections", "rabbitmq_restart", "memory_alarm")
POISON_KINDS = ("undecodable", "invalid_payload", "unknown_task", "expired", "bad_envelope")
# The share of each kind of task, as "one in N".
POISON_EVERY = 500
ALWAYS_FAIL_EVERY = 500
FAIL_ONCE_EVERY = 20

# Deadlines (seconds) of the waits inside a run; the run as a whole has --max-minutes.
READY_SECONDS = 60.0  # a consumer process to start consuming
BACKLOG_SECONDS = 300.0  # the work queue to go below the window
PUBLISH_RETRY_SECONDS = 180.0  # a chunk to be confirmed, retrying what raised
MARK_SECONDS = 900.0  # the publisher to reach the next fault's mark
SETTLE_SECONDS = 600.0  # the work queue and tiers to empty once everything is out
STOP_SECONDS = 30.0  # a consumer to exit after SIGTERM (its grace is 5s)
DRAIN_SECONDS = 300.0  # the final --burst consumer to finish
FAULT_END_SECONDS = 240.0  # a fault in progress to finish (and restore the broker) on exit
PROGRESS_SECONDS = 15.0
MAX_UNEXPECTED_EXITS = 10  # consumer exits nobody injected, before the run is aborted


@dataclass(frozen=True)
class Options:
    tasks: int
    faults: int
    consumers: int
    capacity: int
    window: int
    chunk: int
    outage: float
    alarm: float
    max_minutes: float
    url: str
    keep: bool


class Aborted(Exception):
    """The run cannot go on (the message says why)."""


def log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} soak: {text}", file=sys.stderr, flush=True)


def topology_toml(capacity: int) -> str:
    tiers = ", ".join(f'"{t}"' for t in TIERS)
    return (
        f"[workloads.{WORKLOAD}]\n"
        f'queue_type = "classic"\n'
        f"capacity = {capacity}\n"
        f"max_redeliveries = {MAX_REDELIVERIES}\n"
        f"[workloads.{WORKLOAD}.retry]\n"
        f"tiers = [{tiers}]\n"
        f"max_attempts = {MAX_ATTEMPTS}\n"
    )


def task_kind(n: int) -> str:
    """What task n does: `ok`, `fail_once`, `always_fail` or one of the poison kinds."""
    if n % POISON_EVERY == POISON_EVERY // 2:
        return POISON_KINDS[(n // POISON_EVERY) % len(POISON_KINDS)]
    if n % ALWAYS_FAIL_EVERY == ALWAYS_FAIL_EVERY // 4:
        return "always_fail"
    if n % FAIL_ONCE_EVERY == FAIL_ONCE_EVERY // 3:
        return "fail_once"
    return "ok"


def expected_park(kind: str) -> str:
    """The park reason a task of `kind` must end with ("" if it must complete)."""
    if kind == "always_fail":
        return "retries_exhausted"
    return kind if kind in POISON_KINDS else ""


def build_message(publisher: LedgerPublisher, n: int, task_id: str) -> Outgoing:
    """Task n: a quarter are sync handlers; each sleeps 0-10 ms; some fail or are poison."""
    kind = task_kind(n)
    fail = {"fail_once": 1, "always_fail": MAX_ATTEMPTS}.get(kind, 0)
    good = publisher.message(
        task_id,
        task=TASK_SYNC if n % 4 == 1 else TASK,
        sleep_ms=(n * 7) % 11,
        fail_first_attempts=fail,
    )
    if kind == "undecodable":
        return dataclasses.replace(good, body=b"\xff\xfe not json")
    if kind == "invalid_payload":
        body = {"id": task_id, "ledger": str(publisher.ledger.path), "sleep_ms": "soon"}
        return dataclasses.replace(good, body=json.dumps(body).encode())
    if kind == "unknown_task":
        return dataclasses.replace(good, task="ledger.no_such_task")
    if kind == "expired":
        past = math.floor((time.time() - 60) * 1000)
        return dataclasses.replace(good, headers={**good.headers, HEADER_DEADLINE: past})
    if kind == "bad_envelope":
        headers = {k: v for k, v in good.headers.items() if k != HEADER_ATTEMPT}
        return dataclasses.replace(good, headers=headers)
    return good


def fault_marks(tasks: int, faults: int) -> list[int]:
    """Fault i is injected once this many tasks were published: evenly spread."""
    return [tasks * (i + 1) // (faults + 1) for i in range(faults)]


async def delete_namespace(url: str, topology: Topology) -> None:
    """Delete the run's queues and exchanges (whatever is left of them)."""
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        names: list[tuple[str, str]] = [("queue", q.name) for q in topology.queues()]
        names += [("exchange", e.name) for e in topology.exchanges()]
        for kind, name in names:
            try:
                if kind == "queue":
                    await channel.queue_delete(name)
                else:
                    await channel.exchange_delete(name)
            except Exception as exc:
                log(f"could not delete {kind} {name}: {exc}")
                if channel.is_closed:
                    channel = await connection.channel()
    finally:
        await connection.close()


async def machine() -> str:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        version = (await actl("version", timeout=30)).strip() or "?"
    except Exception:
        version = "?"
    return f"{os.cpu_count()} cores, {pages / 2**30:.0f} GiB RAM, RabbitMQ {version}"


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


class Soak:
    """One run: setup, load with faults, finish, check; `cleanup` always runs."""

    def __init__(self, options: Options, command: str) -> None:
        self.options = options
        self.command = command
        self.namespace = f"soak-{uuid.uuid4().hex[:8]}"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"rabbitq-{self.namespace}-"))
        directory = self.workdir / "topology"
        directory.mkdir()
        toml = topology_toml(options.capacity)
        (directory / "soak.toml").write_text(toml)
        self.topology_dir = directory
        self.topology = parse_topology({"soak.toml": toml}, self.namespace)
        self.workload: Workload = self.topology.workload(WORKLOAD)
        self.ledger = Ledger.create(self.workdir / "ledger.db")
        self.publisher = LedgerPublisher(
            self.ledger,
            options.url,
            self.namespace,
            WORKLOAD,
            confirm_timeout=5.0,
            name=f"soak publisher {self.namespace}",
        )
        self.probe = QueueProbe(options.url, self.workload.work_queue)
        self.consumers = [self._consumer(f"consumer{i + 1}") for i in range(options.consumers)]
        self.marks = fault_marks(options.tasks, options.faults)
        self.published = 0
        self.never_confirmed = 0
        self.faults_done = 0
        self.fault_now: asyncio.Future[None] | None = None
        self.broker_touched = False
        self.declared = False
        self.unexpected_exits: list[str] = []
        self.expected: dict[str, str] = {}  # id -> park reason, for the tasks that must park
        self.phase = "setup"
        self.started = time.monotonic()

    def _consumer(self, label: str, *, burst: bool = False) -> ConsumerProcess:
        return ConsumerProcess(
            WORKLOAD,
            self.topology_dir,
            self.namespace,
            self.options.url,
            self.workdir,
            burst=burst,
            label=label,
        )

    # The phases

    async def setup(self) -> None:
        log(f"namespace {self.namespace}, run directory {self.workdir}")
        if not await broker_answers(self.options.url):
            raise Aborted(f"no broker answers at {self.options.url}")
        connection = await aio_pika.connect(self.options.url, timeout=10)
        try:
            self.declared = True
            await declare.apply(connection, self.topology)
        finally:
            await connection.close()
        await self.publisher.publisher.start()

    async def load(self) -> None:
        self.phase = "load"
        for consumer in self.consumers:
            consumer.start()
        for consumer in self.consumers:
            await self._ready(consumer)
        log(
            f"{len(self.consumers)} consumers ready; publishing {self.options.tasks} tasks, "
            f"{self.options.faults} faults at tasks {self.marks}"
        )
        background = [asyncio.create_task(self._monitor()), asyncio.create_task(self._progress())]
        main = [asyncio.create_task(self._publish()), asyncio.create_task(self._faults())]
        try:
            pending = set(main)
            while pending:
                done, pending = await asyncio.wait(
                    pending | set(background), return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    task.result()  # raises what stopped it
                pending -= set(background)
        finally:
            for task in main + background:
                task.cancel()
            await asyncio.gather(*main, *background, return_exceptions=True)

    async def finish(self) -> LedgerReport:
        self.phase = "settle"
        log("all published, all faults injected; waiting for the queues to empty")
        await wait_until(
            self._queues_empty,
            timeout=SETTLE_SECONDS,
            interval=1.0,
            what="the work queue and tiers to empty",
        )
        self.phase = "stop"
        for consumer in self.consumers:
            if not consumer.alive:
                continue
            code = await consumer.stop(STOP_SECONDS)
            if code != 0:
                self.unexpected_exits.append(f"{consumer.label} exited {code} on SIGTERM")
        self.phase = "drain"
        final = self._consumer("final", burst=True)
        self.consumers.append(final)
        final.start()
        code = await final.exited(DRAIN_SECONDS)
        if code != 0:
            raise Aborted(f"the final --burst consumer exited {code}: {final.stderr()[-2000:]}")
        self.phase = "check"
        return await check(
            self.ledger, self.options.url, self.workload, drain_parking=not self.options.keep
        )

    # The load

    def _publish_limit(self) -> int:
        """The publisher may not pass the mark of fault i+1 before fault i is over."""
        following = self.faults_done + 1
        return self.marks[following] if following < len(self.marks) else self.options.tasks

    async def _publish(self) -> None:
        total = self.options.tasks
        width = max(6, len(str(total - 1)))
        while self.published < total:
            limit = self._publish_limit()
            if self.published >= limit:
                await wait_until(
                    lambda: self._publish_limit() > self.published,
                    timeout=FAULT_END_SECONDS,
                    interval=0.05,
                    what=f"fault {self.faults_done + 1} to end",
                )
                continue
            await wait_until(
                lambda: self.probe.below(self.options.window),
                timeout=BACKLOG_SECONDS,
                interval=0.05,
                what=f"the work queue to hold fewer than {self.options.window}",
            )
            count = min(self.options.chunk, limit - self.published)
            messages = []
            for n in range(self.published, self.published + count):
                task_id = f"soak-{n:0{width}d}"
                if reason := expected_park(task_kind(n)):
                    self.expected[task_id] = reason
                messages.append(build_message(self.publisher, n, task_id))
            unconfirmed = await self.publisher.publish(
                messages, deadline_seconds=PUBLISH_RETRY_SECONDS
            )
            if unconfirmed:
                log(f"{len(unconfirmed)} tasks never confirmed (their outcome is unknown)")
            self.never_confirmed += len(unconfirmed)
            self.published += count

    async def _faults(self) -> None:
        for i, mark in enumerate(self.marks):
            await wait_until(
                self._reached(mark),
                timeout=MARK_SECONDS,
                interval=0.05,
                what=f"the publisher to reach task {mark}",
            )
            kind = FAULT_KINDS[i % len(FAULT_KINDS)]
            log(f"fault {i + 1}/{len(self.marks)}: {kind}")
            # Shielded: a fault is never cut in half (its own finally restores the broker);
            # on the way out `cleanup` waits for it.
            self.fault_now = asyncio.ensure_future(self._inject(kind, i))
            await asyncio.shield(self.fault_now)
            self.faults_done += 1

    def _reached(self, mark: int) -> Callable[[], bool]:
        return lambda: self.published >= mark

    async def _inject(self, kind: str, i: int) -> None:
        if kind == "sigkill":
            alive = [c for c in self.consumers if c.alive]
            if not alive:
                await wait_until(
                    lambda: any(c.alive for c in self.consumers),
                    timeout=30,
                    what="a consumer to run (to be killed)",
                )
                alive = [c for c in self.consumers if c.alive]
            victim = alive[(i // len(FAULT_KINDS)) % len(alive)]
            victim.kill()
            self.ledger.fault("sigkill", victim.label)
            victim.start()
        elif kind == "close_all_connections":
            await close_all_connections(self.ledger, reason="rabbitq soak")
        elif kind == "rabbitmq_restart":
            self.broker_touched = True
            async with broker_stopped(self.options.url, self.ledger):
                await asyncio.sleep(self.options.outage)
        elif kind == "memory_alarm":
            self.broker_touched = True
            async with memory_alarm(self.ledger):
                await asyncio.sleep(self.options.alarm)
        else:
            raise ValueError(f"unknown fault kind {kind!r}")

    async def _ready(self, consumer: ConsumerProcess) -> None:
        line = f"consuming {self.workload.work_queue}"
        await wait_until(
            lambda: line in consumer.stderr() or not consumer.alive,
            timeout=READY_SECONDS,
            interval=0.1,
            what=f"{consumer.label} to start",
        )
        if not consumer.alive:
            raise Aborted(f"{consumer.label} exited at start: {consumer.stderr()[-2000:]}")

    async def _monitor(self) -> None:
        """A supervisor: a consumer that exits by itself is noted and restarted (bounded)."""
        while True:
            for consumer in self.consumers:
                if consumer.proc is not None and not consumer.alive:
                    code = await consumer.exited(5)
                    tail = consumer.stderr()[-1500:]
                    self.unexpected_exits.append(f"{consumer.label} exited {code}")
                    log(f"{consumer.label} exited {code} by itself; restarting it. Log:\n{tail}")
                    if len(self.unexpected_exits) > MAX_UNEXPECTED_EXITS:
                        raise Aborted(f"consumers keep exiting: {self.unexpected_exits}")
                    # A consumer that cannot connect at start exits at once: wait for the
                    # broker (a fault may have it stopped) before starting it again.
                    await wait_until(
                        lambda: broker_answers(self.options.url),
                        timeout=FAULT_END_SECONDS,
                        interval=1.0,
                        what="the broker to answer (to restart a consumer)",
                    )
                    consumer.start()
            await asyncio.sleep(0.5)

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_SECONDS)
            log(
                f"{duration(time.monotonic() - self.started)}: published "
                f"{self.published}/{self.options.tasks}, completed "
                f"{self.ledger.completed_ids()}, faults {self.faults_done}/{len(self.marks)}"
            )

    async def _queues_empty(self) -> bool:
        try:
            connection = await aio_pika.connect(self.options.url, timeout=5)
        except Exception:
            return False
        try:
            names = [self.workload.work_queue, *(t.queue for t in self.workload.tiers)]
            return all([await queue_depth(connection, name) == 0 for name in names])
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                await connection.close()

    # The way out

    async def cleanup(self, success: bool) -> None:
        """Always: finish a fault in progress, kill consumers, restore the broker, delete."""
        if self.fault_now is not None and not self.fault_now.done():
            log("waiting for the fault in progress to end (it restores the broker)")
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.fault_now, FAULT_END_SECONDS)
        for consumer in self.consumers:
            consumer.close()
        if self.broker_touched:
            try:
                await restore_broker(self.options.url)
                if await alarm_active():
                    log(
                        "WARNING: a memory alarm is still on; run "
                        "`rabbitmqctl set_vm_memory_high_watermark 0.4`"
                    )
            except Exception as exc:
                log(
                    f"WARNING: could not restore the broker ({exc}); run "
                    "`rabbitmqctl start_app` and `rabbitmqctl set_vm_memory_high_watermark 0.4`"
                )
        for closing in (self.probe.close(), self.publisher.close()):
            with contextlib.suppress(Exception):
                await closing
        self.ledger.close()
        if self.declared and not self.options.keep:
            try:
                await delete_namespace(self.options.url, self.topology)
            except Exception as exc:
                log(f"WARNING: could not delete namespace {self.namespace}: {exc}")
        if success and not self.options.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            log(f"kept the run directory {self.workdir} (ledger.db, consumer logs)")
            if self.options.keep:
                log(f"kept the namespace {self.namespace} (queues and exchanges)")

    # The table

    def describe(self) -> str:
        """Consumers, queue types (as declared) and retry policy, in one line."""
        types = {
            q.role: str(q.arguments.get("x-queue-type", "classic")) for q in self.workload.queues()
        }
        return (
            f"{self.options.consumers} consumers x capacity {self.options.capacity}; "
            f"{types['work']} work queue, {types.get('tier', '-')} tiers "
            f"{'/'.join(TIERS)}, max_attempts {MAX_ATTEMPTS}"
        )

    def table(self, report: LedgerReport | None, status: str, machine_line: str) -> str:
        rows: list[tuple[str, str]] = [("tasks", str(report.tasks if report else self.published))]
        faults = Counter(report.faults if report else self.ledger.faults())
        for kind in FAULT_KINDS:
            rows.append((f"faults: {kind}", str(faults.pop(kind, 0))))
        rows += [(f"faults: {kind}", str(count)) for kind, count in sorted(faults.items())]
        if report is not None:
            rows += [
                ("lost", str(report.lost)),
                ("duplicated", str(report.duplicated)),
                ("parked", str(report.parked)),
            ]
            # Tasks by reason; a task parked twice (a duplicate) counts once.
            by_reason = Counter(r for _, r in {(p.id, p.reason) for p in report.parked_copies})
            rows += [(f"parked: {r}", str(count)) for r, count in sorted(by_reason.items())]
            parked = {p.id: p.reason for p in report.parked_copies}
            wrong = Counter(r for i, r in parked.items() if self.expected.get(i) != r)
            missing = sum(1 for i in self.expected if i not in parked)
            rows += [
                ("completed", str(report.completed)),
                ("handler runs", str(report.executions)),
                ("parked, not as planned", json.dumps(dict(wrong)) if wrong else "0"),
                ("planned to park, did not", str(missing)),
                ("leftover in work queue or tiers", json.dumps(report.leftover) or "{}"),
            ]
        else:
            rows += [("lost", "not checked"), ("completed", str(self.ledger.completed_ids()))]
        raised = self.publisher.stats.raised
        rows += [
            (
                "publishes that raised (retried)",
                ", ".join(f"{k} {v}" for k, v in sorted(raised.items())) or "0",
            ),
            ("never confirmed", str(self.never_confirmed)),
            ("consumer exits not injected", str(len(self.unexpected_exits))),
            ("workload", self.describe()),
            ("elapsed", duration(time.monotonic() - self.started)),
            ("machine", machine_line),
            ("command", f"`{self.command}`"),
            ("result", status),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"| {'soak':<{width}} | {self.namespace} |", f"|{'-' * (width + 2)}|---|"]
        lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
        return "\n".join(lines)


async def soak(options: Options, command: str) -> int:
    run = Soak(options, command)
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    # Ctrl-C (even where SIGINT was ignored, as in `cmd &`) and SIGTERM end the run cleanly.
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, main.cancel)
    report: LedgerReport | None = None
    status = ""
    interrupted = False
    try:
        async with asyncio.timeout(options.max_minutes * 60):
            await run.setup()
            await run.load()
            report = await run.finish()
    except asyncio.CancelledError:
        main.uncancel()
        interrupted = True
        status = f"interrupted during {run.phase}"
    except TimeoutError:
        status = f"aborted: not done within --max-minutes {options.max_minutes} ({run.phase})"
    except (Aborted, AssertionError) as exc:
        status = f"aborted during {run.phase}: {exc}"
    except Exception as exc:
        status = f"aborted during {run.phase}: {type(exc).__name__}: {exc}"
    finally:
        # A second Ctrl-C or SIGTERM must not cut the restore short.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)
        if status:
            log(f"{status}; cleaning up")
        ok = report is not None and report.ok and report.lost == 0
        await run.cleanup(ok)
    if report is not None and not status:
        status = (
            "ok"
            if ok
            else "FAILED: "
            + "; ".join(
                what
                for what, bad in (
                    (f"lost {report.lost}", report.lost > 0),
                    (f"leftover {report.leftover}", bool(report.leftover)),
                    (f"unexpected ids {report.unexpected[:5]}", bool(report.unexpected)),
                )
                if bad
            )
        )
    if report is not None and not ok:
        log(f"ledger details: {report.details()}")
    print(run.table(report, status, await machine()), flush=True)
    if interrupted:
        return 130
    return 0 if ok and status == "ok" else 1


def parse_args(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.soak",
        description="Publish N ledger tasks through consumer processes while injecting faults "
        "(consumer SIGKILL, close_all_connections, RabbitMQ stop_app/start_app, memory alarm); "
        "print one table; exit 1 if anything was lost.",
    )
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks to publish")
    parser.add_argument("--faults", type=int, default=24, help="faults to inject (rotating kinds)")
    parser.add_argument("--consumers", type=int, default=3, help="consumer processes")
    parser.add_argument("--capacity", type=int, default=32, help="prefetch of each consumer")
    parser.add_argument(
        "--window", type=int, default=1000, help="at most this many tasks ready in the work queue"
    )
    parser.add_argument("--chunk", type=int, default=200, help="tasks per publish batch")
    parser.add_argument(
        "--outage",
        type=float,
        default=3.0,
        help="seconds the broker app stays stopped in a restart fault",
    )
    parser.add_argument("--alarm", type=float, default=3.0, help="seconds a memory alarm stays on")
    parser.add_argument("--max-minutes", type=float, default=90.0, help="the whole run's deadline")
    parser.add_argument(
        "--url",
        default=os.environ.get("RABBITQ_URL", DEFAULT_URL),
        help="the broker (default: RABBITQ_URL, then %(default)s)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the namespace's queues and exchanges and the run directory",
    )
    args = parser.parse_args(argv)
    for name in ("tasks", "consumers", "capacity", "window", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.faults < 0 or args.faults >= args.tasks:
        parser.error("--faults must be from 0 to tasks - 1")
    return Options(
        tasks=args.tasks,
        faults=args.faults,
        consumers=args.consumers,
        capacity=args.capacity,
        window=args.window,
        chunk=args.chunk,
        outage=args.outage,
        alarm=args.alarm,
        max_minutes=args.max_minutes,
        url=args.url,
        keep=args.keep,
    )


def command_line(argv: list[str]) -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), "-m", "scripts.soak", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)
    # The faults make the AMQP clients of this process log every closed connection with a
    # traceback; the publisher retries and the consumers log to their own files.
    for name in ("aiormq", "aio_pika", "rabbitq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return asyncio.run(soak(options, command_line(argv)))


if __name__ == "__main__":
    sys.exit(main())
