"""The ledger harness: publish N tasks with unique ids, inject faults, prove nothing was lost.

A ledger is one SQLite file (WAL mode, so several consumer processes write to it at once while
the test reads). It holds:

* `executions`: one row per step of every handler run (message id, attempt, event, pid, time,
  redelivered flag), written by the handlers of `tests/ledger_app.py` *before* they return:
  `start`, then `done` (about to return), `failed` (about to raise) or the fault injected
  (`exit`, `hang`, `block_loop`, `stubborn`, `ignored_cancel`);
* `published`: each id the publisher tried, `confirmed` once the broker confirmed it (a publish
  that raised is `unknown`: it may still have landed, so it may show up as a duplicate, never as
  lost);
* `faults`: each fault the test or soak injected, by kind.

At the end `check` reads the broker (work queue and tiers must be empty; the parking lot is
read, drained or not) and returns a `LedgerReport`: every confirmed id must have completed at
least once or be parked with its reason (`lost` counts the others), and completions or parkings
beyond the first of an id are counted as `duplicated`. `str(report)` is the one line a test or a
soak prints: `tasks=1000 faults={sigkill: 3} lost=0 duplicated=4 parked=0`.

Also here, for tests and for a soak script: `LedgerPublisher` (publishes with confirms and
retries what raised, under the same id), `ConsumerProcess` (`python -m rabbitq consume` as a
subprocess) and the broker faults (`broker_stopped`, `memory_alarm`, `close_all_connections`,
`close_connections_named`), each of which restores the broker when it is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aio_pika
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

from rabbitq import App, ConnectionFailed, PublishError
from rabbitq._connection import is_open
from rabbitq._publish import Publisher
from rabbitq._topology import Workload
from rabbitq._wire import HEADER_PARK_ERROR_TYPE, HEADER_PARK_REASON, Outgoing
from tests.helpers import queue_depth

ROOT = Path(__file__).resolve().parents[1]

TASK = "ledger.record"
TASK_SYNC = "ledger.record_sync"
TASK_SHORT = "ledger.record_short"
TASKS = (TASK, TASK_SYNC, TASK_SHORT)
# Long enough for any sleep a test asks for; it only bounds a forgotten hang.
TIMEOUT_SECONDS = 20.0
SHORT_TIMEOUT_SECONDS = 0.5
MEMORY_WATERMARK = 0.4  # the broker's configured (default) high watermark
ALARM_WATERMARK = 0.000001

Behaviour = Literal["", "exit", "hang", "block_loop", "stubborn"]


class LedgerTask(BaseModel):
    """The payload of a ledger task; `tests/ledger_app.py` says what each field does."""

    id: str
    ledger: str
    sleep_ms: int = 0
    fail_first_attempts: int = 0
    behaviour: Behaviour = ""
    behaviour_attempts: int = 0
    behaviour_once: bool = False
    block_ms: int = 0
    gate: str = ""


def task_ids(prefix: str, count: int, start: int = 0) -> list[str]:
    """Unique, sortable ids: `prefix-000000`, ..."""
    return [f"{prefix}-{i:06d}" for i in range(start, start + count)]


# The ledger file --------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    event TEXT NOT NULL,
    redelivered INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS executions_id ON executions (id);
CREATE INDEX IF NOT EXISTS executions_event ON executions (event, at);
CREATE TABLE IF NOT EXISTS published (id TEXT PRIMARY KEY, confirmed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS faults (kind TEXT NOT NULL, detail TEXT NOT NULL, at REAL NOT NULL);
"""

# One connection per process and file, shared by the handler threads under a lock.
_connections: dict[tuple[int, str], sqlite3.Connection] = {}
_connections_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class Execution:
    """One row of the ledger."""

    id: str
    attempt: int
    event: str
    redelivered: bool
    pid: int
    at: float


