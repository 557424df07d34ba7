"""Profile one consumer process while it drains: where does a task's CPU go?

    python -m benchmarks.profile_drain --side rabbitq --capacity 64 --n 50000

It fills a fresh namespace, starts the consumer process exactly as the runner does, attaches
py-spy (a sampling profiler that reads the process from outside, so the consumer runs
unmodified) once the process is ready, says go, and prints the hot spots from the samples
taken until the last ack: self time by function and by package, and inclusive time of the
consume path's own functions. py-spy is a development tool (`pip install py-spy`), not a
dependency of rabbitq; it needs ptrace rights (root, or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path

import aiormq

from benchmarks import broker
from benchmarks.names import drain_workload, new_namespace, topology_toml
from benchmarks.probe import LOOPS, uvloop_installed
from benchmarks.procs import Disturbed
from benchmarks.run import BROKER_DOWN_SECONDS, DEFAULT_URL, context, delete_namespace
from benchmarks.systems import RunContext, all_sides
from rabbitq._errors import RabbitqError

# A raw py-spy line: "frame;frame;...;leaf count", each frame "function (file:line)".
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")
ATTEMPTS = 5
_PACKAGES = (
    "rabbitq",
    "aio_pika",
    "aiormq",
    "pamqp",
    "pydantic",
    "pydantic_core",
    "asyncio",
    "logging",
    "benchmarks",
    "uvloop",
    "json",
    "typing",
    "enum",
    "yarl",
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_drain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default=os.environ.get("RABBITQ_URL", DEFAULT_URL))
    p.add_argument("--side", default="rabbitq", help="a system of `run --systems` that consumes")
    p.add_argument("--capacity", type=int, choices=(1, 16, 64, 256), default=64)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument(
        "--loop",
        choices=LOOPS,
        default="uvloop" if uvloop_installed() else "asyncio",
        help="the consumer's event loop (default: uvloop, as `run` picks it)",
    )
    p.add_argument(
        "--focus",
        action="append",
        default=[],
        help="also break down where the time under this function goes, by direct "
        "callee (e.g. Consumer._handle); repeatable",
    )
    p.add_argument("--keep", type=Path, help="also write py-spy's raw samples here")
    return p.parse_args()


def _package(file: str) -> str:
    parts = Path(file).parts
    for part in parts:
        name = part.removesuffix(".py")
        if name in _PACKAGES:
            return name
    return "other"


def _frames(stack: str) -> list[str]:
    return [f"{m['func']} ({m['file']})" for f in stack.split(";") if (m := _FRAME.match(f))]


def callees(samples: dict[str, int], focus: str, top: int) -> str:
    """Where the time under `focus` goes, by its direct callee ("(self)" is its own lines)."""
    total = sum(samples.values())
    under: Counter[str] = Counter()
    for stack, count in samples.items():
        frames = _frames(stack)
        hits = [i for i, name in enumerate(frames) if name.startswith(focus + " ")]
        if hits:
            i = hits[0]
            under[frames[i + 1] if i + 1 < len(frames) else "(self)"] += count
    inside = sum(under.values())
    lines = [f"under {focus}: {inside / total * 100:.1f}% of all samples, of which:"]
    lines += [f"  {n / total * 100:5.1f}%  {name}" for name, n in under.most_common(top)]
    return "\n".join(lines)


def hot_spots(samples: dict[str, int], top: int) -> str:
    """Self and inclusive shares of the samples, as text."""
    total = sum(samples.values())
    self_fn: Counter[str] = Counter()
    self_pkg: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, count in samples.items():
        frames = [m.groupdict() for f in stack.split(";") if (m := _FRAME.match(f))]
        if not frames:
            continue
        leaf = frames[-1]
        self_fn[f"{leaf['func']} ({leaf['file']})"] += count
        self_pkg[_package(leaf["file"])] += count
        for name in {f"{f['func']} ({f['file']})" for f in frames}:
            inclusive[name] += count

    def pct(n: int) -> str:
        return f"{n / total * 100:5.1f}%"

    lines = [
        f"{total} samples (the consumer's CPU while it drained; idle waits excluded)",
        "",
        "self time by package (where the leaf frame is):",
    ]
    lines += [f"  {pct(n)}  {name}" for name, n in self_pkg.most_common()]
    lines += ["", f"self time, top {top} functions:"]
    lines += [f"  {pct(n)}  {name}" for name, n in self_fn.most_common(top)]
    lines += ["", "inclusive time of rabbitq's functions (a frame anywhere in the stack):"]
    ours = [(name, n) for name, n in inclusive.most_common() if "rabbitq/" in name]
    lines += [f"  {pct(n)}  {name}" for name, n in ours[:top]]
    lines += ["", f"inclusive time, top {top} functions overall:"]
    lines += [f"  {pct(n)}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def read_samples(path: Path) -> dict[str, int]:
    samples: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples[stack] = samples.get(stack, 0) + int(count)
    return samples


async def profile(args: argparse.Namespace, ctx: RunContext, out: Path) -> dict[str, int]:
    [side] = [s for s in all_sides(ctx) if s.name == args.side and "drain" in s.measures]
    workload = drain_workload(args.capacity)
    worker = side.worker("drain", workload, args.capacity, expect=args.n)
    spy = None
    try:
        await worker.start()
        await side.fill(workload, args.n)
        await worker.ready()
        spy_bin = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
        spy = await asyncio.create_subprocess_exec(
            spy_bin,
            "record",
            "--pid",
            str(worker.pid),
            "--format",
            "raw",
            "--function",
            "--rate",
            str(args.rate),
            "--output",
            str(out),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert spy.stdout is not None
        # py-spy says when it samples; go only then, so the drain is covered from its start.
        while b"Sampling process" not in (line := await spy.stdout.readline()):
            if not line:
                raise SystemExit("py-spy stopped before sampling (is it installed, as root?)")
        worker.go()
        result = await worker.result(30 + args.n / 100)
        await spy.communicate()  # py-spy writes its file once the process it watches exits
    finally:
        await worker.stop()
        if spy is not None and spy.returncode is None:
            spy.terminate()
            await spy.wait()
    rate = result["handled"] / (result["last_at"] - result["go_at"])
    cpu_us = result["cpu_seconds"] / result["handled"] * 1e6
    print(
        f"{args.side} drain, capacity {args.capacity}, n={args.n}: {rate:,.0f} tasks/s, "
        f"{cpu_us:.0f} us CPU per task (with py-spy attached, which slows it somewhat)"
    )
    return read_samples(out)


async def _profile_undisturbed(
    args: argparse.Namespace, ctx: RunContext, out: Path
) -> dict[str, int]:
    """`profile`, again if someone else's fault test cut the broker off meanwhile."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await profile(args, ctx, out)
        except (
            Disturbed,
            RabbitqError,
            aiormq.exceptions.AMQPError,
            ConnectionError,
            OSError,
        ) as exc:
            print(f"disturbed (attempt {attempt}): {type(exc).__name__}: {exc}", file=sys.stderr)
            if attempt == ATTEMPTS:
                raise
            await broker.wait_until_up(ctx.url, BROKER_DOWN_SECONDS)
            await broker.purge(
                ctx.url,
                [
                    ctx.topology.workload(drain_workload(args.capacity)).work_queue,
                    ctx.raw.drain.name,
                ],
            )
    raise AssertionError("unreachable")


async def main(args: argparse.Namespace) -> None:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    namespace = new_namespace()
    with tempfile.TemporaryDirectory(prefix="rabbitq-profile-") as tmp:
        topology_file = Path(tmp) / "bench.toml"
        topology_file.write_text(topology_toml(namespace))
        ctx = context(args.url, namespace, topology_file, args.loop)
        out = Path(tmp) / "samples.txt"
        try:
            await broker.set_up(args.url, ctx.topology, ctx.raw.all())
            samples = await _profile_undisturbed(args, ctx, out)
            if args.keep:
                shutil.copy(out, args.keep)
        finally:
            await asyncio.shield(delete_namespace(args.url, namespace))
    print(hot_spots(samples, args.top))
    for focus in args.focus:
        print()
        print(callees(samples, focus, args.top))


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
