"""The tracing benchmark's order of variants and its ratios (benchmarks/tracing.py)."""

from __future__ import annotations

import pytest

from benchmarks import tracing


@pytest.mark.parametrize(
    ("rep", "baseline", "order"),
    [
        (1, False, ("off", "noop", "on")),
        (2, False, ("noop", "on", "off")),
        (4, False, ("off", "noop", "on")),
        (1, True, ("main", "off", "noop", "on")),
        (2, True, ("off", "noop", "on", "main")),
    ],
)
def test_each_repetition_rotates_the_variants(rep, baseline, order):
    """No variant is always the first after the set-up."""
    assert tracing.order(rep, baseline) == order


def test_the_ratios_are_taken_against_off_and_off_against_main():
    rates = {"main": 100.0, "off": 98.0, "noop": 90.0, "on": 49.0}
    figures = {f"{v} c64_tasks_per_s": r for v, r in rates.items()}
    assert tracing.ratios(figures) == {
        "noop/off c64_tasks_per_s": pytest.approx(90 / 98),
        "on/off c64_tasks_per_s": pytest.approx(0.5),
        "off/main c64_tasks_per_s": pytest.approx(0.98),
    }
    del figures["main c64_tasks_per_s"]
    assert "off/main c64_tasks_per_s" not in tracing.ratios(figures)
