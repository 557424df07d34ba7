"""The benchmark runner: rabbitq against its baselines and peers, interleaved, in one run.

    python -m benchmarks.run --n 20000 --reps 3 --json benchmarks/results.json
    python -m benchmarks.run --quick          # tiny N, one repetition: does it still run?
    python -m benchmarks.run --scenarios queue_types --cluster   # classic vs quorum, 3 nodes
    python -m benchmarks.run --scenarios delays --n 100000       # delayed vs immediate tasks
    python -m benchmarks.run --scenarios tracing --tracing-baseline main   # traces off vs on

For each repetition, each scenario is measured on every system that takes part in it, one after
the other, on the same broker and the same event loop: the raw aio-pika floor, the raw
publisher sending rabbitq's message, the hand-tuned aiormq loop, rabbitq, and FastStream and
Dramatiq where installed (the `bench` extra). The table shows medians with min and max, and
rabbitq's figures as ratios to each baseline of the same repetition. Everything lives in a
fresh namespace that is deleted at the end, also on Ctrl-C or SIGTERM. A measurement disturbed
by something outside it (a broker restart, a forced close) is measured again, up to
`--attempts` times, and noted in the JSON. With `--cluster` the run starts a 3-node cluster of
its own (`benchmarks/cluster.py`), measures on it, and removes it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import aiormq

from benchmarks import broker, delays, machine, scenarios, tracing
from benchmarks import cluster as clusters
from benchmarks.names import (
    CAPACITIES,
    CAPACITY,
    QUEUE_TYPES,
    RawQueues,
    new_namespace,
    queue_type_workload,
    topology_toml,
)
from benchmarks.probe import LOOPS, uvloop_installed
from benchmarks.probe import run as run_loop
from benchmarks.procs import Disturbed
from benchmarks.report import SCENARIOS, Results, table
from benchmarks.systems import TRACING, RunContext, Side, all_sides
from rabbitq._errors import RabbitqError
from rabbitq._topology import parse_topology

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
# Someone else's fault-injection test may stop the broker for a while.
BROKER_DOWN_SECONDS = 120.0
RETRY_WAIT_SECONDS = 2.0
STEADY_RATE = 500.0
NEAR_SATURATION = 0.8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--url",
        default=os.environ.get("RABBITQ_URL", DEFAULT_URL),
        help="the broker (default: $RABBITQ_URL or the local guest account)",
    )
    p.add_argument("--n", type=int, default=20_000, help="tasks per publish/drain/retry/scale run")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    p.add_argument(
        "--capacities",
        default=",".join(map(str, CAPACITIES)),
        help=f"drain capacities to measure, from {CAPACITIES}; {CAPACITY} is "
        "always measured (the 80%% latency rate comes from it)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=1000,
        help="batch publish: messages per publish_many / per gather of confirms",
    )
    p.add_argument(
        "--latency-seconds",
        type=float,
        default=10.0,
        help="how long the paced publisher sends in each latency run",
    )
    p.add_argument(
        "--tier-n",
        type=int,
        default=100_000,
        help="tasks forwarded into the long tier for the memory scenario",
    )
    p.add_argument(
        "--tier-early",
        type=int,
        default=10_000,
        help="the early RSS sample of the memory scenario, in forwarded tasks",
    )
    p.add_argument(
        "--delays-cpu-n",
        type=int,
        default=0,
        help="delays: tasks per broker-CPU run (published, waited for, consumed); default --n",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {','.join(SCENARIOS)} (default: all). latency "
        f"also measures the capacity-{CAPACITY} drain (its 80%% rate comes from "
        "there); a drain also gives its peak RSS (memory)",
    )
    p.add_argument(
        "--tracing-baseline",
        default="",
        metavar="REF",
        help="tracing: also drain with rabbitq as git REF has it (e.g. main, before tracing), "
        "tracing off, to compare `off` with",
    )
    p.add_argument(
        "--skip-memory",
        action="store_true",
        help="skip the long-tier memory runs (peak RSS of the drain is still shown)",
    )
    p.add_argument(
        "--idle",
        type=float,
        default=1.0,
        help="scale: a consumer process is done after this many idle seconds "
        "(never part of a rate)",
    )
    p.add_argument(
        "--loop",
        choices=LOOPS,
        default="uvloop" if uvloop_installed() else "asyncio",
        help="the event loop of every consumer process and of the runner's publishers "
        "(default: uvloop, what `rabbitq consume` runs on, where installed)",
    )
    p.add_argument(
        "--systems",
        default="",
        help="comma-separated system names to measure (default: all that are installed): "
        "raw, raw-task-message, aiormq, rabbitq, faststream, dramatiq",
    )
    p.add_argument(
        "--publishers",
        type=int,
        default=8,
        help="concurrent one-at-a-time publishers in the concurrent publish scenario",
    )
    p.add_argument(
        "--calls",
        type=int,
        default=1000,
        help="calls: how many calls go out at once (after a tenth as many, untimed)",
    )
    p.add_argument(
        "--attempts",
        type=int,
        default=5,
        help="times a disturbed measurement is tried before the run fails",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="start a 3-node cluster for this run (tests/cluster/harness.py; needs root and "
        "ip netns) instead of using --url: the topology is declared through node 0, the "
        "queue_types quorum queues get replicas = 3, and every publisher and consumer "
        "connects to a node that holds none of the queue_types queues",
    )
    p.add_argument("--json", type=Path, help="write every figure and the summary here")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run that only shows the runner works: --n 100 --reps 1 "
        f"--capacities {CAPACITY} --latency-seconds 0.3 --tier-n 200 "
        "--tier-early 50 --idle 0.25 --calls 100 (delays: --delays-cpu-n 100, a 3 s delay)",
    )
    p.add_argument(
        "--delete-namespace",
        metavar="NS",
        help="only delete what an interrupted run left under namespace NS, and exit",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.reps, args.latency_seconds = 100, 1, 0.3
        args.tier_n, args.tier_early, args.idle = 200, 50, 0.25
        args.calls = 100
        args.capacities = str(CAPACITY)
        args.delays_cpu_n = 0
    args.delays_cpu_n = args.delays_cpu_n or args.n
    try:
        chosen = {int(c) for c in args.capacities.split(",") if c.strip()} | {CAPACITY}
    except ValueError:
        p.error("--capacities takes comma-separated numbers")
    if not chosen <= set(CAPACITIES):
        p.error(f"--capacities must be among {CAPACITIES}")
    args.capacities = tuple(sorted(chosen))
    wanted = {name.strip() for name in args.scenarios.split(",") if name.strip()}
    if not wanted or not wanted <= set(SCENARIOS):
        p.error(f"--scenarios takes names from {', '.join(SCENARIOS)}")
    args.scenarios = tuple(name for name in SCENARIOS if name in wanted)
    if not 0 < args.tier_early < args.tier_n:
        p.error("--tier-early must be between 0 and --tier-n")
    return args


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


Measure = Callable[[Side], Awaitable[dict[str, float]]]


class Runner:
    """The repetitions of one run, each scenario measured on every system in turn."""

    def __init__(self, args: argparse.Namespace, ctx: RunContext, sides: list[Side]) -> None:
        self.args = args
        self.ctx = ctx
        self.sides = sides
        self.results = Results()
        self.disturbed: list[str] = []
        self.drain_rate: dict[str, float] = {}  # capacity 64, this repetition, by side
        self.baseline: Path | None = None  # tracing: rabbitq exported from --tracing-baseline

    async def measure(self, what: str, side: Side, make: Measure) -> dict[str, float]:
        """One measurement, repeated if something outside it disturbed it."""
        for attempt in range(1, self.args.attempts + 1):
            started = time.monotonic()
            try:
                figures = await make(side)
            except (
                Disturbed,
                RabbitqError,
                aiormq.exceptions.AMQPError,
                ConnectionError,
                OSError,
                TimeoutError,
            ) as exc:
                note = f"{what} ({side.name}), attempt {attempt}: {type(exc).__name__}: {exc}"
                self.disturbed.append(note)
                say(f"  disturbed: {note}")
                if attempt == self.args.attempts:
                    raise
                await asyncio.sleep(RETRY_WAIT_SECONDS)
                await broker.wait_until_up(self.ctx.url, BROKER_DOWN_SECONDS)
                continue
            shown = ", ".join(f"{k} {v:,.2f}" for k, v in figures.items())
            say(f"  {what} ({side.name}) in {time.monotonic() - started:.1f}s: {shown}")
            return figures
        raise AssertionError("unreachable")

    async def each(self, what: str, key: str, make: Measure) -> dict[str, dict[str, float]]:
        """Every system that takes part in `key`, in turn: the interleaving that keeps them
        under the same conditions."""
        return {
            side.name: await self.measure(what, side, make)
            for side in self.sides
            if key in side.measures
        }

    def record(self, scenario: str, figures: dict[str, dict[str, float]], prefix: str = "") -> None:
        for side_name, values in figures.items():
            self.results.add(scenario, side_name, values, prefix)

    async def repetition(self) -> None:
        a = self.args
        wants = a.scenarios
        self.results.new_rep()
        if "publish" in wants:
            self.record(
                "publish",
                await self.each(
                    "publish one at a time",
                    "publish_one",
                    partial(scenarios.publish_one_at_a_time, n=a.n),
                ),
            )
            self.record(
                "publish",
                await self.each(
                    f"publish from {a.publishers} concurrent publishers",
                    "publish_concurrent",
                    partial(scenarios.publish_concurrent, n=a.n, publishers=a.publishers),
                ),
            )
            self.record(
                "publish",
                await self.each(
                    f"publish in batches of {a.batch}",
                    "publish_batch",
                    partial(scenarios.publish_batches, n=a.n, batch=a.batch),
                ),
            )
        if "drain" in wants:
            await self.drains(a.capacities)
        elif "latency" in wants:
            await self.drains((CAPACITY,))
        if "latency" in wants:
            await self.latencies()
        if "retry" in wants:
            self.record(
                "retry",
                await self.each(
                    "retry path (fail once, 50ms tier)", "retry", partial(scenarios.retry, n=a.n)
                ),
            )
        if "memory" in wants and not a.skip_memory:
            self.record(
                "memory",
                await self.each(
                    f"{a.tier_n:,} tasks into a long tier",
                    "tiers",
                    partial(scenarios.tiers, n=a.tier_n, early=a.tier_early),
                ),
                "tiers ",
            )
        if "scale" in wants:
            self.record(
                "scale",
                await self.each(
                    "scale: 1 then 2 consumer processes",
                    "scale",
                    partial(scenarios.scale, n=a.n, idle=a.idle),
                ),
            )
        if "queue_types" in wants:
            await self.queue_types()
        if "calls" in wants:
            self.record(
                "calls",
                await self.each(
                    f"{a.calls} concurrent calls",
                    "calls",
                    partial(scenarios.calls, count=a.calls, warmup=max(1, a.calls // 10)),
                ),
            )
        if "delays" in wants:
            await self.delays()
        if "tracing" in wants:
            await self.tracing()

    async def drains(self, capacities: tuple[int, ...]) -> None:
        a = self.args
        for capacity in capacities:
            figures = await self.each(
                f"drain capacity {capacity}",
                "drain",
                partial(scenarios.drain, capacity=capacity, n=a.n),
            )
            for name, fig in figures.items():
                self.results.add(
                    "drain",
                    name,
                    {
                        f"c{capacity}_tasks_per_s": fig["tasks_per_s"],
                        f"c{capacity}_cpu_us_per_task": fig["cpu_us_per_task"],
                    },
                )
                self.results.add(
                    "memory", name, {f"drain_c{capacity}_peak_rss_mib": fig["peak_rss_mib"]}
                )
                if capacity == CAPACITY:
                    self.drain_rate[name] = fig["tasks_per_s"]

    async def queue_types(self) -> None:
        """Batch publish, then the capacity-64 drain, into rabbitq's classic work queue and
        its quorum one; raw aio-pika on the same queue just before rabbitq each time."""
        a = self.args
        scenario = "queue_types"
        by_type: dict[str, dict[str, dict[str, float]]] = {}
        for qtype in QUEUE_TYPES:
            workload = queue_type_workload(qtype)
            by_type[qtype] = await self.each(
                f"{qtype}: publish in batches of {a.batch}",
                scenario,
                partial(scenarios.publish_batches, n=a.n, batch=a.batch, workload=workload),
            )
        for qtype in QUEUE_TYPES:
            drained = await self.each(
                f"{qtype}: drain capacity {CAPACITY}",
                scenario,
                partial(
                    scenarios.drain, capacity=CAPACITY, n=a.n, workload=queue_type_workload(qtype)
                ),
            )
            for name, fig in drained.items():
                by_type[qtype].setdefault(name, {}).update(
                    {
                        f"c{CAPACITY}_tasks_per_s": fig["tasks_per_s"],
                        f"c{CAPACITY}_cpu_us_per_task": fig["cpu_us_per_task"],
                    }
                )
        for qtype, figures in by_type.items():
            self.record(scenario, figures, f"{qtype} ")
        classic, quorum = by_type["classic"], by_type["quorum"]
        for name in classic.keys() & quorum.keys():
            self.results.add(
                scenario,
                name,
                {
                    key: quorum[name][key] / classic[name][key]
                    for key in ("batch_per_s", f"c{CAPACITY}_tasks_per_s")
                },
                "quorum/classic ",
            )

    async def delays(self) -> None:
        """Issue #14: delayed tasks against immediate ones, on rabbitq alone
        (`benchmarks/delays.py`): consumer memory, publish rates, broker CPU per task."""
        a = self.args
        key = "delays"
        self.record(
            key,
            await self.each(
                f"a live consumer while {a.n:,} tasks are delayed by 1h-1d",
                key,
                partial(delays.memory, n=a.n),
            ),
            "memory ",
        )
        for how, batch in (("batch", a.batch), ("one_at_a_time", None)):
            rates: dict[str, dict[str, float]] = {}
            for kind in delays.KINDS:
                figures = await self.each(
                    f"publish {a.n:,} {kind} tasks, {how.replace('_', ' ')}",
                    key,
                    partial(delays.publish, n=a.n, batch=batch, kind=kind),
                )
                self.record(key, figures, "publish ")
                for name, values in figures.items():
                    rates.setdefault(name, {})[kind] = values[f"{kind} {how}_per_s"]
            for name, by_kind in rates.items():
                ratio = by_kind["delayed"] / by_kind["immediate"]
                self.results.add(key, name, {f"delayed/immediate {how}_per_s": ratio}, "publish ")
        self.record(
            key,
            await self.each(
                f"broker CPU over the life of {a.delays_cpu_n:,} immediate, then delayed tasks",
                key,
                partial(delays.broker_cpu, n=a.delays_cpu_n, batch=a.batch, quick=a.quick),
            ),
            "broker ",
        )

    async def tracing(self) -> None:
        """Issue #15: the capacity-64 drain with tracing off, on the no-op API and on an SDK
        (`benchmarks/tracing.py`), on rabbitq alone; with `--tracing-baseline`, also the code
        before tracing."""
        a = self.args
        key = TRACING
        if a.tracing_baseline and self.baseline is None:
            self.baseline = tracing.export_baseline(
                a.tracing_baseline, self.ctx.topology_file.parent
            )
        figures: dict[str, dict[str, float]] = {}
        for variant in tracing.order(len(self.results.reps), self.baseline is not None):
            measured = await self.each(
                f"drain capacity {CAPACITY}, tracing {variant}",
                key,
                partial(tracing.drain, variant=variant, n=a.n, baseline=self.baseline),
            )
            for name, values in measured.items():
                figures.setdefault(name, {}).update(values)
        for name, values in figures.items():
            self.results.add(key, name, values | tracing.ratios(values))

    async def latencies(self) -> None:
        a = self.args
        steady = await self.each(
            f"latency at {STEADY_RATE:.0f}/s",
            "latency",
            partial(scenarios.latency, rate=STEADY_RATE, seconds=a.latency_seconds),
        )
        for values in steady.values():
            values.pop("offered_per_s")  # the setting itself, the same for both
        self.record("latency", steady, "500/s ")
        # Near saturation, each side at 80% of its own capacity-64 drain rate of this rep.
        for side in self.sides:
            if side.name not in self.drain_rate or "latency" not in side.measures:
                continue
            rate = NEAR_SATURATION * self.drain_rate[side.name]
            near = await self.measure(
                f"latency at 80% of drain ({rate:,.0f}/s)",
                side,
                partial(scenarios.latency, rate=rate, seconds=a.latency_seconds),
            )
            self.results.add("latency", side.name, near, "80% of drain ")

    async def run(self) -> None:
        for rep in range(1, self.args.reps + 1):
            say(f"repetition {rep} of {self.args.reps}")
            await self.repetition()


def context(
    url: str, namespace: str, topology_file: Path, loop: str, replicas: int | None = None
) -> RunContext:
    topology = parse_topology({"bench.toml": topology_toml(namespace, replicas)})
    return RunContext(url, namespace, topology, topology_file, RawQueues.of(namespace), loop)


def chosen_sides(ctx: RunContext, systems: str) -> list[Side]:
    """The sides `--systems` names (all installed ones if empty).

    Raises:
        ValueError: a name that is not known or not installed.
    """
    sides = all_sides(ctx)
    if not systems:
        return sides
    wanted = {name.strip() for name in systems.split(",")}
    if unknown := wanted - {side.name for side in sides}:
        raise ValueError(f"--systems: {', '.join(sorted(unknown))} not known or not installed")
    return [side for side in sides if side.name in wanted]


def on_cluster(cluster: clusters.Cluster, ctx: RunContext) -> tuple[RunContext, str]:
    """The run's context moved to the client node, once the topology is declared; and where
    the measured queues live, in words."""
    work_queues = [ctx.topology.workload(queue_type_workload(t)).work_queue for t in QUEUE_TYPES]
    where = clusters.placement(cluster, work_queues)
    # From here on everyone uses the client node, the runner's own set-up calls too.
    moved = replace(ctx, url=cluster.urls[where.client_node])
    return moved, f"{cluster.size}-node cluster, replicas {clusters.REPLICAS}: {where.describe()}"


@contextmanager
def own_cluster(wanted: bool) -> Iterator[clusters.Cluster | None]:
    """A 3-node cluster for this run if `wanted` (None otherwise), removed on the way out."""
    if not wanted:
        yield None
        return
    say(f"starting a {clusters.SIZE}-node cluster (about 30 s)")
    started = clusters.start()
    run_id = started.run_id
    say(f"cluster {run_id} up in {started.timings['up']:.1f}s")
    try:
        yield started
    finally:
        # Blocking on purpose: nothing else runs by now, and a second cancel cannot cut it short.
        started.down()
        say(f"cluster {run_id} removed in {started.timings['down']:.1f}s")


async def delete_namespace(url: str, namespace: str, sides: list[Side] | None = None) -> None:
    """Delete every queue and exchange a run makes under `namespace` (they are all derived)."""
    ctx = context(url, namespace, Path(), "asyncio")
    queues = [q.name for q in ctx.topology.queues()] + [q.name for q in ctx.raw.all()]
    exchanges = [e.name for e in ctx.topology.exchanges()]
    try:
        if not await broker.wait_until_up(url, BROKER_DOWN_SECONDS):
            raise ConnectionError("the broker did not come back")
        left = await broker.delete_everything(url, queues, exchanges)
        for side in sides if sides is not None else all_sides(ctx):
            await side.tear_down()
    except (aiormq.exceptions.AMQPError, ConnectionError, OSError, TimeoutError) as exc:
        say(
            f"could not delete namespace {namespace} ({exc}); once the broker is back, run:\n"
            f"  python -m benchmarks.run --delete-namespace {namespace}"
        )
        return
    say(
        f"deleted namespace {namespace} ({len(queues)} queues, {len(exchanges)} exchanges)"
        + (f"; could not delete: {left}" if left else "")
    )


async def main(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    if args.delete_namespace:
        await delete_namespace(args.url, args.delete_namespace)
        return 0
    if args.cluster and (reason := clusters.unavailable()):
        say(f"error: --cluster: {reason}")
        return 2
    namespace = new_namespace()
    replicas = clusters.REPLICAS if args.cluster else None
    with (
        own_cluster(args.cluster) as cluster,
        tempfile.TemporaryDirectory(prefix="rabbitq-bench-") as tmp,
    ):
        topology_file = Path(tmp) / "bench.toml"
        topology_file.write_text(topology_toml(namespace, replicas))
        url = args.url if cluster is None else cluster.urls[clusters.DECLARE_NODE]
        ctx = context(url, namespace, topology_file, args.loop, replicas)
        try:
            sides = chosen_sides(ctx, args.systems)
        except ValueError as exc:
            say(f"error: {exc}")
            return 2
        titles = {side.name: side.title for side in sides}
        started = time.monotonic()
        try:
            await broker.set_up(ctx.url, ctx.topology, ctx.raw.all())
            where = "single node"
            if cluster is not None:
                ctx, where = on_cluster(cluster, ctx)
                sides = chosen_sides(ctx, args.systems)
            info = machine.describe(await broker.server_version(ctx.url), args.loop, titles)
            info["broker"] = where
            say(machine.header(info))
            say(
                f"namespace {namespace}: n={args.n}, reps={args.reps}, batch={args.batch}, "
                f"latency {args.latency_seconds:g}s, tier-n={args.tier_n}"
            )
            runner = Runner(args, ctx, sides)
            for side in sides:
                await side.set_up()
            await runner.run()
        finally:
            await asyncio.shield(delete_namespace(ctx.url, namespace, sides))
    summary = runner.results.summary()
    print(machine.header(info))
    measured = set(runner.results.sides())
    # only the systems that took part in the scenarios asked for
    print(table(summary, args.reps, {k: v for k, v in titles.items() if k in measured}))
    if runner.disturbed:
        print(f"\n{len(runner.disturbed)} measurement(s) were disturbed and repeated:")
        for note in runner.disturbed:
            print(f"- {note.splitlines()[0]}")
    if args.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        if args.cluster:
            config["url"] = "the run's own cluster"  # its URLs hold its password
        config["namespace"] = namespace
        config["seconds"] = round(time.monotonic() - started, 1)
        document: dict[str, Any] = {
            "machine": info,
            "config": config,
            "summary": summary,
            "reps": runner.results.as_json(),
            "disturbed": runner.disturbed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, allow_nan=False, default=str) + "\n")
    return 0


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # The runner publishes for every system on the loop their consumers run on.
        return int(run_loop(lambda: main(args), args.loop))
    except KeyboardInterrupt:
        say("interrupted; the run's queues and exchanges were deleted")
        return 130
    except asyncio.CancelledError:
        say("stopped; the run's queues and exchanges were deleted")
        return 143


if __name__ == "__main__":
    sys.exit(cli())
