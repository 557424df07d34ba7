"""Where does the batch publisher's gap to the raw floor come from? Broker or client?

    python -m benchmarks.publish_breakdown --n 20000 --batch 1000 --reps 3
    python -m benchmarks.publish_breakdown --only rabbitq --reps 1 --cprofile /tmp/pub.prof
    python -m benchmarks.publish_breakdown --mode one --n 5000 --loop uvloop
    python -m benchmarks.publish_breakdown --mode concurrent8 --n 5000 --loop uvloop

The same batch publish (batches of `--batch`, each batch's confirms pipelined, N tasks of
~100 bytes), in steps from the runner's raw baseline to rabbitq's `publish_many`, interleaved
within every repetition on the same broker:

| variant | what changes against the line above |
|---|---|
| raw | the runner's raw baseline: aio-pika, default exchange, plain classic queue, body only |
| raw-prio | into rabbitq's work queue (x-max-priority 4, dead-letter args) |
| raw-props | rabbitq's properties and header, per message; mandatory; via the task exchange |
| aiormq-props | the same on aiormq's `basic_publish` with pamqp properties (no aio-pika Message) |
| aiormq-nowait | the same with `basic_publish(wait=False)`: no wait for the socket write |
| rabbitq-each | rabbitq's `publish_many` as before perf-publish: a `basic_publish` per message |
| rabbitq | `App.publish_many([task.message(model) ...])`: pydantic per task, pipelined writes |
| rabbitq+metrics | with `App(metrics=...)`: a counter and a confirm-latency histogram per message |
| ...@baseline | with `--baseline-publish FILE`: rabbitq(+metrics) on that file's Publisher |

`--mode one` publishes one message at a time, each awaiting its confirm; `--mode concurrent8`
has 8 publishers at once (coroutines, or threads for `publish_sync`) on one connection, N in
all. Their variants:

| variant | what it is |
|---|---|
| raw | the runner's: aio-pika's `default_exchange.publish`, body only, into a plain queue |
| raw-props | aio-pika with rabbitq's properties and headers, mandatory, via the task exchange |
| aiormq-props | the same on aiormq's `basic_publish` with pamqp properties |
| rabbitq | `await task.publish(model)` |
| rabbitq+metrics | the same with `App(metrics=...)` |
| rabbitq-sync | `task.publish_sync(model)` from plain threads (the app's loop thread publishes) |

For each: the rate, the client's CPU per message (`time.process_time`, this process only) and
the broker's CPU per message (`beam.smp` utime+stime from /proc; the broker is shared, so other
users' load shows up there as noise). Ratios are taken to `raw` of the same repetition.
Connections are opened and payloads built before the clock starts, as in the runner; building
each message (properties, ids, serialising the model) is timed. `--cprofile PATH` profiles the
`--only` variants' timed sections and prints the top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib.util
import os
import pstats
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import aio_pika
import aiormq
from pamqp.commands import Basic
from prometheus_client import CollectorRegistry

import rabbitq._app
from benchmarks import broker
from benchmarks.cpu import broker_cpu_seconds, broker_pid
from benchmarks.names import RawQueues, new_namespace, topology_toml
from benchmarks.probe import LOOPS
from benchmarks.probe import run as run_loop
from benchmarks.rq_app import Job, build_app, task_name
from benchmarks.run import (
    BROKER_DOWN_SECONDS,
    DEFAULT_URL,
    RETRY_WAIT_SECONDS,
    delete_namespace,
)
from benchmarks.wire import CONTENT_TYPE, HEADER_ATTEMPT, PERSISTENT, body
from rabbitq._errors import RabbitqError
from rabbitq._metrics import Metrics
from rabbitq._publish import raise_first
from rabbitq._topology import Topology, parse_topology
from rabbitq._wire import HEADER_PUBLISHED_AT

WORKLOAD = "publish"
ATTEMPTS = 5
MODES = {"batch": 0, "one": 1, "concurrent8": 8}  # publishers at once (0: batches)


@dataclass(frozen=True, slots=True)
class Ctx:
    url: str
    namespace: str
    topology: Topology
    raw: RawQueues
    n: int
    batch: int
    baseline: type[Any] | None = None  # the Publisher class of --baseline-publish
    concurrency: int = 0  # for --mode one and concurrent8: publishers at once

    @property
    def work_queue(self) -> str:
        return self.topology.workload(WORKLOAD).work_queue

    @property
    def task_exchange(self) -> str:
        return self.topology.workload(WORKLOAD).task_exchange


class Clock:
    """The timed section: wall time, this process's CPU, the broker's CPU."""

    def __init__(self, profiler: cProfile.Profile | None) -> None:
        self.profiler = profiler
        self.wall = self.cpu = 0.0
        self.broker_cpu: float | None = None

    def __enter__(self) -> Clock:
        self._broker = broker_pid()
        self._broker0 = broker_cpu_seconds(self._broker)
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()
        if self.profiler is not None:
            self.profiler.enable()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.profiler is not None:
            self.profiler.disable()
        self.wall = time.perf_counter() - self._wall0
        self.cpu = time.process_time() - self._cpu0
        end = broker_cpu_seconds(self._broker)
        if self._broker0 is not None and end is not None:
            self.broker_cpu = end - self._broker0


def rabbitq_properties(i: int) -> dict[str, Any]:
    """What rabbitq's `Task.message` puts on a task, as aio-pika Message arguments."""
    return {
        "content_type": CONTENT_TYPE,
        "delivery_mode": PERSISTENT,
        "message_id": uuid.uuid4().hex,
        "timestamp": datetime.now(UTC),
        "type": task_name(WORKLOAD),
        "headers": task_headers(),
    }


