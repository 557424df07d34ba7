"""The delay ladder's pure parts: rounding, routes, paths, and its bindings walked as the broker
routes a topic key."""

from __future__ import annotations

import random
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from rabbitq import App, ConfigError
from rabbitq import _ladder as ladder
from rabbitq._app import Task
from rabbitq._topology import Binding, Topology, parse_topology
from rabbitq._wire import HEADER_RUN_AT


@pytest.mark.parametrize(
    ("wanted", "whole"),
    [
        (0.0, 0),
        (0.49, 0),  # under half a second: no delay
        (0.5, 1),
        (1.0, 1),
        (1.49, 1),
        (7.6, 8),
        (3780.0, 3780),
        (float(ladder.MAX_DELAY_SECONDS), ladder.MAX_DELAY_SECONDS),
    ],
)
def test_delays_round_to_the_nearest_second(wanted: float, whole: int) -> None:
    assert ladder.whole_seconds(wanted) == whole


@pytest.mark.parametrize("wanted", [-1.0, ladder.MAX_DELAY_SECONDS + 1.0, 1e12])
def test_a_negative_or_too_long_delay_is_refused(wanted: float) -> None:
    with pytest.raises(ValueError, match="negative|past the ladder's longest"):
        ladder.whole_seconds(wanted)


@pytest.mark.parametrize(
    ("delay", "levels"),
    [
        (1, [0]),
        (2, [1]),
        (3, [1, 0]),
        (13, [3, 2, 0]),
        (65, [6, 0]),
        (3780, [11, 10, 9, 7, 6, 2]),  # 1 h 3 min
        (2**27, [27]),
        (ladder.MAX_DELAY_SECONDS, list(reversed(range(28)))),
    ],
)
def test_a_task_waits_in_the_levels_of_its_set_bits(delay: int, levels: list[int]) -> None:
    assert ladder.path(delay) == levels
    assert sum(ladder.level_seconds(i) for i in levels) == delay
    route = ladder.route("ns", "emails", delay)
    assert route.exchange == ladder.level_name("ns", levels[0])  # enters at its highest bit


def test_the_routing_key_stays_far_under_amqps_255_bytes() -> None:
    longest = ladder.route("ns", "w" * 63, ladder.MAX_DELAY_SECONDS).routing_key
    assert len(longest.encode()) == 28 * 2 + 63 < 255
    assert longest.startswith("1." * 28)


@pytest.mark.parametrize(("seconds", "text"), [(1, "1s"), (1024, "17m4s"), (2**27, "4y93d")])
def test_durations_read_in_two_units(seconds: int, text: str) -> None:
    assert ladder.format_seconds(seconds) == text


# The ladder's bindings, routed as RabbitMQ's topic exchange does -------------------------------


def _topic_match(pattern: str, key: str) -> bool:
    """AMQP topic matching: `*` is one word, `#` zero or more."""
    regex = re.escape(pattern).replace(r"\*", r"[^.]+").replace(r"\#", r".*")
    regex = regex.replace(r"\..*", r"(\..*)?").replace(r".*\.", r"(.*\.)?")
    return re.fullmatch(regex, key) is not None


def _route(bindings: list[Binding], exchange: str, key: str) -> list[str]:
    """The queues a key published to `exchange` reaches, through exchange-to-exchange
    bindings."""
    queues: list[str] = []
    for b in bindings:
        if b.exchange == exchange and _topic_match(b.routing_key, key):
            if b.destination_type == "exchange":
                queues += _route(bindings, b.queue, key)
            else:
                queues.append(b.queue)
    return queues


def _walk(topology: Topology, delay: int, workload: str) -> tuple[list[str], int]:
    """Where a delayed task goes, level by level as each one's TTL expires: the queues it
    waits in, the work queue it ends in, and the TTLs it waited in all."""
    levels = topology.ladder_queues()
    ttl: dict[str, int] = {q.name: int(q.arguments["x-message-ttl"]) for q in levels}
    dlx: dict[str, str] = {q.name: str(q.arguments["x-dead-letter-exchange"]) for q in levels}
    route = ladder.route(topology.namespace, workload, delay)
    bindings = topology.bindings()
    visited: list[str] = []
    waited = 0
    reached = _route(bindings, route.exchange, route.routing_key)
    while True:
        assert len(reached) == 1, reached  # never copied, never dropped
        (queue,) = reached
        visited.append(queue)
        if queue not in ttl:
            return visited, waited
        waited += ttl[queue]
        reached = _route(bindings, dlx[queue], route.routing_key)  # expired: dead-lettered


