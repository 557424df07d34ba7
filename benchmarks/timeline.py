"""A timeline of one drain: when deliveries arrive, handlers end, and ack frames leave.

    python -m benchmarks.timeline --n 20000 --capacity 64

Runs a `rabbitq.Consumer` in this process (on uvloop by default) over N pre-published tasks,
with the acker and the delivery callback wrapped to stamp each event, then reports what the
consumer waited on: how long the prefetch window was full (every slot delivered but not yet
acked on the wire), how long it had nothing to run while finished tasks waited for their ack
frame (waiting on its own acks), how long it had nothing to run and nothing unacked (waiting
for the broker), the gaps between arrivals, how many deliveries each ack frame settled, and
how long a finished task waited for its ack frame. Wrapping costs a little; the rate shown is
for orientation, not a benchmark figure (`benchmarks.run` is).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from typing import Any

from pydantic import BaseModel

import rabbitq
from benchmarks import broker
from benchmarks.probe import LOOPS, run, uvloop_installed
from rabbitq import _ack, _consume
from rabbitq import _declare as declare


class Item(BaseModel):
    id: int
    sent_at: float
    pad: str


Event = tuple[int, str, int, bool]  # (ns, kind, delivery tag, multiple)


def instrument(events: list[Event]) -> None:
    """Stamp arrivals, handler ends and ack frames as they are written."""
    now = time.perf_counter_ns
    ack = _ack.Acker.ack

    def finished(self: Any, tag: int) -> None:
        events.append((now(), "finish", tag, False))
        ack(self, tag)

    setattr(_ack.Acker, "ack", finished)  # noqa: B010  # wrapping for the stamps
    if not hasattr(_consume.Consumer, "_dispatch"):  # before rabbitq/_amqp.py: on aiormq
        _instrument_aiormq(events)
        return
    from rabbitq import _amqp

    dispatch, ack_frame = _consume.Consumer._dispatch, _amqp.ConsumeConnection.ack

    def delivered(self: Any, acker: Any, delivery: Any) -> None:
        events.append((now(), "arrive", delivery.tag, False))
        dispatch(self, acker, delivery)

    def written(self: Any, tag: int, multiple: bool = False) -> bool:
        events.append((now(), "ack", tag, multiple))
        return ack_frame(self, tag, multiple)

    setattr(_consume.Consumer, "_dispatch", delivered)  # noqa: B010
    setattr(_amqp.ConsumeConnection, "ack", written)  # noqa: B010


def _instrument_aiormq(events: list[Event]) -> None:
    """The same stamps for a checkout whose consumer read deliveries through aiormq
    (`--tree`-style comparisons: run this file with PYTHONPATH at that checkout)."""
    import aiormq

    now = time.perf_counter_ns
    on_delivery = getattr(_consume.Consumer, "_on_delivery")  # noqa: B009
    basic_ack = aiormq.Channel.basic_ack

    async def delivered(self: Any, acker: Any, message: Any) -> None:
        events.append((now(), "arrive", message.delivery_tag, False))
        await on_delivery(self, acker, message)

    async def written(self: Any, tag: int, multiple: bool = False, wait: bool = True) -> None:
        await basic_ack(self, tag, multiple, wait)
        events.append((now(), "ack", tag, multiple))

    setattr(_consume.Consumer, "_on_delivery", delivered)  # noqa: B010
    setattr(aiormq.Channel, "basic_ack", written)  # noqa: B010


def _pct(values: list[int], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] / 1000 if values else 0.0


def report(events: list[Event], capacity: int) -> str:
    events.sort()
    start, end = events[0][0], events[-1][0]
    outstanding: set[int] = set()  # delivered, not yet settled by an ack frame on the wire
    finished_at: dict[int, int] = {}
    full_ns = empty_ns = held_ns = 0
    running = 0  # delivered, handler not finished
    last = start
    arrivals: list[int] = []
    per_frame: list[int] = []
    waits: list[int] = []
    for at, kind, tag, multiple in events:
        if len(outstanding) >= capacity:
            full_ns += at - last
        if not outstanding:
            empty_ns += at - last
        elif not running:
            held_ns += at - last
        last = at
        if kind == "arrive":
            outstanding.add(tag)
            arrivals.append(at)
            running += 1
        elif kind == "finish":
            finished_at[tag] = at
            running -= 1
        else:
            settled = {t for t in outstanding if t <= tag} if multiple else {tag}
            outstanding -= settled
            per_frame.append(len(settled))
            waits += [at - finished_at.pop(t) for t in settled if t in finished_at]
    total = end - start
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
    waits.sort()
    return "\n".join(
        [
            f"{len(arrivals):,} deliveries in {total / 1e9:.2f}s "
            f"({len(arrivals) / total * 1e9:,.0f}/s, instrumented)",
            f"window full (all {capacity} delivered, not yet acked on the wire): "
            f"{full_ns / total:.1%} of the time",
            f"nothing to run, finished tasks not yet acked (waiting on its own acks): "
            f"{held_ns / total:.1%}",
            f"nothing to run, everything acked (waiting for the broker): {empty_ns / total:.1%}",
            f"gap between arrivals, us: p50 {_pct(gaps, 0.5):.1f}, p99 {_pct(gaps, 0.99):.1f}, "
            f"max {_pct(gaps, 1.0):.1f}",
            f"ack frames: {len(per_frame):,}; deliveries per frame: median "
            f"{statistics.median(per_frame or [0]):.0f}, max {max(per_frame, default=0)}",
            f"a finished task's wait for its ack frame, us: p50 {_pct(waits, 0.5):.1f}, "
            f"p99 {_pct(waits, 0.99):.1f}, max {_pct(waits, 1.0):.1f}",
        ]
    )


async def main(args: argparse.Namespace) -> None:
    ns = f"timeline-{uuid.uuid4().hex[:8]}"
    text = f'namespace = "{ns}"\n[workloads.w]\ncapacity = {args.capacity}\n'
    topology = rabbitq.parse_topology({"t.toml": text})
    spec = topology.workload("w")
    async with broker.connection(args.url) as conn:
        await declare.apply(conn, topology)
    try:
        await broker.fill(args.url, (spec.task_exchange, spec.routing_key), "w", args.n)
        app = rabbitq.App(namespace=ns, url=args.url)
        done = asyncio.Event()
        seen = 0

        @app.task("bench.w", workload="w")
        async def task(item: Item) -> None:
            nonlocal seen
            seen += 1
            if seen == args.n:
                done.set()

        events: list[Event] = []
        instrument(events)
        consumer = rabbitq.Consumer(app, spec, args.url)
        running = asyncio.create_task(consumer.run())
        await done.wait()
        consumer.stop()
        await running
        print(report(events, args.capacity))
    finally:
        async with broker.connection(args.url) as conn:
            channel = await conn.channel()
            for queue in topology.queues():
                await channel.queue_delete(queue.name)
            for exchange in topology.exchanges():
                await channel.exchange_delete(exchange.name)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.timeline", description=__doc__)
    p.add_argument("--url", default=os.environ.get("RABBITQ_URL", "amqp://guest:guest@127.0.0.1/"))
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--capacity", type=int, default=64)
    p.add_argument("--loop", choices=LOOPS, default="uvloop" if uvloop_installed() else "asyncio")
    arguments = p.parse_args()
    run(lambda: main(arguments), arguments.loop)
