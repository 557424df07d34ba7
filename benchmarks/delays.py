"""Delayed tasks against immediate ones (issue #14): consumer memory, publish rate, broker CPU.

rabbitq holds a delayed task in the namespace's delay ladder, in the broker (`rabbitq._ladder`),
never in a consumer. Three measurements, on the rabbitq side only (the baselines have no delays
to compare), each pairing delayed tasks with immediate ones of the same payload, in the same
repetition:

- **memory**: a consumer process of the `delays` workload (`rq_worker.py`, as `rabbitq consume`
  runs it) is warmed up with a few immediate tasks, then N tasks delayed by 1 hour to 1 day
  (random) are published. Its RSS is read from /proc before and after; the ladder's queues must
  then hold all N. A few more immediate tasks afterwards show the consumer was live throughout.
- **publish**: N immediate, then N delayed (1 hour to 1 day), with `publish_many` in batches;
  then the same one at a time with `await task.publish`. Rates and delayed/immediate ratios.
- **broker CPU**: `beam.smp`'s utime + stime over the whole life of N tasks: published in
  batches and consumed to the end by the consumer process; immediate, then delayed by a random
  3-15 s with at least two bits set (so each passes through 2-4 ladder levels). The broker is
  shared, so its idle rate just before each is reported beside it (not subtracted).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from benchmarks import broker
from benchmarks.cpu import broker_cpu_seconds, broker_pid
from benchmarks.names import CAPACITY, DELAYS_WORKLOAD
from benchmarks.probe import proc_status_kib
from benchmarks.procs import Disturbed, Worker
from benchmarks.scenarios import KIB_PER_MIB, SLOWEST_RATE
from benchmarks.systems import Side
from rabbitq._ladder import path, whole_seconds

HOUR, DAY = 3600, 86400
# A short delay whose binary form has 2 to 4 set bits: it passes 2-4 levels of the ladder.
SHORT_DELAYS = tuple(d for d in range(3, 16) if d.bit_count() >= 2)
QUICK_SHORT_DELAYS = (3,)
WARM_UP = 1000
SEED = 14  # the number: the same delays in every repetition and on both paths
COUNT_WAIT_SECONDS = 30.0
COUNT_POLL_SECONDS = 0.2
IDLE_SECONDS = 2.0


def long_delays(n: int) -> list[float]:
    """N delays of 1 hour to 1 day: nothing comes due while a run lasts."""
    rng = random.Random(SEED)
    return [float(rng.randint(HOUR, DAY)) for _ in range(n)]


def short_delays(n: int, choices: tuple[int, ...]) -> list[float]:
    rng = random.Random(SEED)
    return [float(rng.choice(choices)) for _ in range(n)]


def mean_levels(delays: list[float]) -> float:
    """How many ladder levels a task waits in, on average."""
    return sum(len(path(whole_seconds(d))) for d in delays) / len(delays)


def _timeout(count: int, waiting: float = 0.0) -> float:
    return 30 + waiting + count / SLOWEST_RATE


async def ladder_count(side: Side) -> int:
    """Tasks held in the ladder's queues now (ready ones; nothing consumes them)."""
    names = [q.name for q in side.ctx.topology.ladder_queues()]
    return sum([await broker.message_count(side.ctx.url, name) for name in names])


async def _await_count(side: Side, what: str, count: Any, expected: int) -> None:
    deadline = time.monotonic() + COUNT_WAIT_SECONDS
    while (found := await count()) != expected:
        if time.monotonic() >= deadline:
            raise Disturbed(f"{side.name} delays: {found} of {expected} tasks in {what}")
        await asyncio.sleep(COUNT_POLL_SECONDS)


async def _purge_all(side: Side) -> None:
    ladder = [q.name for q in side.ctx.topology.ladder_queues()]
    await broker.purge(side.ctx.url, side.queues(DELAYS_WORKLOAD) + ladder)


