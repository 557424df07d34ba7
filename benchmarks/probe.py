"""What a consumer process measures about itself, and how it tells the runner.

Shared by the raw and the rabbitq consumer processes; stdlib only (the raw baseline's memory is
measured). The protocol on stdout is two lines: `ready`, once the process can take work, then
one JSON object with its figures. In gated modes the first deliveries wait in their handlers
until the runner sends SIGUSR1 ("go"), so the clock starts only once every consumer process is
connected and holding work: start-up and import time are never in a rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

IDLE_POLL_SECONDS = 0.05
PARENT_POLL_SECONDS = 1.0
LOOPS = ("asyncio", "uvloop")
T = TypeVar("T")


def proc_status_kib(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


async def _exit_when_orphaned(parent: int) -> None:
    """Exit if the runner died without stopping us (killed with -9, say): a consumer in its
    own session would otherwise wait for work forever."""
    while True:
        await asyncio.sleep(PARENT_POLL_SECONDS)
        if os.getppid() != parent:
            os._exit(4)


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by the nearest-rank method."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class Probe:
    """Counts handled tasks, keeps the clock, and reports.

    Args:
        expect: done once this many tasks were handled (0: done when idle instead).
        idle_seconds: with expect 0, done once nothing ran for this long after the first task.
        gated: hold the first deliveries until SIGUSR1 (see the module docstring).
        rss_at: handled counts at which to sample VmRSS.
        warmup: the share of latency samples dropped from the front (connection warm-up).
    """

    def __init__(
        self,
        *,
        expect: int,
        idle_seconds: float,
        gated: bool,
        rss_at: tuple[int, ...] = (),
        warmup: float = 0.05,
    ) -> None:
        self.expect = expect
        self.idle_seconds = idle_seconds
        self.gated = gated
        self.rss_at = set(rss_at)
        self.warmup = warmup
        self.gate = asyncio.Event()
        self.done = asyncio.Event()
        self.started = 0
        self.handled = 0
        self.go_at = math.nan
        self.first_at = math.nan
        self.last_at = math.nan
        self.cpu_at_go = 0.0
        self.cpu_at_last = 0.0
        self.latencies: list[float] = []
        self.rss_samples: dict[str, int] = {}
        self._said_ready = False
        self._orphan_watch: asyncio.Task[None] | None = None
        if not gated:
            self.gate.set()

    def install(self) -> None:
        """Open the gate on SIGUSR1; ignore Ctrl-C (the runner stops its children itself)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, self._go)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._orphan_watch = loop.create_task(_exit_when_orphaned(os.getppid()))

    def _go(self) -> None:
        self.go_at = time.monotonic()
        self.cpu_at_go = time.process_time()
        self.gate.set()

    def ready(self) -> None:
        """Tell the runner this process can take work (printed once)."""
        if not self._said_ready:
            self._said_ready = True
            print("ready", flush=True)

    def admit(self) -> bool:
        """Called as a handler starts; True while the gate is shut: the handler then awaits
        `self.gate.wait()`. A plain call, so after "go" a handler pays no coroutine for it."""
        self.started += 1
        if self.started == 1:
            self.first_at = time.monotonic()
        if self.gate.is_set():
            return False
        self.ready()
        return True

    def finished(self) -> None:
        """Called once a task is settled (acked, or forwarded and acked)."""
        self.handled += 1
        self.last_at = time.monotonic()
        if self.handled in self.rss_at:
            self.sample_rss(str(self.handled))
        if self.handled == self.expect:
            self.cpu_at_last = time.process_time()
            self.done.set()

    def latency(self, sent_at: float, now: float) -> None:
        self.latencies.append(now - sent_at)

    def sample_rss(self, label: str) -> None:
        self.rss_samples[label] = proc_status_kib()["VmRSS"]

    async def watch_idle(self) -> None:
        """With expect 0: done once the gate is open, something ran, and nothing runs now."""
        while not self.done.is_set():
            await asyncio.sleep(IDLE_POLL_SECONDS)
            idle = time.monotonic() - self.last_at
            if self.handled and self.started == self.handled and idle >= self.idle_seconds:
                self.cpu_at_last = time.process_time()  # includes the idle tail; fine for a hint
                self.done.set()

    def result(self, **extra: Any) -> dict[str, Any]:
        status = proc_status_kib()
        out: dict[str, Any] = {
            "handled": self.handled,
            "go_at": self.go_at,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "cpu_seconds": self.cpu_at_last - self.cpu_at_go,
            "vm_hwm_kib": status["VmHWM"],
            "vm_rss_kib": status["VmRSS"],
            "rss_samples_kib": self.rss_samples,
        }
        if self.latencies:
            kept = sorted(self.latencies[int(len(self.latencies) * self.warmup) :])
            out["latency_ms"] = {f"p{q}": percentile(kept, q) * 1000 for q in (50, 95, 99)}
            out["latency_ms"]["max"] = kept[-1] * 1000
            out["latency_ms"]["samples"] = len(kept)
        return out | extra

    @staticmethod
    def emit(result: dict[str, Any]) -> None:
        """The one JSON line the runner reads."""
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


def uvloop_installed() -> bool:
    """What `rabbitq consume` checks to run on uvloop (rabbitq depends on it on CPython/POSIX)."""
    try:
        import uvloop  # noqa: F401  # only probing
    except ImportError:
        return False
    return True


def run(main: Callable[[], Coroutine[Any, Any, T]], loop: str) -> T:
    """Run `main()` on asyncio's own loop or on uvloop's."""
    factory = None
    if loop == "uvloop":
        import uvloop  # imported only when asked: the raw baseline on asyncio never loads it

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def worker_arguments(description: str) -> argparse.ArgumentParser:
    """The command line both consumer processes take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--mode", choices=("drain", "latency", "retry", "tiers", "calls", "delays"), required=True
    )
    parser.add_argument("--url", required=True)
    parser.add_argument(
        "--expect", type=int, default=0, help="done after this many tasks; 0: done when idle"
    )
    parser.add_argument("--idle", type=float, default=1.0, help="idle seconds that mean done")
    parser.add_argument("--rss-at", default="", help="comma-separated counts to sample RSS at")
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    return parser