def task_headers() -> dict[str, Any]:
    return {HEADER_ATTEMPT: 1, HEADER_PUBLISHED_AT: int(time.time() * 1000)}


Variant = Callable[[Ctx, cProfile.Profile | None], Awaitable[Clock]]


async def _aio_pika_batches(
    ctx: Ctx,
    profiler: cProfile.Profile | None,
    *,
    exchange_name: str,
    routing_key: str,
    props: bool,
) -> Clock:
    bodies = [body(i) for i in range(ctx.n)]
    async with broker.connection(ctx.url, "bench breakdown") as conn:
        channel = await conn.channel(publisher_confirms=True, on_return_raises=props)
        exchange = (
            channel.default_exchange
            if not exchange_name
            else await channel.get_exchange(exchange_name, ensure=False)
        )

        def message(i: int) -> aio_pika.Message:
            if props:
                return aio_pika.Message(bodies[i], **rabbitq_properties(i))
            return aio_pika.Message(bodies[i], delivery_mode=PERSISTENT)

        with Clock(profiler) as clock:
            for start in range(0, ctx.n, ctx.batch):
                await asyncio.gather(
                    *(
                        exchange.publish(message(i), routing_key=routing_key, mandatory=props)
                        for i in range(start, min(start + ctx.batch, ctx.n))
                    )
                )
        return clock


async def raw(ctx: Ctx, profiler: cProfile.Profile | None) -> Clock:
    return await _aio_pika_batches(
        ctx, profiler, exchange_name="", routing_key=ctx.raw.publish.name, props=False
    )


async def raw_prio(ctx: Ctx, profiler: cProfile.Profile | None) -> Clock:
    return await _aio_pika_batches(
        ctx, profiler, exchange_name="", routing_key=ctx.work_queue, props=False
    )


async def raw_props(ctx: Ctx, profiler: cProfile.Profile | None) -> Clock:
    return await _aio_pika_batches(
        ctx, profiler, exchange_name=ctx.task_exchange, routing_key=WORKLOAD, props=True
    )


async def aiormq_props(ctx: Ctx, profiler: cProfile.Profile | None, *, wait: bool = True) -> Clock:
    bodies = [body(i) for i in range(ctx.n)]
    async with broker.connection(ctx.url, "bench breakdown") as conn:
        channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)  # `wait` is the concrete channel's
        exchange, kind = ctx.task_exchange, task_name(WORKLOAD)

        async def one(i: int) -> None:
            properties = Basic.Properties(
                headers=task_headers(),
                content_type=CONTENT_TYPE,
                delivery_mode=PERSISTENT,
                message_id=uuid.uuid4().hex,
                timestamp=datetime.now(UTC),
                message_type=kind,
            )
            confirm = await underlay.basic_publish(
                bodies[i],
                exchange=exchange,
                routing_key=WORKLOAD,
                properties=properties,
                mandatory=True,
                timeout=30,
                wait=wait,
            )
            assert isinstance(confirm, Basic.Ack)

        with Clock(profiler) as clock:
            if ctx.concurrency:
                await _spread(one, ctx.n, ctx.concurrency)
            for start in range(0, ctx.n if not ctx.concurrency else 0, ctx.batch):
                await asyncio.gather(*(one(i) for i in range(start, min(start + ctx.batch, ctx.n))))
        return clock