def test_every_delay_walks_its_levels_to_its_own_work_queue() -> None:
    """For the edges and a thousand random delays: one queue per set bit, highest first, then
    the workload's work queue and no other's, having waited exactly the delay."""
    topology = parse_topology(
        {"t.toml": "[workloads.emails]\n[workloads.emails-eu]\n[workloads.sms]\n"}, "shop.eu"
    )
    rng = random.Random(14)
    delays = [1, 2, 3, 255, 256, 3780, 2**27, ladder.MAX_DELAY_SECONDS]
    delays += [rng.randint(1, ladder.MAX_DELAY_SECONDS) for _ in range(1000)]
    for delay in delays:
        for workload in ("emails", "emails-eu", "sms"):
            visited, waited = _walk(topology, delay, workload)
            levels = [ladder.level_name("shop.eu", i) for i in ladder.path(delay)]
            assert visited == [*levels, f"shop.eu.{workload}.work"]
            assert waited == delay * 1000


def test_the_topic_matcher_of_these_tests_matches_as_rabbitmq_does() -> None:
    assert _topic_match("#.emails", "0.1.emails")
    assert not _topic_match("#.emails", "0.1.emails-eu")
    assert _topic_match("*.1.#", "0.1.emails")
    assert not _topic_match("*.1.#", "1.0.emails")
    assert _topic_match("1.#", "1")


def test_ladder_levels_are_quorum_with_at_least_once_dead_lettering_one_level_down() -> None:
    topology = parse_topology({"t.toml": "[workloads.a]\nreplicas = 3\n[workloads.b]\n"}, "ns")
    levels = topology.ladder_queues()
    assert [q.name for q in levels] == [f"ns.delay.{i:02d}" for i in range(28)]
    assert levels[0].arguments == {
        "x-queue-type": "quorum",
        "x-message-ttl": 1000,
        "x-dead-letter-exchange": "ns.delay.due",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-quorum-initial-group-size": 3,  # the most any workload asks for
    }
    assert levels[27].arguments["x-message-ttl"] == 2**27 * 1000
    assert levels[27].arguments["x-dead-letter-exchange"] == "ns.delay.26"


def test_delays_false_leaves_the_ladder_out() -> None:
    topology = parse_topology({"t.toml": "delays = false\n[workloads.a]\n"}, "ns")
    assert topology.ladder_queues() == []
    assert not [x for x in topology.exchanges() if ".delay." in x.name]
    assert topology.to_dict()["delays"] is None


# Publishing: where a delayed message goes, and what is refused ---------------------------------


class Item(BaseModel):
    n: int


def _task() -> Task[Item, None]:
    app = App(namespace="ns")

    @app.task("t.run", workload="jobs")
    async def run(item: Item) -> None:
        pass

    return run


def test_a_delayed_message_enters_the_ladder_and_says_when_it_runs() -> None:
    before = time.time()
    out = _task().message(Item(n=1), delay=timedelta(seconds=13))
    assert (out.exchange, out.routing_key) == ("ns.delay.03", f"{ladder.digits(13)}.jobs")
    assert out.check_queue == "ns.jobs.work"
    assert abs(out.headers[HEADER_RUN_AT] / 1000 - (before + 13)) < 1


@pytest.mark.parametrize("options", [{"delay": 0.2}, {"at": datetime(2000, 1, 1, tzinfo=UTC)}])
def test_no_delay_or_a_time_past_publishes_to_run_now(options: dict[str, Any]) -> None:
    out = _task().message(Item(n=1), **options)
    assert (out.exchange, out.routing_key, out.check_queue) == ("ns.tasks", "jobs", None)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"delay": -1}, "negative"),
        ({"delay": 1, "at": datetime.now(UTC)}, "not both"),
        ({"at": datetime(2030, 1, 1)}, "no time zone"),
        ({"delay": timedelta(days=365 * 9)}, "past the ladder's longest"),
        ({"delay": 60, "deadline": timedelta(seconds=30)}, "deadline is 30s before"),
    ],
)
def test_bad_delays_are_refused_before_anything_is_sent(
    options: dict[str, Any], error: str
) -> None:
    with pytest.raises(ConfigError, match=error):
        _task().message(Item(n=1), **options)
