"""Fixtures for the tests on a real 3-node cluster (`tests/cluster/harness.py`).

One cluster per test session, started at the first test that asks for it (~30 s) and removed at
the end. Every test here is marked `cluster` (and `rabbitmq`, since it runs RabbitMQ):
`pytest -m "not cluster"` leaves them out. Without root or `ip netns` they skip locally and fail
under CI. Each test gets a unique queue prefix; afterwards the cluster is healed, its stopped
nodes started, and the test's queues deleted, so a failed test does not leak into the next.
The steps a test times (`timed`) are printed at the end of the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.cluster.harness import Cluster
from tests.cluster.node import unavailable

# Per test; the first one also waits for the cluster to start.
TEST_TIMEOUT_SECONDS = 180
TIMINGS: list[tuple[str, str, float]] = []  # (test, step, seconds)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)
            item.add_marker(pytest.mark.rabbitmq)
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_SECONDS))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("cluster timings")
    for test, step, seconds in TIMINGS:
        terminalreporter.line(f"{seconds:6.1f}s  {test}: {step}")


def skip_or_fail(reason: str) -> None:
    """Locally a machine without root or `ip netns` skips them; CI must run them."""
    if os.environ.get("CI"):
        pytest.fail(f"cluster tests cannot run: {reason}")
    pytest.skip(reason)


def _default_rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str] | None:
    """`rabbitmqctl ARGS` against the host's default node (rabbit@<host>, 127.0.0.1:5672)."""
    if shutil.which("rabbitmqctl") is None:
        return None
    try:
        return subprocess.run(
            ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        return None


def default_broker_vm() -> str | None:
    """The OS pid of the default node's Erlang VM, or None if none answers."""
    done = _default_rabbitmqctl("-q", "eval", "os:getpid().")
    return done.stdout.strip() if done is not None and done.returncode == 0 else None


def default_broker_answers(timeout: float = 120) -> bool:
    """Whether `rabbitmqctl -q status` of the default node succeeds within `timeout` seconds.

    Other test runs share that broker and their fault tests stop its app for a while.
    """
    deadline = time.monotonic() + timeout
    while True:
        done = _default_rabbitmqctl("-q", "status")
        if done is not None and done.returncode == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(1)


def check_default_broker_untouched(vm_before: str | None) -> None:
    """If the default broker ran before: the same VM still runs and answers `status`."""
    if vm_before is None:
        return
    assert default_broker_vm() == vm_before, "the default broker's VM was stopped or replaced"
    assert default_broker_answers(), "the default broker does not answer rabbitmqctl status"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """Three nodes joined into one cluster, pause_minority, for the whole session."""
    reason = unavailable()
    if reason:
        skip_or_fail(reason)
    default_vm = default_broker_vm()
    cluster = Cluster(3)
    try:
        cluster.up()
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in cluster.timings.items() if k != "up")
        if cluster.stale_removed:
            steps += f"; removed crashed runs {', '.join(cluster.stale_removed)}"
        TIMINGS.append(("cluster", f"up ({steps})", cluster.timings["up"]))
        yield cluster
    finally:
        cluster.down()
        TIMINGS.append(("cluster", "down", cluster.timings["down"]))
    check_default_broker_untouched(default_vm)


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A queue prefix of the test's own; after it, a whole cluster and none of its queues."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    yield prefix
    cluster.restore()
    cluster.delete_queues(prefix)


@pytest.fixture
def timed(request: pytest.FixtureRequest) -> Callable[[str], AbstractContextManager[list[str]]]:
    """`with timed("heal node 0") as notes:` prints and records how long the block took.

    Whatever the block appends to `notes` ("restarted") is printed with the step.
    """

    @contextlib.contextmanager
    def step(name: str) -> Iterator[list[str]]:
        start = time.monotonic()
        notes: list[str] = []
        yield notes
        seconds = time.monotonic() - start
        label = f"{name} ({', '.join(notes)})" if notes else name
        print(f"{label}: {seconds:.1f}s")
        TIMINGS.append((request.node.name, label, seconds))

    return step
