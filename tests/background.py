"""Background processes for tests: a free port, a process stopped on exit, a required binary."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def require(binary: str, package: str) -> str:
    """The binary's path; skip without it (fail under CI, whose .ci/run installs it)."""
    path = shutil.which(binary)
    if path is None:
        text = f"{binary} is not installed (Debian: apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(text)
        pytest.skip(text)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def process(
    args: list[str], logs: Path, name: str, **kwargs: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """`args` in the background, output in logs/NAME.out and .err; on exit SIGTERM, then
    SIGKILL if it has not stopped within 15 s."""
    with (logs / f"{name}.out").open("wb") as out, (logs / f"{name}.err").open("wb") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, **kwargs)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def stderr_of(logs: Path, name: str, chars: int = 3000) -> str:
    """The end of a background process's stderr."""
    return (logs / f"{name}.err").read_text(errors="replace")[-chars:]
