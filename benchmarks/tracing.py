"""What traces cost the consumer (issue #15): the capacity-64 drain, tracing off and on.

On the rabbitq side only, one consumer process per variant (`traced_worker.py`, which runs
`rq_worker.py`, as `rabbitq consume` runs), one after the other in each repetition, on the same
broker, the same event loop and the same pre-published tasks: each carries a W3C `traceparent`,
as a task from a traced publisher does, so every variant decodes the same frames.

- `off`: opentelemetry not importable, as without the `otel` extra: one check a delivery;
- `noop`: the API importable, no provider configured: its no-op spans;
- `on`: an SDK TracerProvider with a BatchSpanProcessor and an exporter that drops the spans
  (span work and the processor's queue, no export I/O);
- `main` (with `--tracing-baseline REF`): `off`, with rabbitq exported from git REF (before
  tracing existed) instead of this checkout: what `off` is compared against.

Figures: tasks/s and CPU us per task of each, and within each repetition noop/off, on/off and
off/main.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

from benchmarks import broker
from benchmarks.names import CAPACITY, drain_workload
from benchmarks.procs import ROOT, Worker
from benchmarks.scenarios import KIB_PER_MIB, _gated, _rate
from benchmarks.systems import Side, _worker_common

VARIANTS = ("off", "noop", "on")
BASELINE = "main"
# any valid parent: the tasks' creation context (sampled, so `on` records every span)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def export_baseline(ref: str, into: Path) -> Path:
    """rabbitq's package as git `ref` has it, under `into`; the directory to import it from.

    Raises:
        ValueError: `ref` is not a commit of this repository.
    """
    try:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", ref, "rabbitq"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except subprocess.CalledProcessError as exc:
        raise ValueError(f"--tracing-baseline {ref!r}: {exc.stderr.decode().strip()}") from None
    target = into / "tracing-baseline"
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


async def drain(side: Side, variant: str, n: int, baseline: Path | None = None) -> dict[str, float]:
    """N traced tasks drained by one consumer process of `variant` (`main`: from `baseline`)."""
    workload = drain_workload(CAPACITY)
    ctx = side.ctx
    args = ["--tracing", "off" if variant == BASELINE else variant]
    if variant == BASELINE:
        assert baseline is not None
        args += ["--rabbitq-from", str(baseline)]
    args += _worker_common("drain", ctx.url, ctx.loop, n, 1.0, ())
    args += ["--workload", workload, "--topology", str(ctx.topology_file)]
    worker = Worker("benchmarks.traced_worker", args, f"rabbitq drain, tracing {variant}")
    target = (ctx.topology.workload(workload).task_exchange, workload)

    async def fill() -> None:
        await broker.fill(ctx.url, target, workload, n, headers={"traceparent": TRACEPARENT})

    [result] = await _gated(side, [worker], workload, n, n, fill=fill)
    _check(variant, result, n, baseline)
    return {
        f"{variant} c{CAPACITY}_tasks_per_s": _rate([result]),
        f"{variant} c{CAPACITY}_cpu_us_per_task": result["cpu_seconds"] / n * 1e6,
        f"{variant} peak_rss_mib": result["vm_hwm_kib"] / KIB_PER_MIB,
    }


def _check(variant: str, result: dict[str, object], n: int, baseline: Path | None) -> None:
    """The process ran what the variant says, or its figure would measure something else."""
    enabled, spans = result["tracing_enabled"], result["spans_exported"]
    where = result["rabbitq_file"]
    assert enabled is (variant in ("noop", "on")), f"{variant}: tracing enabled is {enabled}"
    if variant == "on":
        # one process span per task; the batch processor drops none at this rate
        assert isinstance(spans, int) and spans >= n, f"on: {spans} spans for {n} tasks"
    if variant == BASELINE:
        assert baseline is not None and str(where).startswith(str(baseline)), where
    else:
        assert str(where).startswith(str(ROOT / "rabbitq")), where


def order(rep: int, baseline: bool) -> tuple[str, ...]:
    """The variants of repetition `rep` (from 1), rotated by one each time, so none is always
    first after the set-up, or always last."""
    variants = ((BASELINE,) if baseline else ()) + VARIANTS
    shift = (rep - 1) % len(variants)
    return variants[shift:] + variants[:shift]


def ratios(figures: dict[str, float]) -> dict[str, float]:
    """noop/off, on/off and (if measured) off/main, of the rates of one repetition."""
    rate = f"c{CAPACITY}_tasks_per_s"
    out = {
        f"noop/off {rate}": figures[f"noop {rate}"] / figures[f"off {rate}"],
        f"on/off {rate}": figures[f"on {rate}"] / figures[f"off {rate}"],
    }
    if f"main {rate}" in figures:
        out[f"off/main {rate}"] = figures[f"off {rate}"] / figures[f"main {rate}"]
    return out
