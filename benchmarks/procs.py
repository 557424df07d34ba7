"""Consumer processes as the runner sees them: start, wait for `ready`, say go, read the result.

Each consumer runs in its own process group, so Ctrl-C reaches only the runner, which then
stops its children itself (`stop`), and a run never leaves a consumer behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_SECONDS = 60.0


class Disturbed(Exception):
    """A measurement went wrong (a lost connection, a timeout, a wrong count): measure again."""


class Worker:
    """One consumer process (`python -m benchmarks.raw_worker` or `benchmarks.rq_worker`)."""

    def __init__(self, module: str, args: list[str], label: str) -> None:
        self.module = module
        self.args = args
        self.label = label
        self.proc: asyncio.subprocess.Process | None = None
        self._stderr = tempfile.TemporaryFile()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            *self.args,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
        )

    async def _line(self, wait_seconds: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), wait_seconds)
        except TimeoutError:
            raise Disturbed(
                f"{self.label}: no output within {wait_seconds:.0f}s{self._tail()}"
            ) from None
        if not raw:
            code = await self.proc.wait()
            raise Disturbed(f"{self.label}: exited with {code} early{self._tail()}")
        return raw.decode().strip()

    async def ready(self, wait_seconds: float = READY_TIMEOUT_SECONDS) -> None:
        line = await self._line(wait_seconds)
        if line != "ready":
            raise Disturbed(f"{self.label}: expected 'ready', got {line[:200]!r}")

    def go(self) -> None:
        os.kill(self.pid, signal.SIGUSR1)

    async def result(self, wait_seconds: float) -> dict[str, Any]:
        """The process's one JSON line; it must then exit 0."""
        line = await self._line(wait_seconds)
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), 30)
        if code != 0:
            raise Disturbed(f"{self.label}: exited with {code}{self._tail()}")
        result: dict[str, Any] = json.loads(line)
        if result.get("reconnects"):
            raise Disturbed(f"{self.label}: the consumer reconnected {result['reconnects']} times")
        return result

    def _tail(self, chars: int = 1500) -> str:
        if self._stderr.closed:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")[-chars:]
        return f"; its stderr ends:\n{text}" if text.strip() else ""

    async def stop(self) -> None:
        """Kill the process if it still runs (idempotent)."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await self.proc.wait()
        self._stderr.close()