class Ledger:
    """A SQLite ledger file. `create()` it once, then any process may record into it.

    Each write is its own transaction, committed before the call returns, in WAL mode with
    `synchronous=NORMAL`: a row written is visible to every other process at once and survives
    the writer being killed (SIGKILL, os._exit); only an OS crash or power loss could drop the
    last rows.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> Ledger:
        """A new, empty ledger at `path` (WAL mode is set once, here, for every process)."""
        ledger = cls(path)
        with contextlib.closing(sqlite3.connect(ledger.path, isolation_level=None)) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        return ledger

    def _db(self) -> sqlite3.Connection:
        key = (os.getpid(), str(self.path))
        db = _connections.get(key)
        if db is None:
            if not self.path.exists():
                raise FileNotFoundError(f"no ledger at {str(self.path)!r}; Ledger.create() it")
            db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA synchronous=NORMAL")
            _connections[key] = db
        return db

    def _write(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
        with _connections_lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(sql, rows)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _read(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with _connections_lock:
            return self._db().execute(sql, args).fetchall()

    def close(self) -> None:
        """Close this process's connection to the file (a later call opens it again)."""
        with _connections_lock:
            db = _connections.pop((os.getpid(), str(self.path)), None)
        if db is not None:
            db.close()

    # Writing

    def record(self, task_id: str, attempt: int, event: str, *, redelivered: bool = False) -> None:
        """One step of a handler run; committed when this returns."""
        self._write(
            "INSERT INTO executions (id, attempt, event, redelivered, pid, at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(task_id, attempt, event, int(redelivered), os.getpid(), time.time())],
        )

    def fault(self, kind: str, detail: str = "") -> None:
        """A fault injected (e.g. `sigkill`, `rabbitmq_restart`), counted in the report."""
        self._write("INSERT INTO faults VALUES (?, ?, ?)", [(kind, detail, time.time())])

    def mark_published(self, ids: Iterable[str], confirmed: bool) -> None:
        """Ids sent: `confirmed`, or not (they raised: outcome unknown). Confirmed sticks."""
        self._write(
            "INSERT INTO published (id, confirmed) VALUES (?, ?) ON CONFLICT (id) DO UPDATE "
            "SET confirmed = max(confirmed, excluded.confirmed)",
            [(i, int(confirmed)) for i in ids],
        )

    # Reading

    def executions(self, event: str | None = None) -> list[Execution]:
        sql = "SELECT id, attempt, event, redelivered, pid, at FROM executions"
        rows = (
            self._read(sql + " WHERE event = ? ORDER BY seq", event)
            if event is not None
            else self._read(sql + " ORDER BY seq")
        )
        return [Execution(r[0], r[1], r[2], bool(r[3]), r[4], r[5]) for r in rows]

    def count(self, event: str = "done") -> int:
        """Rows of `event` (with `done`: completions, duplicates included)."""
        return int(self._read("SELECT count(*) FROM executions WHERE event = ?", event)[0][0])

    def completed(self) -> Counter[str]:
        """Completions per id."""
        rows = self._read("SELECT id, count(*) FROM executions WHERE event = 'done' GROUP BY id")
        return Counter({r[0]: int(r[1]) for r in rows})

    def completed_ids(self) -> int:
        """Ids that completed at least once."""
        return int(
            self._read("SELECT count(DISTINCT id) FROM executions WHERE event = 'done'")[0][0]
        )

    def published(self, confirmed: bool = True) -> set[str]:
        """The ids confirmed (or, with False, those that only ever raised)."""
        rows = self._read("SELECT id FROM published WHERE confirmed = ?", int(confirmed))
        return {r[0] for r in rows}

    def pids(self) -> set[int]:
        """The processes that ran handlers."""
        return {r[0] for r in self._read("SELECT DISTINCT pid FROM executions")}

    def faults(self) -> Counter[str]:
        return Counter(
            {r[0]: int(r[1]) for r in self._read("SELECT kind, count(*) FROM faults GROUP BY kind")}
        )

    def cut_off(self) -> set[str]:
        """Ids whose run in some process started but never reached an end there (killed)."""
        rows = self._read(
            "SELECT s.id FROM executions s WHERE s.event = 'start' AND NOT EXISTS ("
            " SELECT 1 FROM executions e WHERE e.id = s.id AND e.pid = s.pid"
            " AND e.attempt = s.attempt AND e.seq > s.seq AND e.event != 'start')"
        )
        return {r[0] for r in rows}

    def report(self, parked: Sequence[ParkedCopy], leftover: dict[str, int]) -> LedgerReport:
        """The report, given what `check` found on the broker."""
        confirmed = self.published(True)
        unknown = self.published(False)
        done = self.completed()
        parked_ids = Counter(p.id for p in parked)
        seen = set(done) | set(parked_ids)
        return LedgerReport(
            tasks=len(confirmed),
            faults=dict(sorted(self.faults().items())),
            lost_ids=sorted(i for i in confirmed if i not in seen),
            duplicated=sum(max(0, done[i] + parked_ids[i] - 1) for i in seen),
            parked=len(parked_ids),
            parked_reasons=Counter(p.reason for p in parked),
            parked_copies=list(parked),
            completed=len(set(done) & confirmed),
            executions=self.count("start"),
            unconfirmed=len(unknown),
            unconfirmed_seen=len(unknown & seen),
            unexpected=sorted(seen - confirmed - unknown),
            leftover=dict(leftover),
        )


