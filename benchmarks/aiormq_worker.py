"""The hand-tuned ceiling: a plain aiormq consume loop that acks with `multiple=True` every 16.

Run by the runner as `python -m benchmarks.aiormq_worker --mode drain --queue Q ...`. What a
careful programmer writes for speed on aiormq alone: one channel, prefetch N, a no-op handler,
and one `basic.ack(multiple=True)` per 16 deliveries (a quarter of prefetch 64, so the broker
keeps sending). Deliveries of a no-op handler finish in order, so a multiple-ack of the latest
tag is safe here; the tail is acked when the last task arrives. It knows nothing of retries,
decoding or metrics: the figure rabbitq's consumer is measured against. Modes: drain and
latency (the handler notes its start minus the publish time carried in the body).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage

from benchmarks.probe import Probe, run, worker_arguments
from benchmarks.wire import sent_at_of

ACK_EVERY = 16


async def main(args: Any) -> None:
    gated = args.mode != "latency"
    probe = Probe(expect=args.expect, idle_seconds=args.idle, gated=gated)
    probe.install()
    connection = await aiormq.connect(args.url)
    closing = False

    def on_close(*_: Any) -> None:
        if not closing:
            sys.stderr.write("aiormq worker: connection lost\n")
            os._exit(3)

    connection.closing.add_done_callback(on_close)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=args.prefetch)
    unacked = 0
    # a batch waits at most this long, so latency runs at low rates are not held up
    flush: asyncio.TimerHandle | None = None
    latest = 0

    def ack_now() -> asyncio.Future[None] | None:
        nonlocal unacked, flush
        if flush is not None:
            flush.cancel()
            flush = None
        if not unacked:
            return None
        unacked = 0
        return asyncio.ensure_future(channel.basic_ack(latest, multiple=True))

    async def handle(message: DeliveredMessage) -> None:
        nonlocal unacked, flush, latest
        if args.mode == "latency":
            probe.latency(sent_at_of(message.body), time.time())
        if probe.admit():
            await probe.gate.wait()
        tag = message.delivery_tag
        assert tag is not None
        latest = max(latest, tag)
        unacked += 1
        if probe.handled + 1 == probe.expect:
            if (last := ack_now()) is not None:
                await last  # written before the connection closes
        elif unacked >= ACK_EVERY:
            ack_now()
        elif flush is None:
            flush = asyncio.get_running_loop().call_later(0.01, ack_now)
        probe.finished()

    await channel.basic_consume(args.queue, handle, no_ack=False)
    if not gated:
        probe.ready()
    await probe.done.wait()
    result = probe.result()
    closing = True
    await connection.close()
    Probe.emit(result)


if __name__ == "__main__":
    parser = worker_arguments(__doc__ or "")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--prefetch", type=int, required=True)
    arguments = parser.parse_args()
    run(lambda: main(arguments), arguments.loop)
