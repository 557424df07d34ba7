"""The benchmark runner still runs end to end. Benchmarks are not tests: no time is asserted."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from tests.conftest import broker_url

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = {
    "publish",
    "drain",
    "latency",
    "retry",
    "memory",
    "scale",
    "queue_types",
    "delays",
    "tracing",
}
QUICK_N = 100
# classic against quorum, each with raw aio-pika on the same queue (the single-node path only:
# `--cluster` starts three nodes, too slow here)
QUEUE_TYPE_ROWS = [
    f"{qtype} {metric}"
    for qtype in ("classic", "quorum")
    for metric in ("batch_per_s", "c64_tasks_per_s")
]
# delayed against immediate tasks (rabbitq alone): each figure the acceptance reads
DELAY_ROWS = [
    "publish delayed/immediate batch_per_s",
    "publish delayed/immediate one_at_a_time_per_s",
    "broker delayed/immediate broker_cpu_us_per_task",
    "memory consumer_rss_growth_mib",
]
# traces off and on, each against the code before tracing (here the checkout's HEAD commit)
TRACING_ROWS = [
    "noop/off c64_tasks_per_s",
    "on/off c64_tasks_per_s",
    "off/main c64_tasks_per_s",
]
# Every system, each scenario, tiny N: about 45 s here (20 of them delays, which waits for a
# 3 s delay; 8 the four tracing drains); room for a slow machine.
RUN_TIMEOUT_SECONDS = 120


@pytest.mark.timeout(RUN_TIMEOUT_SECONDS + 10)
async def test_benchmark_runner_quick_run_reports_every_scenario(
    connection: AbstractConnection, tmp_path: Path
) -> None:
    """`python -m benchmarks.run --quick` exits 0 and its JSON has every scenario, rabbitq
    over raw for both queue types, the delays figures with every delayed task counted in
    the ladder, and the tracing ratios."""
    results = tmp_path / "results.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.run",
        "--quick",
        "--url",
        broker_url(),
        "--json",
        str(results),
        "--tracing-baseline",
        "HEAD",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_SECONDS)
    except TimeoutError:
        proc.terminate()  # the runner deletes its namespace on SIGTERM
        try:
            await asyncio.wait_for(proc.wait(), 2)
        except TimeoutError:
            proc.kill()  # its consumer processes exit once they see it gone
            await proc.wait()
        raise AssertionError(f"the quick run did not finish in {RUN_TIMEOUT_SECONDS}s") from None
    assert proc.returncode == 0, stderr.decode()[-4000:]
    summary = json.loads(results.read_text())["summary"]
    assert SCENARIOS <= set(summary), f"missing: {SCENARIOS - set(summary)}"
    queue_types = summary["queue_types"]
    for row in QUEUE_TYPE_ROWS:
        assert queue_types.get(row, {}).get("ratio/raw") is not None, f"no rabbitq/raw for {row}"
    delays = summary["delays"]
    for row in DELAY_ROWS:
        assert delays.get(row, {}).get("rabbitq") is not None, f"no rabbitq figure for {row}"
    assert delays["memory ladder_held"]["rabbitq"]["median"] == QUICK_N
    for row in TRACING_ROWS:
        assert summary["tracing"].get(row, {}).get("rabbitq") is not None, f"no {row}"
