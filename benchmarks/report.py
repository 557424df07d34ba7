"""Figures from every repetition, their medians with min and max, ratios, the table and JSON.

A ratio is always rabbitq's figure over the raw baseline's from the same repetition; its
median, min and max are taken over the repetitions' ratios (not a ratio of medians). A figure
that is itself a percentage (RSS growth) is compared as a difference in percentage points
instead, since a ratio of two numbers near zero says nothing.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

SIDES = ("raw", "rabbitq")
SCENARIOS = ("publish", "drain", "latency", "retry", "memory", "scale")
# Where a smaller number is better; `offered` is an input, and machine and broker CPU (scale)
# are context, not outcomes.
_LOWER_BETTER = ("_ms", "rss", "cpu_us", "growth")
_NEUTRAL = ("offered", "busy", "cores")

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

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in SCENARIOS}
        for rep in self.reps:
            for scenario, metrics in rep.items():
                for metric in metrics:
                    out.setdefault(scenario, {}).setdefault(metric, {})
        for scenario, metrics in out.items():
            for metric in metrics:
                per_side = {
                    side: [
                        r[scenario][metric][side]
                        for r in self.reps
                        if side in r.get(scenario, {}).get(metric, {})
                    ]
                    for side in SIDES
                }
                pairs = [
                    (r[scenario][metric]["rabbitq"], r[scenario][metric]["raw"])
                    for r in self.reps
                    if set(SIDES) <= set(r.get(scenario, {}).get(metric, {}))
                ]
                row: dict[str, Any] = {"better": better(metric)}
                row |= {side: _spread(v) for side, v in per_side.items()}
                if is_percentage(metric):
                    row["difference_pp"] = _spread([rq - raw for rq, raw in pairs])
                else:
                    row["ratio"] = _spread([rq / raw for rq, raw in pairs if raw])
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


def _compare(row: dict[str, Any]) -> str:
    if "difference_pp" in row:
        spread = row["difference_pp"]
        return "-" if spread is None else f"{spread['median']:+.2f} pp (difference)"
    return _cell(row["ratio"], "x")


def table(summary: dict[str, dict[str, dict[str, Any]]], reps: int) -> str:
    """A Markdown table: medians, [min-max] over the repetitions, and the ratio to raw."""
    lines = [
        f"medians of {reps} repetition(s), [min-max]; ratio = rabbitq / raw within a repetition",
        "",
        "| scenario | metric | better | raw aio-pika | rabbitq | rabbitq / raw |",
        "|---|---|---|---|---|---|",
    ]
    for scenario, metrics in summary.items():
        if not metrics:
            lines.append(f"| {scenario} | (skipped) | | | | |")
        for metric, row in metrics.items():
            lines.append(
                f"| {scenario} | {metric} | {row['better']} | {_cell(row['raw'])} | "
                f"{_cell(row['rabbitq'])} | {_compare(row)} |"
            )
    return "\n".join(lines)
