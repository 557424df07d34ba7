"""Figures from every repetition, their medians with min and max, ratios, the table and JSON.

A ratio is always rabbitq's figure over a baseline's from the same repetition (the raw
aio-pika floor, the raw publisher sending rabbitq's message, the hand-tuned aiormq loop); its
median, min and max are taken over the repetitions' ratios (not a ratio of medians). A figure
that is itself a percentage (RSS growth) is compared as a difference in percentage points
instead, since a ratio of two numbers near zero says nothing. The peers are shown, not divided.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

OURS = "rabbitq"
BASELINES = ("raw", "raw-task-message", "aiormq")
SCENARIOS = (
    "publish",
    "drain",
    "latency",
    "retry",
    "memory",
    "scale",
    "queue_types",
    "calls",
    "delays",
    "tracing",
)
# Where a smaller number is better; `offered` is an input, and machine and broker CPU (scale)
# are context, not outcomes; so are a delays run's length, ladder levels and ladder count.
_LOWER_BETTER = ("_ms", "rss", "cpu_us", "growth")
_NEUTRAL = ("offered", "busy", "cores", "seconds", "levels", "held")

Figures = dict[str, dict[str, dict[str, float]]]  # scenario -> metric -> side -> value


def better(metric: str) -> str:
    if any(word in metric for word in _NEUTRAL):
        return ""
    return "lower" if any(word in metric for word in _LOWER_BETTER) else "higher"


def is_percentage(metric: str) -> bool:
    return metric.endswith("_pct")


def _spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class Results:
    """Every figure of every repetition, in the order measured."""

    def __init__(self) -> None:
        self.reps: list[Figures] = []

    def new_rep(self) -> None:
        self.reps.append(defaultdict(lambda: defaultdict(dict)))

    def add(self, scenario: str, side: str, figures: dict[str, float], prefix: str = "") -> None:
        for metric, value in figures.items():
            self.reps[-1][scenario][prefix + metric][side] = value

    def sides(self) -> list[str]:
        """Every side that has a figure, in the order first measured."""
        seen: dict[str, None] = {}
        for rep in self.reps:
            for metrics in rep.values():
                for values in metrics.values():
                    seen.update(dict.fromkeys(values))
        return list(seen)

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in SCENARIOS}
        for rep in self.reps:
            for scenario, metrics in rep.items():
                for metric in metrics:
                    out.setdefault(scenario, {}).setdefault(metric, {})
        sides = self.sides()
        for scenario, metrics in out.items():
            for metric in metrics:
                cells = [r.get(scenario, {}).get(metric, {}) for r in self.reps]
                row: dict[str, Any] = {"better": better(metric)}
                row |= {side: _spread([c[side] for c in cells if side in c]) for side in sides}
                for base in BASELINES:
                    pairs = [(c[OURS], c[base]) for c in cells if OURS in c and base in c]
                    if not pairs:
                        continue
                    if is_percentage(metric):
                        row[f"difference_pp/{base}"] = _spread([rq - b for rq, b in pairs])
                    else:
                        row[f"ratio/{base}"] = _spread([rq / b for rq, b in pairs if b])
                metrics[metric] = row
        return out

    def as_json(self) -> list[dict[str, Any]]:
        return [
            {s: {m: dict(v) for m, v in ms.items()} for s, ms in rep.items()} for rep in self.reps
        ]


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(spread: dict[str, float] | None, suffix: str = "") -> str:
    if spread is None:
        return "-"
    if spread["min"] == spread["max"]:
        return f"{_fmt(spread['median'])}{suffix}"
    return f"{_fmt(spread['median'])}{suffix} [{_fmt(spread['min'])}-{_fmt(spread['max'])}]"


def _compare(row: dict[str, Any], base: str) -> str:
    if f"difference_pp/{base}" in row:
        spread = row[f"difference_pp/{base}"]
        return "-" if spread is None else f"{spread['median']:+.2f} pp"
    return _cell(row.get(f"ratio/{base}"), "x")


def table(summary: dict[str, dict[str, dict[str, Any]]], reps: int, titles: dict[str, str]) -> str:
    """A Markdown table: medians, [min-max] over the repetitions, and rabbitq's ratios."""
    sides = list(titles)
    bases = [b for b in BASELINES if b in titles]
    head = [titles[s] for s in sides] + [f"rabbitq / {b}" for b in bases]
    lines = [
        f"medians of {reps} repetition(s), [min-max]; a ratio is rabbitq / that system "
        "within a repetition",
        "",
        "| scenario | metric | better | " + " | ".join(head) + " |",
        "|---|---|---|" + "---|" * len(head),
    ]
    for scenario, metrics in summary.items():
        if not metrics:
            lines.append(f"| {scenario} | (skipped) |" + " |" * (len(head) + 1))
        for metric, row in metrics.items():
            cells = [_cell(row.get(s)) for s in sides] + [_compare(row, b) for b in bases]
            lines.append(f"| {scenario} | {metric} | {row['better']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
