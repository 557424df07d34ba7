"""One measurement of one scenario on one side; each returns its figures as a flat dict.

Consumer measurements follow one pattern: start the consumer process(es) while the tasks are
published (set-up, untimed), wait until every process holds its first deliveries (`ready`),
say go, and take the rate from go to the last ack as each process reports it. Afterwards the
work queue must be empty and the counts must add up, or the measurement is `Disturbed` (and
the runner repeats it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks import broker
from benchmarks.cpu import CpuSampler
from benchmarks.names import CAPACITY, drain_workload
from benchmarks.probe import percentile
from benchmarks.procs import Disturbed, Worker
from benchmarks.systems import Side

KIB_PER_MIB = 1024
# Generous: a consumer below this many tasks a second is broken, not slow.
SLOWEST_RATE = 100.0


def _timeout(count: int) -> float:
    return 30 + count / SLOWEST_RATE


async def _gated(
    side: Side,
    workers: list[Worker],
    workload: str,
    count: int,
    expect_total: int,
    cpu: CpuSampler | None = None,
    fill: Callable[[], Awaitable[None]] | None = None,
) -> list[dict[str, Any]]:
    """Fill (the side's way, or `fill`), start, go; the workers' results once all are done
    (`cpu` samples meanwhile)."""
    await broker.purge(side.ctx.url, side.queues(workload))
    try:
        await asyncio.gather(*(w.start() for w in workers))
        await (fill() if fill is not None else side.fill(workload, count))
        await asyncio.gather(*(w.ready() for w in workers))
        if cpu is not None:
            cpu.start()
        for worker in workers:
            worker.go()
        results = await asyncio.gather(*(w.result(_timeout(count)) for w in workers))
    finally:
        if cpu is not None:
            await cpu.stop()
        for worker in workers:
            await worker.stop()
    handled = sum(r["handled"] for r in results)
    if handled != expect_total:
        raise Disturbed(f"{side.name} {workload}: handled {handled} of {expect_total}")
    left = await broker.message_count(side.ctx.url, side.work_queue(workload))
    if left:
        raise Disturbed(f"{side.name} {workload}: {left} tasks left in the work queue")
    return list(results)


def _rate(results: list[dict[str, Any]]) -> float:
    go = min(r["go_at"] for r in results)
    last = max(r["last_at"] for r in results)
    return float(sum(r["handled"] for r in results) / (last - go))


async def drain(side: Side, capacity: int, n: int, workload: str = "") -> dict[str, float]:
    """N pre-published tasks, one consumer process, a no-op handler (in `workload`'s queue,
    by default the drain workload of `capacity`)."""
    workload = workload or drain_workload(capacity)
    worker = side.worker("drain", workload, capacity, expect=n)
    [result] = await _gated(side, [worker], workload, n, n)
    return {
        "tasks_per_s": _rate([result]),
        "cpu_us_per_task": result["cpu_seconds"] / n * 1e6,
        "peak_rss_mib": result["vm_hwm_kib"] / KIB_PER_MIB,
    }


async def retry(side: Side, n: int) -> dict[str, float]:
    """N tasks that fail once, wait in the 50ms tier, and succeed."""
    worker = side.worker("retry", "retry", CAPACITY, expect=n)
    [result] = await _gated(side, [worker], "retry", n, n)
    return {"tasks_per_s": _rate([result])}


async def tiers(side: Side, n: int, early: int) -> dict[str, float]:
    """N failing-once tasks forwarded into a long tier: RSS after `early` and after all."""
    worker = side.worker("tiers", "tiers", CAPACITY, expect=n, rss_at=(early, n))
    [result] = await _gated(side, [worker], "tiers", n, n)
    samples = result["rss_samples_kib"]
    early_kib, all_kib = samples[str(early)], samples[str(n)]
    return {
        f"rss_at_{early}_mib": early_kib / KIB_PER_MIB,
        f"rss_at_{n}_mib": all_kib / KIB_PER_MIB,
        "rss_growth_pct": (all_kib - early_kib) / early_kib * 100,
        "forwards_per_s": _rate([result]),
    }


async def scale(side: Side, n: int, idle: float) -> dict[str, float]:
    """The same N tasks drained by one consumer process, then by two.

    Neither process knows its share, so each stops once idle for `idle` seconds; the rate
    runs from go to the last ack of either, so the idle tail is not in it.
    """
    out: dict[str, float] = {}
    for processes in (1, 2):
        workers = [
            side.worker(
                "drain",
                "scale",
                CAPACITY,
                expect=0,
                idle=idle,
                label=f"{side.name} scale {i + 1}/{processes}",
            )
            for i in range(processes)
        ]
        cpu = CpuSampler()
        results = await _gated(side, workers, "scale", n, n, cpu)
        out[f"{processes}_process_tasks_per_s"] = _rate(results)
        # from go to the last ack: is the machine the limit?
        window = cpu.window(min(r["go_at"] for r in results), max(r["last_at"] for r in results))
        for key, value in window.items():
            out[f"{processes}_process_{key}"] = value
    out["two_over_one"] = out["2_process_tasks_per_s"] / out["1_process_tasks_per_s"]
    return out


async def latency(side: Side, rate: float, seconds: float) -> dict[str, float]:
    """A consumer running while a paced publisher sends `rate` tasks/s for `seconds`."""
    count = max(1, round(rate * seconds))
    await broker.purge(side.ctx.url, side.queues("latency"))
    worker = side.worker("latency", "latency", CAPACITY, expect=count)
    try:
        await worker.start()
        await worker.ready()
        achieved = await side.publish_paced("latency", rate, count)
        result = await worker.result(_timeout(count))
    finally:
        await worker.stop()
    lat = result["latency_ms"]
    # What the consumer kept up with: below the offered rate, a backlog grew (and latency
    # with it), because publisher, broker and consumer share the machine's cores.
    consumed = float(count / (result["last_at"] - result["first_at"]))
    return {
        "offered_per_s": rate,
        "published_per_s": achieved,
        "consumed_per_s": consumed,
        "p50_ms": lat["p50"],
        "p95_ms": lat["p95"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
    }


async def _publishing(
    side: Side, n: int, publish: Any, key: str, workload: str = "publish"
) -> dict[str, float]:
    """Time `publish()` (n tasks into the side's queue of `workload`) and this process's CPU."""
    queue = side.work_queue(workload)
    await broker.purge(side.ctx.url, [queue])
    cpu = time.process_time()
    seconds = await publish()
    cpu = time.process_time() - cpu
    await _expect_and_purge(side, queue, n)
    return {f"{key}_per_s": n / seconds, f"{key}_cpu_us_per_msg": cpu / n * 1e6}


async def publish_one_at_a_time(side: Side, n: int) -> dict[str, float]:
    """N tasks, each publish waiting for its confirm."""
    return await _publishing(side, n, lambda: side.publish_one_at_a_time(n), "one_at_a_time")


async def publish_concurrent(side: Side, n: int, publishers: int) -> dict[str, float]:
    """N tasks from `publishers` concurrent one-at-a-time publishers."""
    key = f"{publishers}_concurrent"
    return await _publishing(side, n, lambda: side.publish_concurrent(n, publishers), key)


async def publish_batches(
    side: Side, n: int, batch: int, workload: str = "publish"
) -> dict[str, float]:
    """N tasks in batches of `batch`, each batch's confirms pipelined."""
    return await _publishing(
        side, n, lambda: side.publish_batches(n, batch, workload), "batch", workload
    )


async def _expect_and_purge(side: Side, queue: str, n: int) -> None:
    found = await broker.message_count(side.ctx.url, queue)
    await broker.purge(side.ctx.url, [queue])
    if found != n:
        raise Disturbed(f"{side.name} publish: {found} of {n} tasks arrived in {queue}")


async def calls(side: Side, count: int, warmup: int) -> dict[str, float]:
    """`count` calls at once from this process to a consumer process (capacity 64) that
    answers each over direct reply-to; after `warmup` calls at once, untimed."""
    await broker.purge(side.ctx.url, side.queues("calls"))
    worker = side.worker("calls", "calls", CAPACITY, expect=warmup + count)
    try:
        await worker.start()
        await worker.ready()
        latencies, seconds = await side.call_concurrently(count, warmup)
        await worker.result(_timeout(count))
    finally:
        await worker.stop()
    ordered = sorted(latencies)
    return {
        "calls_per_s": count / seconds,
        "p50_ms": percentile(ordered, 50) * 1000,
        "p99_ms": percentile(ordered, 99) * 1000,
    }
