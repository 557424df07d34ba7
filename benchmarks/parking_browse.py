"""How fast `rabbitq parking list` reads a parking lot, and that it leaves it as it was.

    python -m benchmarks.parking_browse --n 10000 --reps 3

Fills a fresh workload's parking lot with N parked copies (headers as rabbitq writes them,
with a traceback), then browses it `--reps` times: the rate, and whether the count and the
order of message ids are the same before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

import aio_pika

import rabbitq
from benchmarks.probe import LOOPS, run, uvloop_installed
from rabbitq import _declare as declare
from rabbitq import _parking as parking
from rabbitq import _wire as wire
from rabbitq._errors import ParkReason

TRACEBACK = (
    'Traceback (most recent call last):\n  File "/srv/app/jobs.py", line 12, in send\n'
    "    check(item)\nValueError: no such address\n"
)


async def fill(connection: aio_pika.abc.AbstractConnection, queue: str, n: int) -> list[str]:
    """Publish n parked copies, confirmed, into `queue`; their message ids in order."""
    channel = await connection.channel(publisher_confirms=True)
    window = asyncio.Semaphore(1000)

    async def one(i: int) -> None:
        headers = wire.park_headers(
            {wire.HEADER_ATTEMPT: 3},
            reason=ParkReason.RETRIES_EXHAUSTED,
            error_type="ValueError",
            error_message=f"no such address {i}",
            traceback=TRACEBACK,
            attempts=3,
            first_failure_ms=None,
            failed_at=time.time(),
            host="bench",
            workload="w",
        )
        message = aio_pika.Message(
            b'{"n": %d}' % i, headers=headers, message_id=f"m{i:06d}", type="w.t"
        )
        async with window:
            await channel.default_exchange.publish(message, routing_key=queue)

    # in order: a semaphore admits waiters first come, first served
    await asyncio.gather(*(one(i) for i in range(n)))
    await channel.close()
    return [f"m{i:06d}" for i in range(n)]


async def main(args: argparse.Namespace) -> None:
    ns = f"parkbench-{uuid.uuid4().hex[:8]}"
    topology = rabbitq.parse_topology({"t.toml": f'namespace = "{ns}"\n[workloads.w]\n'})
    workload = topology.workload("w")
    connection = await aio_pika.connect(args.url)
    try:
        await declare.apply(connection, topology)
        expected = await fill(connection, workload.parking_queue, args.n)
        for rep in range(args.reps):
            started = time.perf_counter()
            found = await parking.browse(args.url, workload)
            seconds = time.perf_counter() - started
            same = [t.message_id for t in found] == expected
            print(
                f"rep {rep + 1}: {len(found):,} parked tasks read in {seconds:.2f}s "
                f"({len(found) / seconds:,.0f}/s); same ids in the same order: {same}"
            )
    finally:
        cleanup = await connection.channel()
        for queue in topology.queues():
            await cleanup.queue_delete(queue.name)
        for exchange in topology.exchanges():
            await cleanup.exchange_delete(exchange.name)
        await connection.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.parking_browse", description=__doc__)
    p.add_argument("--url", default=os.environ.get("RABBITQ_URL", "amqp://guest:guest@127.0.0.1/"))
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--loop", choices=LOOPS, default="uvloop" if uvloop_installed() else "asyncio")
    arguments = p.parse_args()
    run(lambda: main(arguments), arguments.loop)
