"""The delays benchmark's delays: long ones never come due in a run, short ones climb levels."""

from __future__ import annotations

import pytest

from benchmarks.delays import (
    DAY,
    HOUR,
    QUICK_SHORT_DELAYS,
    SHORT_DELAYS,
    long_delays,
    mean_levels,
    short_delays,
)
from benchmarks.names import DELAYS_WORKLOAD, topology_toml
from rabbitq._ladder import path
from rabbitq._topology import parse_topology


def test_long_delays_are_one_hour_to_one_day_and_the_same_every_time() -> None:
    """Nothing published for the memory and publish runs comes due while a run lasts, and every
    repetition publishes the same delays."""
    delays = long_delays(1000)
    assert all(HOUR <= d <= DAY for d in delays)
    assert delays == long_delays(1000)
    assert len(set(delays)) > 900


@pytest.mark.parametrize("choices", [SHORT_DELAYS, QUICK_SHORT_DELAYS])
def test_each_short_delay_waits_in_two_to_four_levels(choices: tuple[int, ...]) -> None:
    """A short delay has at least two set bits: it passes through more than one level."""
    assert all(2 <= len(path(d)) <= 4 and 3 <= d <= 15 for d in choices)
    assert 2 <= mean_levels(short_delays(500, choices)) <= 4


@pytest.mark.parametrize(
    ("delays", "levels"), [([3.0], 2.0), ([7.0, 8.0], 2.0), ([15.0, 3.0, 5.0, 6.0], 2.5)]
)
def test_mean_levels_counts_the_set_bits(delays: list[float], levels: float) -> None:
    assert mean_levels(delays) == levels


def test_the_run_topology_has_the_delays_workload_and_its_ladder() -> None:
    """The delays workload is in the run's topology, and so are the 28 ladder levels."""
    topology = parse_topology({"bench.toml": topology_toml("bench-t")})
    assert topology.workload(DELAYS_WORKLOAD).capacity == 64
    assert len(topology.ladder_queues()) == 28
