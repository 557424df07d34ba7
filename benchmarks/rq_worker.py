"""The rabbitq consumer process: one `rabbitq.Consumer` of one workload, instrumented.

Run by the runner as `python -m benchmarks.rq_worker --mode drain --workload drain-c64 ...`.
It is what `rabbitq consume` does (the same Consumer, the app from `benchmarks.rq_app`), plus
the probe's ready/go protocol and one JSON line of figures on exit. Logging and metrics are
`rabbitq consume`'s defaults: INFO text lines on stderr, and every metric on a registry with
the process collectors (not scraped during a run).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

import rabbitq
from benchmarks.probe import Probe, run, worker_arguments
from benchmarks.rq_app import build_app
from rabbitq import _logs as logs
from rabbitq._metrics import Metrics

SETTLE_POLL_SECONDS = 0.001
SETTLE_SECONDS = 60.0
# Modes whose tasks arrive while the consumer runs: ready as soon as it consumes.
UNGATED = ("latency", "calls", "delays")  # paced or called by the runner, or none to drain


async def _settled(consumer: rabbitq.Consumer, outcome: str, handled: int) -> None:
    """Wait until the consumer settled every handled task (acked; tiers: forwarded, acked).

    The probe counts in the handler; rabbitq settles just after (an ack, or a confirm), and
    offers no event for it, so this polls at a millisecond.
    """
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        if consumer.counts[outcome] >= handled:
            return
        await asyncio.sleep(SETTLE_POLL_SECONDS)
    sys.exit(f"rabbitq worker: {consumer.counts[outcome]} of {handled} tasks were settled")


async def main(args: Any) -> None:
    rss_at = tuple(int(x) for x in args.rss_at.split(",") if x)
    if args.mode == "tiers":
        # The handler counts a forward as it raises; the last sample waits for the confirms.
        rss_at = tuple(x for x in rss_at if x < args.expect)
    probe = Probe(
        expect=args.expect, idle_seconds=args.idle, gated=args.mode not in UNGATED, rss_at=rss_at
    )
    probe.install()
    app, _ = build_app(probe)
    topology = rabbitq.parse_topology({"bench.toml": args.topology.read_text()})
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    consumer = rabbitq.Consumer(
        app, topology.workload(args.workload), args.url, grace_seconds=5, metrics=Metrics(registry)
    )
    running = asyncio.create_task(consumer.run())
    ready = asyncio.create_task(consumer.ready.wait())
    await asyncio.wait([running, ready], return_when=asyncio.FIRST_COMPLETED)
    if running.done():
        running.result()  # raises what stopped the consumer (e.g. topology missing)
        sys.exit("rabbitq worker: the consumer stopped before it was ready")
    if args.mode in UNGATED:
        probe.ready()
    idle = None if args.expect else asyncio.create_task(probe.watch_idle())
    await asyncio.wait(
        [running, asyncio.create_task(probe.done.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    if running.done():
        running.result()
        sys.exit("rabbitq worker: the consumer stopped before the work was done")
    await _settled(consumer, "retried" if args.mode == "tiers" else "succeeded", probe.handled)
    if args.mode == "tiers":
        probe.sample_rss(str(args.expect))
        probe.last_at = time.monotonic()
    result = probe.result(reconnects=consumer.reconnects, outcomes=dict(consumer.counts))
    if idle is not None:
        idle.cancel()
    consumer.stop()
    await running
    Probe.emit(result)


def cli(argv: list[str] | None = None) -> None:
    parser = worker_arguments(__doc__ or "")
    parser.add_argument("--workload", required=True)
    parser.add_argument("--topology", type=Path, required=True, help="the run's topology file")
    arguments = parser.parse_args(argv)
    logs.setup("info", "text", (arguments.url,))
    run(lambda: main(arguments), arguments.loop)


if __name__ == "__main__":
    cli()
