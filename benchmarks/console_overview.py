"""How long a running `rabbitq console` takes to render its overview and a big parking lot.

    python -m benchmarks.console_overview --workloads 20 --parked 10000 --reps 5

Declares `--workloads` workloads in a fresh namespace, fills the first one's parking lot with
`--parked` parked copies (benchmarks/parking_browse.py's `fill`), starts `rabbitq console` on a
free loopback port and times, from this process, `--reps` GETs of the overview (`/`) and of the
big workload's parking page (`/workloads/w00`, which reads every parked copy to group and page
them), after one untimed GET of each. Prints the first, the median and the slowest response
of each page; issue #12 asks for an overview in under a second. Deletes the namespace and
stops the console on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import aio_pika

import rabbitq
from benchmarks.parking_browse import fill
from benchmarks.probe import LOOPS, run, uvloop_installed
from rabbitq import _declare as declare

OVERVIEW_BUDGET_SECONDS = 1.0  # the acceptance of issue #12


def topology_text(workloads: int) -> str:
    return "".join(f"[workloads.w{i:02d}]\n" for i in range(workloads))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def console(topology: Path, namespace: str, url: str, log: Path) -> Iterator[str]:
    """`rabbitq console` on a free loopback port until the block ends; its base URL."""
    port = free_port()
    args = [sys.executable, "-m", "rabbitq", "console", "--port", str(port)]
    args += ["--topology", str(topology), "--namespace", namespace, "--url", url]
    env = {k: v for k, v in os.environ.items() if k != "RABBITQ_CONSOLE_TOKEN"}
    with log.open("wb") as err:
        proc = subprocess.Popen(args, env=env, stdout=err, stderr=err)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while get(f"{base}/metrics")[0] != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"error: the console did not start:\n{log.read_text()}")
                time.sleep(0.05)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def get(url: str) -> tuple[int, float]:
    """The status of a GET of `url` (0 when nothing answers) and its seconds, body read."""
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            response.read()
            return int(response.status), time.perf_counter() - started
    except OSError:
        return 0, time.perf_counter() - started


def timed(url: str, reps: int) -> tuple[float, list[float]]:
    """The first GET's seconds, then those of `reps` more; every one must answer 200."""
    figures = []
    for _ in range(reps + 1):
        status, seconds = get(url)
        if status != 200:
            raise SystemExit(f"error: GET {url} answered {status}")
        figures.append(seconds)
    return figures[0], figures[1:]


async def main(args: argparse.Namespace) -> None:
    namespace = f"consolebench-{uuid.uuid4().hex[:8]}"
    text = topology_text(args.workloads)
    topology = rabbitq.parse_topology({"bench.toml": text}, namespace)
    big = topology.workload("w00")
    connection = await aio_pika.connect(args.url)
    try:
        await declare.apply(connection, topology)
        await fill(connection, big.parking_queue, args.parked)
        with tempfile.TemporaryDirectory(prefix="console-bench-") as scratch:
            where = Path(scratch)
            (where / "bench.toml").write_text(text)
            pages = {
                f"overview /  ({args.workloads} workloads)": "/",
                f"parking /workloads/w00  ({args.parked:,} parked)": "/workloads/w00",
            }
            with console(where, namespace, args.url, where / "console.err") as base:
                results = {
                    name: await asyncio.to_thread(timed, base + path, args.reps)
                    for name, path in pages.items()
                }
        print(f"{'page':<44} {'first':>8} {'median':>8} {'max':>8}   ({args.reps} reps)")
        for name, (first, rest) in results.items():
            print(f"{name:<44} {first:>7.3f}s {statistics.median(rest):>7.3f}s {max(rest):>7.3f}s")
        first, rest = results[next(iter(pages))]
        verdict = "under" if max(rest) < OVERVIEW_BUDGET_SECONDS else "NOT under"
        print(f"the overview rendered {verdict} {OVERVIEW_BUDGET_SECONDS:.0f}s in every rep")
    finally:
        cleanup = await connection.channel()
        for queue in topology.queues():
            with suppress(aio_pika.exceptions.AMQPError):
                await cleanup.queue_delete(queue.name)
        for exchange in topology.exchanges():
            with suppress(aio_pika.exceptions.AMQPError):
                await cleanup.exchange_delete(exchange.name)
        await connection.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.console_overview", description=__doc__)
    p.add_argument("--url", default=os.environ.get("RABBITQ_URL", "amqp://guest:guest@127.0.0.1/"))
    p.add_argument("--workloads", type=int, default=20)
    p.add_argument("--parked", type=int, default=10_000, help="parked tasks in the first one")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--loop", choices=LOOPS, default="uvloop" if uvloop_installed() else "asyncio")
    arguments = p.parse_args()
    run(lambda: main(arguments), arguments.loop)