async def aiormq_nowait(ctx: Ctx, profiler: cProfile.Profile | None) -> Clock:
    return await aiormq_props(ctx, profiler, wait=False)


async def _rabbitq(
    ctx: Ctx,
    profiler: cProfile.Profile | None,
    metrics: bool,
    each: bool = False,
    publisher: type[Any] | None = None,
) -> Clock:
    if publisher is not None:  # App.publisher() builds the module's Publisher
        with mock.patch.object(rabbitq._app, "Publisher", publisher):
            return await _rabbitq(ctx, profiler, metrics, each)
    app, tasks = build_app()
    app.namespace, app.url = ctx.namespace, ctx.url
    if metrics:  # a registry of its own: the default one would refuse a second Metrics
        app.metrics = Metrics(CollectorRegistry())
    task = tasks[WORKLOAD]
    payloads = [Job.make(i) for i in range(ctx.n)]
    async with app:
        with Clock(profiler) as clock:
            for start in range(0, ctx.n, ctx.batch):
                messages = [task.message(p) for p in payloads[start : start + ctx.batch]]
                if each:  # App.publish_many, on a basic_publish per message
                    each_publisher = await app.publisher()
                    raise_first(messages, await each_publisher._send_each(messages))
                else:
                    await app.publish_many(messages)
        return clock


async def rabbitq_(ctx: Ctx, profiler: cProfile.Profile | None) -> Clock:
    return await _rabbitq(ctx, profiler, metrics=False)


async def rabbitq_each(ctx: Ctx, profiler: cProfile.Profile | None) -> Clock:
    return await _rabbitq(ctx, profiler, metrics=False, each=True)


async def rabbitq_metrics(ctx: Ctx, profiler: cProfile.Profile | None) -> Clock:
    return await _rabbitq(ctx, profiler, metrics=True)


async def _spread(send: Callable[[int], Awaitable[None]], n: int, concurrency: int) -> None:
    """`send(i)` for every i below n, `concurrency` publishers at once, each awaiting its own."""

    async def publisher(first: int) -> None:
        for i in range(first, n, concurrency):
            await send(i)

    await asyncio.gather(*(publisher(k) for k in range(concurrency)))


async def _aio_pika_each(ctx: Ctx, profiler: cProfile.Profile | None, *, props: bool) -> Clock:
    bodies = [body(i) for i in range(ctx.n)]
    async with broker.connection(ctx.url, "bench breakdown") as conn:
        channel = await conn.channel(publisher_confirms=True, on_return_raises=props)
        if props:
            exchange = await channel.get_exchange(ctx.task_exchange, ensure=False)
            key = WORKLOAD
        else:
            exchange, key = channel.default_exchange, ctx.raw.publish.name

        async def send(i: int) -> None:
            if props:
                message = aio_pika.Message(bodies[i], **rabbitq_properties(i))
                await exchange.publish(message, routing_key=key, mandatory=True)
            else:  # as the runner's raw publisher does (aio-pika's default is mandatory)
                await exchange.publish(aio_pika.Message(bodies[i], delivery_mode=PERSISTENT), key)

        with Clock(profiler) as clock:
            await _spread(send, ctx.n, ctx.concurrency)
        return clock


async def raw_each(ctx: Ctx, profiler: cProfile.Profile | None) -> Clock:
    return await _aio_pika_each(ctx, profiler, props=False)


async def raw_props_each(ctx: Ctx, profiler: cProfile.Profile | None) -> Clock:
    return await _aio_pika_each(ctx, profiler, props=True)


async def aiormq_props_each(ctx: Ctx, profiler: cProfile.Profile | None) -> Clock:
    return await aiormq_props(ctx, profiler)  # `ctx.concurrency` makes it one at a time


def _app(ctx: Ctx, metrics: bool) -> tuple[rabbitq.App, rabbitq.Task[Any, Any]]:
    app, tasks = build_app()
    app.namespace, app.url = ctx.namespace, ctx.url
    if metrics:  # a registry of its own: the default one would refuse a second Metrics
        app.metrics = Metrics(CollectorRegistry())
    return app, tasks[WORKLOAD]


