"""The stall detector the timing tests excuse a paused machine with (`tests/stalls.py`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.stalls import Stalls

ROOT = Path(__file__).resolve().parents[2]

# a process that watches for stalls for 2 s and prints how long each was
WATCHER = """
import sys, time
from tests.stalls import Stalls
with Stalls() as stalls:
    print("ready", flush=True)
    time.sleep(2)
print(" ".join(f"{b - a:.2f}" for a, b in stalls.spans), flush=True)
"""


def test_a_process_stopped_for_a_while_sees_one_stall_of_that_length() -> None:
    """SIGSTOP stands the whole process still, as a paused machine would."""
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCHER], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert watcher.stdout is not None
    assert watcher.stdout.readline().strip() == "ready"
    os.kill(watcher.pid, signal.SIGSTOP)
    time.sleep(0.6)  # the span being measured, not a synchronisation
    os.kill(watcher.pid, signal.SIGCONT)
    out, _ = watcher.communicate(timeout=10)
    spans = [float(s) for s in out.split()]
    assert len(spans) == 1 and 0.5 <= spans[0] <= 1.5, spans


def test_a_busy_loop_in_this_thread_is_no_stall() -> None:
    """Code that holds the interpreter is the test's business: the ticking thread still runs."""
    with Stalls() as stalls:
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            pass
    assert stalls.spans == []


def test_within_counts_only_the_overlap() -> None:
    stalls = Stalls()
    stalls.spans = [(10.0, 12.0), (20.0, 25.0)]
    assert stalls.within(0.0, 11.0) == 1.0
    assert stalls.within(11.0, 22.0) == 3.0
    assert stalls.within(30.0, 40.0) == 0.0
    assert str(stalls) == "2.00s, 5.00s"
