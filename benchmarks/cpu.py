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


def _broker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip().startswith("beam"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _process_ticks(pids: list[int]) -> int:
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


@dataclass
class CpuSampler:
    """Samples machine and broker CPU every SAMPLE_SECONDS until stopped."""

    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._pids = _broker_pids()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            busy, total = _machine_ticks()
            self.samples.append((time.monotonic(), busy, total, _process_ticks(self._pids)))
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
            "broker_cores": (beam1 - beam0) / TICKS / (t1 - t0),
        }
