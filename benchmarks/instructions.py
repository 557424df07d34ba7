"""CPU instructions per task, counted by valgrind's callgrind: a figure no other load can move.

    python -m benchmarks.instructions                      # this checkout
    python -m benchmarks.instructions --tree ../before     # another checkout, same broker
    python -m benchmarks.instructions --no-otel            # opentelemetry not importable

On a shared 2-core machine a rate moves by 10-20% between runs; an instruction count repeats
to a fraction of a percent. Each scenario runs in one process twice under callgrind, with
a small and a large number of tasks, and the difference divided by the difference in tasks is
the cost of one task, start-up and imports cancelled out:

* `drain`: `publish_many` the tasks, then a `Consumer` drains them (a no-op handler);
* `batch`: `publish_many` in batches of 1,000;
* `one`: `await task.publish(...)` one at a time;
* `ceiling`: `publish_many` the tasks, then the hand-tuned aiormq loop of
  `benchmarks/aiormq_worker.py` drains them (no-op, one multiple-ack per 16): what `drain`
  costs beyond it is rabbitq's own.

`--tree` runs another checkout's rabbitq (its directory comes first on `sys.path`), so two
versions are compared on one broker in one run. Needs `valgrind` (Debian: valgrind).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("drain", "ceiling", "batch", "one")
# tasks in the small and the large run; one-at-a-time publishing is slow under callgrind
SIZES = {"drain": (2000, 8000), "ceiling": (2000, 8000), "batch": (2000, 8000), "one": (300, 1200)}

# Runs in the child, against whichever rabbitq its working directory holds (old or new layout).
CHILD = """
import asyncio, sys, uuid
import aio_pika
from pydantic import BaseModel
import rabbitq
try:
    from rabbitq import _declare as declare
except ImportError:
    from rabbitq import declare

class Item(BaseModel):
    n: int

async def main(scenario, n, url):
    ns = "instr" + uuid.uuid4().hex[:8]
    text = f'namespace = "{ns}"\\n[workloads.w]\\ncapacity = 64\\n'
    topology = rabbitq.parse_topology({"t.toml": text})
    connection = await aio_pika.connect(url)
    await declare.apply(connection, topology)
    app = rabbitq.App(namespace=ns, url=url)

    @app.task("w.t", workload="w")
    async def task(item: Item) -> None:
        pass

    try:
        if scenario == "one":
            for i in range(n):
                await task.publish(Item(n=i))
        else:
            for i in range(0, n, 1000):
                await app.publish_many([task.message(Item(n=j)) for j in range(i, i + 1000)])
        await app.close()
        if scenario == "drain":
            consumer = rabbitq.Consumer(app, topology.workload("w"), url, burst=True)
            await consumer.run()
            assert consumer.counts["succeeded"] == n, consumer.counts
        if scenario == "ceiling":
            import aiormq
            conn = await aiormq.connect(url)
            channel = await conn.channel()
            await channel.basic_qos(prefetch_count=64)
            done, count = asyncio.Event(), 0

            async def handle(message):
                nonlocal count
                count += 1
                if count == n:
                    await channel.basic_ack(message.delivery_tag, multiple=True)
                    done.set()
                elif count % 16 == 0:
                    asyncio.ensure_future(channel.basic_ack(message.delivery_tag, multiple=True))

            await channel.basic_consume(topology.workload("w").work_queue, handle)
            await done.wait()
            await conn.close()
    finally:
        channel = await connection.channel()
        for queue in topology.queues():
            await channel.queue_delete(queue.name)
        for exchange in topology.exchanges():
            await channel.exchange_delete(exchange.name)
        await connection.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


# `--no-otel`: the child cannot import opentelemetry, as without the `otel` extra
NO_OTEL = """
import sys

class NoOpenTelemetry:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(f"No module named {name!r}")

sys.meta_path.insert(0, NoOpenTelemetry())
"""


def instructions(tree: Path, scenario: str, n: int, url: str, no_otel: bool = False) -> int:
    """Instructions callgrind counted for one child run of `scenario` with `n` tasks."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-c",
                (NO_OTEL if no_otel else "") + CHILD,
                scenario,
                str(n),
                url,
            ],
            cwd=tree,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(tree)},
            check=False,
        )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode or not found:
        raise SystemExit(f"error: {scenario} with {n} tasks failed:\n{done.stderr[-2000:]}")
    return int(found[1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__)
    p.add_argument("--tree", type=Path, default=ROOT, help="the checkout to measure")
    p.add_argument("--url", default=os.environ.get("RABBITQ_URL", "amqp://guest:guest@127.0.0.1/"))
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument(
        "--no-otel",
        action="store_true",
        help="opentelemetry cannot be imported: rabbitq's tracing is off, as without the extra",
    )
    args = p.parse_args(argv)
    for scenario in args.scenarios.split(","):
        if scenario not in SIZES:
            p.error(f"--scenarios: {scenario!r} is not one of {', '.join(SCENARIOS)}")
        few, many = SIZES[scenario]
        small = instructions(args.tree, scenario, few, args.url, args.no_otel)
        large = instructions(args.tree, scenario, many, args.url, args.no_otel)
        per_task = (large - small) / (many - few)
        print(f"{args.tree}  {scenario:5}  {per_task / 1000:,.1f}k instructions per task")


if __name__ == "__main__":
    main()
