"""The FastStream consumer process: a `RabbitBroker` subscriber taking a pydantic model.

Run by the runner as `python -m benchmarks.faststream_worker --mode drain --queue Q ...`, with
the probe protocol of `raw_worker.py` (`ready`, the first deliveries gated until SIGUSR1, one
JSON line). Configured as a FastStream user gets it for concurrency 64: aio-pika runs every
delivery as its own task, so the subscriber channel's prefetch is the concurrency; the queue is
declared by FastStream as it does by default (durable classic); the ack is FastStream's default
policy, after the handler returns. The handler does nothing but the probe's bookkeeping, as
`rq_app.py`'s handlers do. It imports neither rabbitq nor anything FastStream does not need.

Logging: FastStream's default logger writes an INFO line to stdout for every message received
and processed. Stdout carries the probe protocol here, and the rabbitq consumer logs at
WARNING, so the broker gets a logger at WARNING on stderr, as a user who keeps warnings but not
one line per task configures it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from pydantic import BaseModel

from benchmarks.probe import Probe, run, worker_arguments

LOG_LEVEL = logging.WARNING


class Job(BaseModel):
    """The ~100-byte payload (see `benchmarks.wire.body`)."""

    id: int
    sent_at: float
    pad: str


def quiet_logger() -> logging.Logger:
    """A logger at WARNING on stderr, for every FastStream broker of the benchmark."""
    logger = logging.getLogger("benchmarks.faststream")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler(sys.stderr))
        logger.setLevel(LOG_LEVEL)
        logger.propagate = False
    return logger


def new_broker(url: str, **options: Any) -> RabbitBroker:
    return RabbitBroker(url, logger=quiet_logger(), **options)


def queue(name: str) -> RabbitQueue:
    """A queue as FastStream declares it by default (durable, classic)."""
    return RabbitQueue(name)


async def main(args: Any) -> None:
    gated = args.mode != "latency"
    probe = Probe(
        expect=args.expect,
        idle_seconds=args.idle,
        gated=gated,
        rss_at=tuple(int(x) for x in args.rss_at.split(",") if x),
    )
    probe.install()
    reconnects = 0

    def reconnected(*_: Any) -> None:
        # The robust connection came back: the runner sees `reconnects` and measures again.
        nonlocal reconnects
        reconnects += 1

    broker = new_broker(args.url, on_reconnected=[reconnected])
    subscriber = broker.subscriber(queue(args.queue), channel=Channel(prefetch_count=args.prefetch))

    async def drain(job: Job) -> None:
        if probe.admit():
            await probe.gate.wait()
        probe.finished()

    async def latency(job: Job) -> None:
        now = time.time()
        if probe.admit():
            await probe.gate.wait()
        probe.latency(job.sent_at, now)
        probe.finished()

    subscriber({"drain": drain, "latency": latency}[args.mode])
    await broker.start()  # returns once the subscriber consumes
    if not gated:
        probe.ready()
    idle = None if args.expect else asyncio.create_task(probe.watch_idle())
    await probe.done.wait()
    result = probe.result(reconnects=reconnects)
    if idle is not None:
        idle.cancel()
    await broker.stop()  # waits for the running handlers, so the last acks are sent
    Probe.emit(result)


if __name__ == "__main__":
    parser = worker_arguments(__doc__ or "")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--prefetch", type=int, required=True, help="the concurrency")
    arguments = parser.parse_args()
    run(lambda: main(arguments), arguments.loop)
