"""The rabbitq consumer process (`rq_worker.py`) in one of the tracing scenario's variants.

    python -m benchmarks.traced_worker --tracing off|noop|on [--rabbitq-from DIR] RQ_WORKER_ARGS

* `off`: opentelemetry cannot be imported (an import hook refuses it), as without the `otel`
  extra; with `--rabbitq-from DIR`, rabbitq is imported from DIR (an export of another
  commit: the code before tracing) instead of this checkout;
* `noop`: opentelemetry-api importable, no provider set: the API's no-op tracer;
* `on`: an SDK TracerProvider with a BatchSpanProcessor, as an app configures one, and an
  exporter that counts the spans and drops them: spans are made, filled, ended and queued,
  and nothing is sent anywhere (an exporter's network I/O is the exporter's cost, not ours).

Its JSON line gets what it ran: the variant, whether rabbitq's tracing was on, the spans
exported, and the file rabbitq was imported from.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

MODES = ("off", "noop", "on")


class NoOpenTelemetry(importlib.abc.MetaPathFinder):
    """Refuses every `opentelemetry` module: the process behaves as if it were not installed."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "opentelemetry" or fullname.startswith("opentelemetry."):
            raise ImportError(f"No module named {fullname!r} (the tracing benchmark's 'off')")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tracing", choices=MODES, required=True)
    parser.add_argument("--rabbitq-from", type=Path)
    ours, rest = parser.parse_known_args()
    if ours.rabbitq_from is not None:
        sys.path.insert(0, str(ours.rabbitq_from))  # ahead of this checkout (the cwd)
    if ours.tracing == "off":
        sys.meta_path.insert(0, NoOpenTelemetry())
    flush, exported = _provider() if ours.tracing == "on" else (None, None)

    import rabbitq  # noqa: F401 - from where the variant says, before the worker imports it
    from benchmarks import rq_worker
    from benchmarks.probe import Probe

    emit = Probe.emit

    def emit_with_variant(result: dict[str, Any]) -> None:
        if flush is not None:
            flush()
        tracing = sys.modules.get("rabbitq._tracing")
        result |= {
            "tracing": ours.tracing,
            "tracing_enabled": bool(getattr(tracing, "ENABLED", False)),
            "spans_exported": exported[0] if exported is not None else 0,
            "rabbitq_file": sys.modules["rabbitq"].__file__,
        }
        emit(result)

    Probe.emit = staticmethod(emit_with_variant)  # type: ignore[method-assign]
    rq_worker.cli(rest)


def _provider() -> tuple[Any, list[int]]:
    """Set an SDK provider whose exporter counts and drops; (its flush, [spans exported])."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    exported = [0]

    class Dropping(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            exported[0] += len(spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    # a queue that holds a whole run: a span the default queue (2,048) drops would not be
    # counted, nor its cost
    provider.add_span_processor(BatchSpanProcessor(Dropping(), max_queue_size=1_000_000))
    trace.set_tracer_provider(provider)
    return provider.force_flush, exported


if __name__ == "__main__":
    main()
