"""examples/feed.py, the compose feeder, as a process: it publishes the demo's mix and stops.

It runs in the test's own namespace (the demo workload's topology applied there), so it never
feeds anyone's `demo` queues on a shared broker.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import urllib.request
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from tests.background import free_port, process, stderr_of
from tests.helpers import drain_queue, queue_depth, wait_until
from tests.observability import ROOT

DEMO = {"capacity": 8, "retry": {"tiers": ["200ms", "1s"], "max_attempts": 3}}
PUBLISHED = 60


def confirmed_tasks(port: int) -> float:
    """`rabbitq_publishes_total{kind="task",outcome="confirmed"}` from the feeder's /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "rabbitq_publishes_total"
        and sample.labels == {"kind": "task", "outcome": "confirmed"}
    )


async def test_the_feeder_publishes_the_demo_mix_and_stops_on_sigterm(
    make_topology, connection, url, namespace, tmp_path
):
    """Tasks land in the demo work queue, mostly greet; its metrics count them; SIGTERM exits 0."""
    topology = await make_topology(demo=DEMO)
    work_queue = topology.workload("demo").work_queue
    port = free_port()
    with process(
        [
            sys.executable,
            "-m",
            "examples.feed",
            "--rate",
            "200",
            "--namespace",
            namespace,
            "--metrics-port",
            str(port),
            "--url",
            url,
        ],
        tmp_path,
        "feeder",
        cwd=ROOT,
    ) as proc:

        async def published() -> bool:
            assert proc.poll() is None, stderr_of(tmp_path, "feeder")
            return await asyncio.to_thread(confirmed_tasks, port) >= PUBLISHED

        await wait_until(
            published,
            timeout=20,
            interval=0.1,
            what=f"the feeder to have {PUBLISHED} tasks confirmed",
        )
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        await wait_until(
            lambda: proc.poll() is not None, timeout=10, what="the feeder to exit on SIGTERM"
        )
        assert time.monotonic() - stopped < 5
    assert proc.returncode == 0, stderr_of(tmp_path, "feeder")

    depth = await queue_depth(connection, work_queue)
    assert depth >= PUBLISHED
    kinds = Counter(m.type for m in await drain_queue(connection, work_queue))
    assert set(kinds) <= {"demo.greet", "demo.flaky", "demo.doomed"}
    assert kinds["demo.greet"] > kinds["demo.flaky"] > 0