async def memory(side: Side, n: int) -> dict[str, float]:
    """A live consumer's RSS before and after N long-delayed tasks are published."""
    await _purge_all(side)
    warm = min(WARM_UP, n)
    work = side.work_queue(DELAYS_WORKLOAD)
    worker: Worker = side.worker("delays", DELAYS_WORKLOAD, CAPACITY, expect=2 * warm)
    try:
        await worker.start()
        await worker.ready()
        await side.publish_with_delays(DELAYS_WORKLOAD, [None] * warm, batch=warm)
        await _await_count(side, work, lambda: broker.message_count(side.ctx.url, work), 0)
        before = proc_status_kib(worker.pid)["VmRSS"]
        await side.publish_with_delays(DELAYS_WORKLOAD, long_delays(n), batch=1000)
        await _await_count(side, "the ladder", lambda: ladder_count(side), n)
        after = proc_status_kib(worker.pid)["VmRSS"]
        held = await ladder_count(side)
        # the consumer still takes immediate work with N tasks waiting in the ladder
        await side.publish_with_delays(DELAYS_WORKLOAD, [None] * warm, batch=warm)
        result = await worker.result(_timeout(warm))
    finally:
        await worker.stop()
    await _purge_all(side)
    return {
        "consumer_rss_before_mib": before / KIB_PER_MIB,
        "consumer_rss_after_mib": after / KIB_PER_MIB,
        "consumer_rss_growth_mib": (after - before) / KIB_PER_MIB,
        "consumer_rss_growth_pct": (after - before) / before * 100,
        "consumer_peak_rss_mib": result["vm_hwm_kib"] / KIB_PER_MIB,
        "ladder_held": float(held),
        "ladder_held_over_n": held / n,
    }


async def _publish_once(
    side: Side, delays: list[float | None], batch: int | None
) -> tuple[float, float]:
    """Seconds to publish and this process's CPU seconds meanwhile; then the tasks must be
    where they wait (the work queue, or the ladder)."""
    await _purge_all(side)
    cpu = time.process_time()
    seconds: float = await side.publish_with_delays(DELAYS_WORKLOAD, delays, batch)
    cpu = time.process_time() - cpu
    n = len(delays)
    if delays[0] is None:
        work = side.work_queue(DELAYS_WORKLOAD)
        await _await_count(side, work, lambda: broker.message_count(side.ctx.url, work), n)
    else:
        await _await_count(side, "the ladder", lambda: ladder_count(side), n)
    await _purge_all(side)
    return seconds, cpu


KINDS = ("immediate", "delayed")


async def publish(side: Side, n: int, batch: int | None, kind: str) -> dict[str, float]:
    """N tasks of `kind` (immediate, or delayed by 1 hour to 1 day), with `publish_many` in
    batches of `batch`, or one at a time if None. One measurement each, so that a disturbance
    repeats only the one it hit; the runner takes the ratios."""
    how = "one_at_a_time" if batch is None else "batch"
    delays: list[float | None] = [None] * n if kind == "immediate" else list(long_delays(n))
    seconds, cpu = await _publish_once(side, delays, batch)
    return {f"{kind} {how}_per_s": n / seconds, f"{kind} {how}_cpu_us_per_msg": cpu / n * 1e6}


async def _broker_life(side: Side, delays: list[float | None], batch: int) -> dict[str, float]:
    """Broker CPU from the first publish to the last ack of len(delays) tasks."""
    await _purge_all(side)
    n = len(delays)
    pid = broker_pid()
    waiting = max((d or 0.0) for d in delays)
    worker: Worker = side.worker("delays", DELAYS_WORKLOAD, CAPACITY, expect=n)
    try:
        await worker.start()
        await worker.ready()
        idle_from, idle_cpu = time.monotonic(), broker_cpu_seconds(pid)
        await asyncio.sleep(IDLE_SECONDS)
        started, cpu = time.monotonic(), broker_cpu_seconds(pid)
        await side.publish_with_delays(DELAYS_WORKLOAD, delays, batch)
        result = await worker.result(_timeout(n, waiting))
        await _await_count(side, "the ladder", lambda: ladder_count(side), 0)
        ended, used = time.monotonic(), broker_cpu_seconds(pid)
    finally:
        await worker.stop()
    if result["handled"] != n:
        raise Disturbed(f"{side.name} delays: handled {result['handled']} of {n}")
    if None in (idle_cpu, cpu, used):
        raise Disturbed("the broker's CPU cannot be read (not local, or restarted)")
    assert idle_cpu is not None and cpu is not None and used is not None
    return {
        "broker_cpu_us_per_task": (used - cpu) / n * 1e6,
        "seconds": ended - started,
        "broker_idle_cores": (cpu - idle_cpu) / (started - idle_from),
    }


async def broker_cpu(side: Side, n: int, batch: int, quick: bool = False) -> dict[str, float]:
    """Broker CPU per task over its whole life: immediate, then delayed by a few seconds."""
    short: list[float | None] = list(short_delays(n, QUICK_SHORT_DELAYS if quick else SHORT_DELAYS))
    now: list[float | None] = [None] * n
    out: dict[str, float] = {}
    for kind, delays in (("immediate", now), ("delayed", short)):
        for key, value in (await _broker_life(side, delays, batch)).items():
            out[f"{kind} {key}"] = value
    out["delayed mean_levels"] = mean_levels([d for d in short if d is not None])
    out["delayed/immediate broker_cpu_us_per_task"] = (
        out["delayed broker_cpu_us_per_task"] / out["immediate broker_cpu_us_per_task"]
    )
    return out
