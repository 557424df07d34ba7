"""The raw aio-pika baseline consumer: what a hand-written prefetch + manual-ack loop costs.

Run by the runner as `python -m benchmarks.raw_worker --mode drain --queue Q ...`. Modes:

* drain: ack each delivery after a no-op handler;
* latency: the handler notes its start minus the publish time carried in the body;
* retry: a first attempt is copied to a TTL delay queue with a confirm, then acked; the copy
  comes back and is acked (counted as handled);
* tiers: like retry, but the delay is long: counts the forwards and samples RSS;
* calls: a direct reply-to responder, as RabbitMQ's RPC tutorial writes one: read the id
  from the JSON body, publish its double to `reply_to` with the `correlation_id` (no confirm),
  then ack.

Minimal on purpose: one connection, a confirm channel beside the consuming one, the default
exchange, no decoding beyond what latency needs. It imports neither rabbitq nor pydantic.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from benchmarks.probe import Probe, run, worker_arguments
from benchmarks.wire import HEADER_ATTEMPT, sent_at_of


async def main(args: Any) -> None:
    gated = args.mode not in ("latency", "calls")
    probe = Probe(
        expect=args.expect,
        idle_seconds=args.idle,
        gated=gated,
        rss_at=tuple(int(x) for x in args.rss_at.split(",") if x),
    )
    probe.install()
    connection = await aio_pika.connect(args.url)
    closing = False

    def on_close(*_: Any) -> None:
        if not closing:
            # A broker restart or a forced close disturbed the run; the runner measures again.
            sys.stderr.write("raw worker: connection lost\n")
            os._exit(3)

    connection.close_callbacks.add(on_close)
    channel = await connection.channel(publisher_confirms=False)
    await channel.set_qos(prefetch_count=args.prefetch)
    confirms = await connection.channel(publisher_confirms=True)
    queue = await channel.get_queue(args.queue, ensure=False)

    async def drain(message: AbstractIncomingMessage) -> None:
        if probe.admit():
            await probe.gate.wait()
        await message.ack()
        probe.finished()

    async def latency(message: AbstractIncomingMessage) -> None:
        now = time.time()
        if probe.admit():
            await probe.gate.wait()
        probe.latency(sent_at_of(message.body), now)
        await message.ack()
        probe.finished()

    async def forward(message: AbstractIncomingMessage) -> None:
        if probe.admit():
            await probe.gate.wait()
        if (message.headers or {}).get(HEADER_ATTEMPT, 1) == 1:
            copy = aio_pika.Message(
                message.body,
                headers={**(message.headers or {}), HEADER_ATTEMPT: 2},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type=message.content_type,
                message_id=message.message_id,
                type=message.type,
            )
            await confirms.default_exchange.publish(copy, routing_key=args.delay_queue)
            await message.ack()
            if args.mode == "tiers":
                probe.finished()
            return
        await message.ack()
        probe.finished()

    replies = await connection.channel(publisher_confirms=False)

    async def answer(message: AbstractIncomingMessage) -> None:
        if probe.admit():
            await probe.gate.wait()
        result = json.dumps(json.loads(message.body)["id"] * 2).encode()
        reply = aio_pika.Message(result, correlation_id=message.correlation_id)
        await replies.default_exchange.publish(reply, routing_key=message.reply_to or "")
        await message.ack()
        probe.finished()

    handler = {
        "drain": drain,
        "latency": latency,
        "retry": forward,
        "tiers": forward,
        "calls": answer,
    }[args.mode]
    await queue.consume(handler, no_ack=False)
    if not gated:
        probe.ready()
    idle = None if args.expect else asyncio.create_task(probe.watch_idle())
    await probe.done.wait()
    result = probe.result()
    closing = True
    if idle is not None:
        idle.cancel()
    await connection.close()
    Probe.emit(result)


if __name__ == "__main__":
    parser = worker_arguments(__doc__ or "")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--prefetch", type=int, required=True)
    parser.add_argument("--delay-queue", default="", help="retry and tiers: the TTL queue")
    arguments = parser.parse_args()
    run(lambda: main(arguments), arguments.loop)