async def _rabbitq_each(ctx: Ctx, profiler: cProfile.Profile | None, metrics: bool) -> Clock:
    app, task = _app(ctx, metrics)
    payloads = [Job.make(i) for i in range(ctx.n)]

    async def send(i: int) -> None:
        await task.publish(payloads[i])

    async with app:
        with Clock(profiler) as clock:
            await _spread(send, ctx.n, ctx.concurrency)
        return clock


async def rabbitq_each_one(ctx: Ctx, profiler: cProfile.Profile | None) -> Clock:
    return await _rabbitq_each(ctx, profiler, metrics=False)


async def rabbitq_each_metrics(ctx: Ctx, profiler: cProfile.Profile | None) -> Clock:
    return await _rabbitq_each(ctx, profiler, metrics=True)


async def _connect(app: rabbitq.App) -> None:
    await (await app.publisher()).start()


async def rabbitq_sync(ctx: Ctx, profiler: cProfile.Profile | None) -> Clock:
    """`publish_sync` from threads that have no loop: the app publishes on its own thread's."""
    app, task = _app(ctx, metrics=False)
    payloads = [Job.make(i) for i in range(ctx.n)]

    def publisher(first: int) -> None:
        for i in range(first, ctx.n, ctx.concurrency):
            task.publish_sync(payloads[i])

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(app.run_sync, lambda: _connect(app))
    try:
        with ThreadPoolExecutor(ctx.concurrency) as pool, Clock(profiler) as clock:
            await asyncio.gather(
                *(loop.run_in_executor(pool, publisher, k) for k in range(ctx.concurrency))
            )
        return clock
    finally:
        await asyncio.to_thread(app.close_sync)


EACH_VARIANTS: dict[str, Variant] = {
    "raw": raw_each,
    "raw-props": raw_props_each,
    "aiormq-props": aiormq_props_each,
    "rabbitq": rabbitq_each_one,
    "rabbitq+metrics": rabbitq_each_metrics,
    "rabbitq-sync": rabbitq_sync,
}
EACH_DEFAULT = ["raw", "raw-props", "rabbitq", "rabbitq-sync"]

VARIANTS: dict[str, Variant] = {
    "raw": raw,
    "raw-prio": raw_prio,
    "raw-props": raw_props,
    "aiormq-props": aiormq_props,
    "aiormq-nowait": aiormq_nowait,
    "rabbitq-each": rabbitq_each,
    "rabbitq": rabbitq_,
    "rabbitq+metrics": rabbitq_metrics,
}
# With --baseline-publish: rabbitq with the Publisher of another rabbitq/_publish.py.
BASELINE = {"rabbitq@baseline": False, "rabbitq+metrics@baseline": True}  # name -> metrics
DESTINATION = {"raw": "raw"}  # every other variant ends in rabbitq's work queue


async def measure(ctx: Ctx, name: str, profiler: cProfile.Profile | None) -> dict[str, float]:
    queue = ctx.raw.publish.name if DESTINATION.get(name) == "raw" else ctx.work_queue
    for attempt in range(1, ATTEMPTS + 1):
        # Others share the broker: their fault tests close connections or restart it.
        try:
            await broker.purge(ctx.url, [queue])
            if name in BASELINE:
                clock = await _rabbitq(
                    ctx, profiler, metrics=BASELINE[name], publisher=ctx.baseline
                )
            else:
                clock = await (EACH_VARIANTS if ctx.concurrency else VARIANTS)[name](ctx, profiler)
            found = await broker.message_count(ctx.url, queue)
            await broker.purge(ctx.url, [queue])
        except (
            RabbitqError,
            aiormq.exceptions.AMQPError,
            ConnectionError,
            OSError,
            TimeoutError,
        ) as exc:
            print(
                f"  {name}: disturbed (attempt {attempt}): {type(exc).__name__}: "
                f"{str(exc).splitlines()[0]}",
                file=sys.stderr,
            )
            await asyncio.sleep(RETRY_WAIT_SECONDS)
            await broker.wait_until_up(ctx.url, BROKER_DOWN_SECONDS)
            continue
        if found == ctx.n:
            break
        print(f"  {name}: {found} of {ctx.n} arrived (attempt {attempt}); again", file=sys.stderr)
    else:
        raise RuntimeError(f"{name}: the counts never added up")
    out = {
        "per_s": ctx.n / clock.wall,
        "client_us": clock.cpu / ctx.n * 1e6,
        "client_share": clock.cpu / clock.wall,
    }
    if clock.broker_cpu is not None:
        out["broker_us"] = clock.broker_cpu / ctx.n * 1e6
    return out