@dataclass(frozen=True, slots=True)
class ParkedCopy:
    """A message found in the parking lot."""

    id: str
    reason: str
    error_type: str
    headers: dict[str, Any]


@dataclass
class LedgerReport:
    """What a run came to. `lost` must be 0; `ok` also wants no leftover and nothing unexpected.

    Attributes:
        tasks: ids the broker confirmed.
        faults: faults injected, per kind.
        lost_ids: confirmed ids that neither completed nor are parked.
        duplicated: completions and parkings beyond the first of each id.
        parked: ids in the parking lot; `parked_reasons` counts the copies by reason.
        completed: confirmed ids that completed at least once.
        executions: handler runs started (retries, redeliveries and crashes included).
        unconfirmed: ids whose publish only ever raised; `unconfirmed_seen` of them landed
            anyway (allowed: an unknown outcome may be either).
        unexpected: ids that ran or were parked but were never published.
        leftover: queues (work, tiers) that still hold messages, with their depth.
    """

    tasks: int
    faults: dict[str, int]
    lost_ids: list[str]
    duplicated: int
    parked: int
    parked_reasons: Counter[str]
    parked_copies: list[ParkedCopy]
    completed: int
    executions: int
    unconfirmed: int = 0
    unconfirmed_seen: int = 0
    unexpected: list[str] = field(default_factory=list)
    leftover: dict[str, int] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return len(self.lost_ids)

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing left in the work queue or tiers, nothing that was not sent."""
        return not self.lost_ids and not self.leftover and not self.unexpected

    def __str__(self) -> str:
        faults = ", ".join(f"{k}: {v}" for k, v in self.faults.items())
        return (
            f"tasks={self.tasks} faults={{{faults}}} lost={self.lost} "
            f"duplicated={self.duplicated} parked={self.parked}"
        )

    def jepsen(self) -> str:
        """The counts as Jepsen's total-queue checker gives them, for a partition run.

        `unconfirmed` publishes raised (a timeout or a lost connection): the publisher was told
        they failed; `recovered` of them landed anyway and ran. `lost` counts confirmed ids only.
        """
        return (
            f"confirmed={self.tasks} lost={self.lost} duplicated={self.duplicated} "
            f"unconfirmed={self.unconfirmed} recovered={self.unconfirmed_seen} "
            f"unexpected={len(self.unexpected)}"
        )

    def details(self) -> str:
        """Everything, for an assertion message."""
        return (
            f"{self}; completed={self.completed} executions={self.executions} "
            f"parked_reasons={dict(self.parked_reasons)} unconfirmed={self.unconfirmed} "
            f"(seen {self.unconfirmed_seen}) leftover={self.leftover} "
            f"unexpected={self.unexpected[:5]} lost_ids={self.lost_ids[:10]}"
        )


# Checking the broker ----------------------------------------------------------------------------

MAX_PARKED_READ = 1_000_000


async def read_parking(
    connection: AbstractConnection, queue_name: str, *, drain: bool
) -> list[ParkedCopy]:
    """Every message in a parking lot: taken (`drain`), or read and returned in place."""
    channel = await connection.channel()
    try:
        queue = await channel.get_queue(queue_name, ensure=False)
        out: list[ParkedCopy] = []
        for _ in range(MAX_PARKED_READ):
            # Without ack the messages stay unacked on this channel until it closes, so each
            # get returns the next one and closing puts them all back.
            message = await queue.get(no_ack=drain, fail=False)
            if message is None:
                break
            headers = dict(message.headers or {})
            out.append(
                ParkedCopy(
                    id=message.message_id or "",
                    reason=str(headers.get(HEADER_PARK_REASON, "")),
                    error_type=str(headers.get(HEADER_PARK_ERROR_TYPE, "")),
                    headers=headers,
                )
            )
        return out
    finally:
        await channel.close()


async def check(
    ledger: Ledger, url: str, workload: Workload, *, drain_parking: bool = True
) -> LedgerReport:
    """The end state: run when no consumer runs (unacked messages would not be counted).

    Opens a connection of its own (a fault may have closed the test's).
    """
    connection = await aio_pika.connect(url, client_properties={"connection_name": "ledger check"})
    try:
        leftover: dict[str, int] = {}
        for name in [workload.work_queue, *(t.queue for t in workload.tiers)]:
            found = await queue_depth(connection, name)
            if found:
                leftover[name] = found
        parked = await read_parking(connection, workload.parking_queue, drain=drain_parking)
    finally:
        await connection.close()
    return ledger.report(parked, leftover)


# Publishing -------------------------------------------------------------------------------------


@dataclass
class PublishStats:
    confirmed: int = 0
    raised: Counter[str] = field(default_factory=Counter)  # failed publishes by error type


class LedgerPublisher:
    """Publishes ledger tasks with confirms; an id counts as published only once confirmed.

    A publish that raised (`ConnectionFailed`, `NotConfirmed`) has an unknown outcome: the
    ledger marks it so, and `publish` sends it again, same id, until it is confirmed or the
    deadline passes; a copy that landed anyway shows up as a duplicate, never as lost.

    Args:
        ledger: where published ids are recorded and which the payloads name.
        url: the broker.
        namespace: the topology namespace.
        workload: the workload (routing key) the tasks go to.
        confirm_timeout: seconds to wait for each confirm.
    """

    def __init__(
        self,
        ledger: Ledger,
        url: str,
        namespace: str,
        workload: str,
        *,
        confirm_timeout: float = 5.0,
        name: str = "ledger-publisher",
    ) -> None:
        self.ledger = ledger
        self.app = App(namespace=namespace, url=url)
        self.publisher = Publisher(url, name=name, confirm_timeout=confirm_timeout)
        self.stats = PublishStats()

        async def stub(task: LedgerTask) -> None:  # consumers run the real handlers
            return None

        self._tasks = {t: self.app.task(t, workload=workload)(stub) for t in TASKS}

    def message(self, task_id: str, *, task: str = TASK, **fields: Any) -> Outgoing:
        """The message of one ledger task (fields as in `LedgerTask`)."""
        payload = LedgerTask(id=task_id, ledger=str(self.ledger.path), **fields)
        return self._tasks[task].message(payload, idempotency_key=task_id)

    async def send(self, messages: Sequence[Outgoing]) -> list[Exception | None]:
        """One try for each message, confirms pipelined; what each raised, or None."""
        results = await asyncio.gather(
            *(self.publisher.send(m) for m in messages), return_exceptions=True
        )
        errors: list[Exception | None] = []
        for result in results:
            if isinstance(result, PublishError | ConnectionFailed) or result is None:
                errors.append(result)
            elif isinstance(result, BaseException):
                raise result
        confirmed = [m.message_id for m, e in zip(messages, errors, strict=True) if e is None]
        failed = [m.message_id for m, e in zip(messages, errors, strict=True) if e is not None]
        self.ledger.mark_published(confirmed, confirmed=True)
        self.ledger.mark_published(failed, confirmed=False)
        self.stats.confirmed += len(confirmed)
        self.stats.raised.update(type(e).__name__ for e in errors if e is not None)
        return errors

    async def publish(
        self,
        messages: Sequence[Outgoing],
        *,
        deadline_seconds: float | None = 60.0,
        batch: int = 100,
    ) -> list[str]:
        """Publish all, retrying what raised with backoff; the ids never confirmed.

        With `deadline_seconds=None` each message is tried once.
        """
        deadline = None if deadline_seconds is None else time.monotonic() + deadline_seconds
        pending = list(messages)
        backoff = 0.1
        while pending:
            failed: list[Outgoing] = []
            for start in range(0, len(pending), batch):
                chunk = pending[start : start + batch]
                errors = await self.send(chunk)
                failed += [m for m, e in zip(chunk, errors, strict=True) if e is not None]
            pending = failed
            if not pending or deadline is None or time.monotonic() > deadline:
                break
            await asyncio.sleep(backoff)  # a retry policy's backoff, not a synchronisation
            backoff = min(backoff * 2, 2.0)
        return [m.message_id for m in pending]

    async def close(self) -> None:
        await self.publisher.close()
        await self.app.close()


class QueueProbe:
    """Reads a queue's depth over a connection of its own, reopened after a loss.

    For flow control in a load generator: `below(limit)` is also True when the broker cannot
    answer, so the caller goes on publishing (and meets the fault) rather than waiting.
    """

    def __init__(self, url: str, queue_name: str) -> None:
        self.url = url
        self.queue_name = queue_name
        self._connection: AbstractConnection | None = None

    async def below(self, limit: int) -> bool:
        try:
            if self._connection is None or not is_open(self._connection):
                await self.close()
                self._connection = await aio_pika.connect(self.url, timeout=3)
            return await queue_depth(self._connection, self.queue_name) < limit
        except Exception:
            await self.close()
            return True

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await connection.close()


# Consumer processes -----------------------------------------------------------------------------


class ConsumerProcess:
    """`python -m rabbitq consume WORKLOAD --app tests.ledger_app:app` as a subprocess.

    Each `start()` is a new process with logs of its own under `logs`; `stderr()` joins them.
    """

    def __init__(
        self,
        workload: str,
        topology: Path,
        namespace: str,
        url: str,
        logs: Path,
        *,
        burst: bool = False,
        grace: float = 5.0,
        app: str = "tests.ledger_app:app",
        label: str = "consumer",
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = [
            sys.executable,
            "-m",
            "rabbitq",
            "consume",
            workload,
            "--app",
            app,
            "--topology",
            str(topology),
            "--namespace",
            namespace,
            "--grace",
            str(grace),
            "--json",
        ]
        if burst:
            self.args.append("--burst")
        self.url = url
        self.logs = logs
        self.label = label
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.exit_codes: list[int] = []

    def start(self) -> subprocess.Popen[bytes]:
        assert not self.alive, "the consumer is already running"
        self.runs += 1
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        with self._log("out").open("wb") as out, self._log("err").open("wb") as err:
            self.proc = subprocess.Popen(
                self.args,
                cwd=ROOT,
                env={**os.environ, **self.env, "RABBITQ_URL": self.url, "PYTHONPATH": path},
                stdout=out,
                stderr=err,
            )
        return self.proc

    def _log(self, kind: str, run: int | None = None) -> Path:
        return self.logs / f"{self.label}-{run or self.runs}.{kind}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _reap(self) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=10)
        self.exit_codes.append(code)
        self.proc = None
        return code

    def kill(self) -> int:
        """SIGKILL, as the OOM killer or a node loss would; its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return self._reap()

    async def exited(self, timeout: float) -> int:  # noqa: ASYNC109 - a polling deadline
        """Wait for the process to exit by itself; its exit code."""
        proc = self.proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                log = self.stderr()[-3000:]
                raise AssertionError(f"{self.label} did not exit within {timeout}s; log:\n{log}")
            await asyncio.sleep(0.02)
        return self._reap()

    async def stop(self, timeout: float = 15.0) -> int:  # noqa: ASYNC109 - a polling deadline
        """SIGTERM and wait for the exit (a consumer exits 0 once its grace is over)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await self.exited(timeout)

    def close(self) -> None:
        """Kill it if it still runs (the end of a test, whatever happened)."""
        if self.alive:
            self.kill()

    def stderr(self) -> str:
        return "".join(
            self._log("err", run).read_text(errors="replace")
            for run in range(1, self.runs + 1)
            if self._log("err", run).exists()
        )

    def summary(self, run: int | None = None) -> dict[str, Any]:
        """The `--json` summary a run printed on exit ({} if it printed none, e.g. killed)."""
        text = self._log("out", run).read_text(errors="replace").strip()
        return dict(json.loads(text.splitlines()[-1])) if text else {}


# Broker faults ----------------------------------------------------------------------------------


def rabbitmqctl(*args: str, timeout: float = 60.0, check: bool = True) -> str:
    """Run `rabbitmqctl ARGS` (as root, on the broker's host); its stdout."""
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


async def actl(
    *args: str,
    timeout: float = 60.0,  # noqa: ASYNC109 - the subprocess's own timeout
    check: bool = True,
) -> str:
    """`rabbitmqctl` without blocking the event loop."""
    return await asyncio.to_thread(rabbitmqctl, *args, timeout=timeout, check=check)


async def broker_answers(url: str) -> bool:
    """True if an AMQP connection opens now."""
    try:
        connection = await aio_pika.connect(url, timeout=3)
    except Exception:
        return False
    await connection.close()
    return True


async def _poll(
    check: Callable[[], Awaitable[bool]], seconds: float, what: str, *, fail: bool = True
) -> None:
    """Until `check()` is true; after `seconds`, fail saying what never happened (or return)."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            if fail:
                raise AssertionError(f"{what} did not happen within {seconds}s")
            return
        await asyncio.sleep(0.1)


async def _not(check: Awaitable[bool]) -> bool:
    return not await check


async def wait_for_broker(url: str, seconds: float = 60.0) -> None:
    """Until an AMQP connection opens."""
    await _poll(lambda: broker_answers(url), seconds, "the broker to answer")


async def restore_broker(url: str) -> None:
    """Start the app (a no-op if it runs), put the watermark back, and wait until it answers."""
    await actl("start_app", timeout=120, check=False)
    await actl("set_vm_memory_high_watermark", str(MEMORY_WATERMARK), check=False)
    await wait_for_broker(url)


DLX_RETRY_SETTING = "dead_letter_worker_publisher_confirm_timeout"


def shipped_dlx_retry_ms() -> int:
    """The dead-letter worker's retry that rabbitmq/advanced.config ships (milliseconds)."""
    text = (ROOT / "rabbitmq" / "advanced.config").read_text()
    found = re.search(rf"\{{{DLX_RETRY_SETTING},\s*(\d+)\}}", text)
    assert found, f"rabbitmq/advanced.config sets no {DLX_RETRY_SETTING}"
    return int(found.group(1))


@contextlib.asynccontextmanager
async def dlx_retry_as_shipped() -> AsyncIterator[int]:
    """The broker's at-least-once dead-letter retry set as rabbitmq/advanced.config ships it,
    for the body; the broker's own value put back after. Yields the value in milliseconds.

    A quorum queue's dead-letter worker reads the setting when it starts (with its queue, or
    when the queue recovers after a restart), so the body's queues and restarts get it.
    """
    shipped = shipped_dlx_retry_ms()
    before = await actl("eval", f"application:get_env(rabbit, {DLX_RETRY_SETTING}).")
    try:
        await actl("eval", f"application:set_env(rabbit, {DLX_RETRY_SETTING}, {shipped}).")
        yield shipped
    finally:
        value = re.search(r"\{ok,\s*(\d+)\}", before)
        restore = (
            f"application:set_env(rabbit, {DLX_RETRY_SETTING}, {value.group(1)})."
            if value
            else f"application:unset_env(rabbit, {DLX_RETRY_SETTING})."
        )
        await actl("eval", restore, check=False)


@contextlib.asynccontextmanager
async def broker_stopped(url: str, ledger: Ledger | None = None) -> AsyncIterator[None]:
    """`rabbitmqctl stop_app` for the body; always `start_app` (and wait for it) on the way out.

    Other test runs share the broker: they fail while it is away; that is expected.
    """
    try:
        await actl("stop_app", timeout=120)
        if ledger is not None:
            ledger.fault("rabbitmq_restart")
        yield
    finally:
        await restore_broker(url)


async def alarm_active() -> bool:
    done = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmq-diagnostics", "-q", "check_local_alarms"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode != 0


@contextlib.asynccontextmanager
async def memory_alarm(ledger: Ledger | None = None) -> AsyncIterator[None]:
    """A memory alarm for the body: publishing connections are blocked; always cleared after."""
    try:
        await actl("set_vm_memory_high_watermark", str(ALARM_WATERMARK))
        await _poll(alarm_active, 30, "the memory alarm to go off")
        if ledger is not None:
            ledger.fault("memory_alarm")
        yield
    finally:
        await actl("set_vm_memory_high_watermark", str(MEMORY_WATERMARK), check=False)
        await _poll(lambda: _not(alarm_active()), 30, "the memory alarm to clear", fail=False)


async def close_all_connections(ledger: Ledger | None = None, reason: str = "fault test") -> None:
    """Every connection of the broker, closed as an operator would (others' too)."""
    await actl("close_all_connections", reason)
    if ledger is not None:
        ledger.fault("close_all_connections")


async def close_connections_named(fragment: str, reason: str = "fault test") -> int:
    """Close the connections whose client-given name contains `fragment`; how many."""
    listing = await actl("list_connections", "pid", "client_properties", "-q", "--no-table-headers")
    pids = [line.split("\t", 1)[0] for line in listing.splitlines() if fragment in line]
    for pid in pids:
        await actl("close_connection", pid, reason, check=False)
    return len(pids)
