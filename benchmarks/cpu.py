"""How busy the whole machine and the broker were during a measurement, from /proc.

The scale scenario asks whether two consumers drain faster than one "where the broker is not
the limit": if the machine's cores were already saturated (consumers, broker and publisher
share them), a second consumer process cannot help, and these figures say so.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_SECONDS = 0.05
TICKS = os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already in user
    return total - idle, total


def broker_pid() -> int | None:
    """The local RabbitMQ's Erlang VM, if it runs on this machine (it may be restarted)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
            except OSError:
                continue
    return None


def broker_cpu_seconds(pid: int | None) -> float | None:
    """User and system CPU seconds the broker used so far; None if it is not local."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


@dataclass
class CpuSampler:
    """Samples machine and broker CPU every SAMPLE_SECONDS until stopped."""

    samples: list[tuple[float, int, int, float]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._pid = broker_pid()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            busy, total = _machine_ticks()
            broker = broker_cpu_seconds(self._pid) or 0.0
            self.samples.append((time.monotonic(), busy, total, broker))
            await asyncio.sleep(SAMPLE_SECONDS)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def window(self, start: float, end: float) -> dict[str, float]:
        """Machine busy % (of all cores) and broker cores used, between two monotonic times."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return {}
        (t0, busy0, total0, beam0), (t1, busy1, total1, beam1) = inside[0], inside[-1]
        return {
            "machine_busy_pct": (busy1 - busy0) / max(1, total1 - total0) * 100,
            "broker_cores": (beam1 - beam0) / (t1 - t0),
        }