def show(results: list[dict[str, dict[str, float]]], names: list[str]) -> str:
    base = "raw" if "raw" in names else names[0]
    rows = [
        "| variant | msgs/s | ratio to raw | client CPU us/msg | client CPU share "
        "| broker CPU us/msg |",
        "|---|---|---|---|---|---|",
    ]

    def spread(values: list[float], fmt: str) -> str:
        return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"

    for name in names:
        per_s = [r[name]["per_s"] for r in results]
        ratio = [r[name]["per_s"] / r[base]["per_s"] for r in results]
        client = [r[name]["client_us"] for r in results]
        share = [r[name]["client_share"] for r in results]
        brk = [r[name]["broker_us"] for r in results if "broker_us" in r[name]]
        rows.append(
            f"| {name} | {spread(per_s, ',.0f')} | {spread(ratio, '.2f')}x "
            f"| {spread(client, '.0f')} | {statistics.median(share):.0%} "
            f"| {spread(brk, '.0f') if brk else '-'} |"
        )
    return "\n".join(rows)


def load_publisher(path: Path) -> type[Any]:
    """The Publisher class of another version of rabbitq/_publish.py (say, main's)."""
    spec = importlib.util.spec_from_file_location("publish_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    publisher: type[Any] = module.Publisher
    return publisher


async def main(args: argparse.Namespace) -> None:
    namespace = new_namespace()
    topology = parse_topology({"bench.toml": topology_toml(namespace)})
    baseline = load_publisher(args.baseline_publish) if args.baseline_publish else None
    raw = RawQueues.of(namespace)
    concurrency = MODES[args.mode]
    ctx = Ctx(args.url, namespace, topology, raw, args.n, args.batch, baseline, concurrency)
    default = EACH_DEFAULT if concurrency else [*VARIANTS, *(BASELINE if baseline else ())]
    names = args.only or default
    if baseline is None and set(names) & set(BASELINE):
        raise SystemExit(f"{', '.join(BASELINE)} need --baseline-publish")
    if set(names) - set(EACH_VARIANTS if concurrency else [*VARIANTS, *BASELINE]):
        raise SystemExit(f"--only: not all of {', '.join(names)} are variants of {args.mode}")
    profiler = cProfile.Profile(time.process_time) if args.cprofile else None
    results: list[dict[str, dict[str, float]]] = []
    try:
        await broker.set_up(args.url, topology, ctx.raw.all())
        for rep in range(1, args.reps + 1):
            results.append({})
            for name in names:
                results[-1][name] = figures = await measure(ctx, name, profiler)
                print(
                    f"rep {rep} {name}: " + ", ".join(f"{k} {v:,.2f}" for k, v in figures.items()),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        await asyncio.shield(delete_namespace(args.url, namespace))
    shape = f"batch={args.batch}" if not concurrency else f"publishers={concurrency}"
    print(f"mode={args.mode}, n={args.n}, {shape}, reps={args.reps}, loop={args.loop}", end="")
    print("; medians [min-max]")
    print(show(results, names))
    if profiler is not None:
        profiler.dump_stats(args.cprofile)
        stats = pstats.Stats(profiler, stream=sys.stdout).strip_dirs()
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.publish_breakdown",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default=os.environ.get("RABBITQ_URL", DEFAULT_URL))
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--mode",
        choices=MODES,
        default="batch",
        help="batches, one publish at a time, or 8 publishers at once",
    )
    p.add_argument(
        "--loop",
        choices=LOOPS,
        default="asyncio",
        help="the publishing loop (the runner publishes on asyncio)",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=sorted({*VARIANTS, *BASELINE, *EACH_VARIANTS}),
        help="measure only these variants (repeatable)",
    )
    p.add_argument(
        "--baseline-publish",
        type=Path,
        metavar="FILE",
        help="also measure rabbitq with the Publisher of this rabbitq/_publish.py, "
        "e.g. `git show main:rabbitq/_publish.py > /tmp/main_publish.py`",
    )
    p.add_argument(
        "--cprofile", metavar="PATH", help="profile the timed sections with cProfile; stats to PATH"
    )
    p.add_argument("--top", type=int, default=35, help="functions shown from the profile")
    args = p.parse_args(argv)
    run_loop(lambda: main(args), args.loop)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
