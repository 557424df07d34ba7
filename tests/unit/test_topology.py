"""Topology files: durations, derived names, x-arguments, bindings, and validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rabbitq._errors import TopologyInvalid
from rabbitq._topology import (
    DEFAULT_NAMESPACE,
    PARKING_DELIVERY_LIMIT,
    QUORUM_DELIVERY_LIMIT,
    Topology,
    Workload,
    format_duration,
    load_topology,
    parse_duration,
    parse_file,
    parse_topology,
    task_exchange,
)

EMAILS = """
namespace = "shop"

[workloads.emails]
queue_type = "classic"
capacity = 8

[workloads.emails.retry]
tiers = ["200ms", "1s", "5m"]
max_attempts = 4
"""


def _topology(text: str, namespace: str | None = None) -> Topology:
    return parse_topology({"shop.toml": text}, namespace)


def _emails(extra: str = "", tiers: str = '["200ms", "1s", "5m"]') -> Workload:
    text = (
        f'namespace = "shop"\n[workloads.emails]\n{extra}\n'
        f"[workloads.emails.retry]\ntiers = {tiers}\n"
    )
    return _topology(text).workload("emails")


# Durations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("50ms", 0.05),
        ("200ms", 0.2),
        ("1s", 1.0),
        ("1.5s", 1.5),
        ("0.25s", 0.25),
        ("10m", 600.0),
        ("0.5m", 30.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("2h", 7200.0),
        (" 10 s ", 10.0),  # blanks around and between are allowed
        (5, 5.0),  # a bare number is seconds
        (0.05, 0.05),
    ],
)
def test_parse_duration_reads_seconds_from_a_unit_string_or_number(
    text: str | float, seconds: float
) -> None:
    """parse_duration turns "50ms"/"1s"/"10m"/"1h" (or a bare number) into seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "soon", "s", "10 sec", "1w", "1e3s", "-1s", "1s2", "0s", "0ms", 0, -1, -0.5, True, False],
)
def test_parse_duration_rejects_what_is_not_a_positive_duration(text: str | float) -> None:
    """parse_duration raises ValueError for garbage, unknown units, zero, negatives and bools."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "label"),
    [
        (0.001, "1ms"),
        (0.05, "50ms"),
        (0.2, "200ms"),
        (1.0, "1s"),
        (1.5, "1500ms"),
        (10.0, "10s"),
        (60.0, "1m"),
        (90.0, "90s"),
        (600.0, "10m"),
        (3600.0, "1h"),
        (5400.0, "90m"),
        (86400.0, "24h"),
    ],
)
def test_format_duration_gives_the_shortest_exact_label(seconds: float, label: str) -> None:
    """format_duration picks the largest unit that divides the delay exactly."""
    assert format_duration(seconds) == label


@pytest.mark.parametrize("seconds", [0.05, 0.2, 1.0, 1.5, 90.0, 600.0, 3600.0])
def test_format_duration_round_trips_through_parse_duration(seconds: float) -> None:
    """A label parses back to the same delay."""
    assert parse_duration(format_duration(seconds)) == seconds


# Names ----------------------------------------------------------------------------------------


def test_names_are_derived_from_namespace_and_workload() -> None:
    """Exchanges are NS.tasks/retry/parking; queues NS.W.work, NS.W.retry.<label>, NS.W.parking."""
    w = _topology(EMAILS).workload("emails")
    assert (w.namespace, w.name) == ("shop", "emails")
    assert w.task_exchange == "shop.tasks"
    assert w.retry_exchange == "shop.retry"
    assert w.parking_exchange == "shop.parking"
    assert w.routing_key == "emails"
    assert w.work_queue == "shop.emails.work"
    assert w.parking_queue == "shop.emails.parking"
    assert [(t.index, t.delay_seconds, t.label) for t in w.tiers] == [
        (0, 0.2, "200ms"),
        (1, 1.0, "1s"),
        (2, 300.0, "5m"),
    ]
    assert [t.queue for t in w.tiers] == [
        "shop.emails.retry.200ms",
        "shop.emails.retry.1s",
        "shop.emails.retry.5m",
    ]
    assert [t.routing_key for t in w.tiers] == ["emails.200ms", "emails.1s", "emails.5m"]


def test_namespace_helpers_match_the_derived_exchanges() -> None:
    """task_exchange gives the same name as a derived workload, and the namespace's exchanges."""
    topology = _topology(EMAILS)
    w = topology.workload("emails")
    assert task_exchange("shop") == w.task_exchange
    assert [e.name for e in topology.exchanges()][:3] == [
        w.task_exchange,
        w.retry_exchange,
        w.parking_exchange,
    ]


def test_topology_declares_three_durable_direct_exchanges() -> None:
    """A namespace with workloads has the tasks, retry and parking exchanges, durable and direct
    (then its delay ladder's)."""
    assert [(e.name, e.type, e.durable) for e in _topology(EMAILS).exchanges()][:3] == [
        ("shop.tasks", "direct", True),
        ("shop.retry", "direct", True),
        ("shop.parking", "direct", True),
    ]


def test_topology_without_workloads_declares_nothing() -> None:
    """A file with only a namespace derives no exchanges, queues or bindings."""
    topo = _topology('namespace = "shop"\n')
    assert (topo.exchanges(), topo.queues(), topo.bindings()) == ([], [], [])


def test_unknown_workload_lookup_names_the_declared_ones() -> None:
    """Topology.workload of an undeclared name raises TopologyInvalid listing what exists."""
    with pytest.raises(TopologyInvalid, match=r"declared: emails") as exc_info:
        _topology(EMAILS).workload("sms")
    assert exc_info.value.value == "sms"


def test_workload_defaults_apply_to_an_empty_table() -> None:
    """An empty workload table gets classic, capacity 16, 1 MiB, tiers 1s/10s/1m, 4 attempts."""
    w = _topology("[workloads.emails]\n").workload("emails")
    assert w.namespace == DEFAULT_NAMESPACE
    assert w.spec.queue_type == "classic"
    assert w.capacity == 16
    assert w.spec.max_message_bytes == 1024 * 1024
    assert [t.label for t in w.tiers] == ["1s", "10s", "1m"]
    assert w.spec.retry.max_attempts == 4


# x-arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            'queue_type = "classic"',
            {
                "x-queue-type": "classic",
                "x-max-priority": 4,
                "x-dead-letter-exchange": "shop.parking",
                "x-dead-letter-routing-key": "emails",
            },
        ),
        (
            'queue_type = "classic"\nmax_priority = 10',
            {
                "x-queue-type": "classic",
                "x-max-priority": 10,
                "x-dead-letter-exchange": "shop.parking",
                "x-dead-letter-routing-key": "emails",
            },
        ),
        (
            'queue_type = "quorum"',
            {
                "x-queue-type": "quorum",
                "x-delivery-limit": QUORUM_DELIVERY_LIMIT,
                "x-dead-letter-exchange": "shop.parking",
                "x-dead-letter-routing-key": "emails",
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        ),
    ],
    ids=["classic-default-priority", "classic-max-priority-10", "quorum"],
)
def test_work_queue_arguments(extra: str, expected: dict[str, str | int]) -> None:
    """The work queue dead-letters to NS.parking with rk W; quorum adds a delivery limit."""
    work = _emails(extra).queues()[0]
    assert (work.name, work.role, work.durable) == ("shop.emails.work", "work", True)
    assert work.arguments == expected


def test_quorum_delivery_limit_is_twenty() -> None:
    """Quorum work queues park a crash-looping task after 20 deliveries."""
    assert _emails('queue_type = "quorum"').queues()[0].arguments["x-delivery-limit"] == 20


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_tier_queue_arguments(queue_type: str) -> None:
    """Tiers are quorum queues that expire after their delay in ms and dead-letter at least once
    to NS.tasks with rk W, whatever the workload's queue type; no x-expires."""
    tiers = _emails(f'queue_type = "{queue_type}"').queues()[1:-1]
    assert [(q.name, q.role, q.durable) for q in tiers] == [
        ("shop.emails.retry.200ms", "tier", True),
        ("shop.emails.retry.1s", "tier", True),
        ("shop.emails.retry.5m", "tier", True),
    ]
    for queue, ttl_ms in zip(tiers, [200, 1000, 300_000], strict=True):
        assert queue.arguments == {
            "x-queue-type": "quorum",
            "x-message-ttl": ttl_ms,
            "x-dead-letter-exchange": "shop.tasks",
            "x-dead-letter-routing-key": "emails",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        assert "x-expires" not in queue.arguments


@pytest.mark.parametrize(
    ("tier", "ttl_ms"),
    [
        ('"50ms"', 50),
        ('"0.25s"', 250),
        ('"1s"', 1000),
        ('"1.5s"', 1500),
        ('"10m"', 600_000),
        ('"1h"', 3_600_000),
        ("2", 2000),
        ("0.3", 300),
    ],
)
def test_tier_ttl_is_the_delay_in_integer_milliseconds(tier: str, ttl_ms: int) -> None:
    """x-message-ttl is the tier's delay converted from seconds to whole milliseconds."""
    queue = _emails(tiers=f"[{tier}]").queues()[1]
    assert queue.role == "tier"
    assert queue.arguments["x-message-ttl"] == ttl_ms
    assert type(queue.arguments["x-message-ttl"]) is int


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_parking_queue_has_no_ttl_no_dead_letter_and_no_limit(queue_type: str) -> None:
    """The parking lot keeps messages forever, and is classic unless asked, whatever the
    workload's type."""
    parking = _emails(f'queue_type = "{queue_type}"').queues()[-1]
    assert (parking.name, parking.role, parking.durable) == (
        "shop.emails.parking",
        "parking",
        True,
    )
    assert parking.arguments == {"x-queue-type": "classic"}


@pytest.mark.parametrize(
    ("extra", "arguments"),
    [
        ("", {"x-queue-type": "quorum", "x-delivery-limit": PARKING_DELIVERY_LIMIT}),
        (
            "replicas = 5",
            {
                "x-queue-type": "quorum",
                "x-delivery-limit": PARKING_DELIVERY_LIMIT,
                "x-quorum-initial-group-size": 5,
            },
        ),
    ],
)
def test_a_quorum_parking_lot_has_a_limit_no_read_reaches_and_no_dead_letter(
    extra: str, arguments: dict[str, object]
) -> None:
    """parking_queue_type = "quorum": replicated like the workload's other quorum queues, a
    delivery limit far above any number of reads (each read returns what it took), no TTL
    and no dead-letter exchange, so nothing leaves it but a replay or a purge."""
    for queue_type in ("classic", "quorum"):
        spec = f'queue_type = "{queue_type}"\nparking_queue_type = "quorum"\n{extra}'
        parking = _emails(spec).queues()[-1]
        assert parking.role == "parking"
        assert parking.arguments == arguments
    assert PARKING_DELIVERY_LIMIT >= 1_000_000


def test_queues_are_work_then_tiers_shortest_first_then_parking() -> None:
    """Workload.queues lists the work queue, the tiers in order, and the parking lot last."""
    names = [q.name for q in _topology(EMAILS).queues() if q.role != "delay"]
    assert names == [
        "shop.emails.work",
        "shop.emails.retry.200ms",
        "shop.emails.retry.1s",
        "shop.emails.retry.5m",
        "shop.emails.parking",
    ]


def test_bindings_route_tasks_tiers_and_parking() -> None:
    """NS.tasks -W-> work, NS.retry -W.<label>-> each tier, NS.parking -W-> parking."""
    bindings = _topology(EMAILS).bindings()
    assert [(b.exchange, b.queue, b.routing_key) for b in bindings][:5] == [
        ("shop.tasks", "shop.emails.work", "emails"),
        ("shop.retry", "shop.emails.retry.200ms", "emails.200ms"),
        ("shop.retry", "shop.emails.retry.1s", "emails.1s"),
        ("shop.retry", "shop.emails.retry.5m", "emails.5m"),
        ("shop.parking", "shop.emails.parking", "emails"),
    ]


# Flow and to_dict -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tiers", "max_attempts", "flow"),
    [
        (
            '["1s", "10s"]',
            4,
            "shop.tasks -> shop.emails.work"
            " | fails (attempt 1) -> shop.emails.retry.1s (1s) -> work"
            " | fails (attempt 2) -> shop.emails.retry.10s (10s) -> work"
            " | fails (attempt 3) -> shop.emails.retry.10s (10s) -> work"
            " | fails (attempt 4) or poison -> shop.emails.parking",
        ),
        (
            '["1s"]',
            2,
            "shop.tasks -> shop.emails.work"
            " | fails (attempt 1) -> shop.emails.retry.1s (1s) -> work"
            " | fails (attempt 2) or poison -> shop.emails.parking",
        ),
        (
            "[]",
            1,
            "shop.tasks -> shop.emails.work | fails (attempt 1) or poison -> shop.emails.parking",
        ),
    ],
)
def test_flow_describes_each_attempt(tiers: str, max_attempts: int, flow: str) -> None:
    """flow() lists the tier after each failed attempt and where the last one parks."""
    text = (
        f'namespace = "shop"\n[workloads.emails.retry]\n'
        f"tiers = {tiers}\nmax_attempts = {max_attempts}\n"
    )
    assert _topology(text).workload("emails").flow() == flow


def test_to_dict_has_stable_keys_and_is_json_ready() -> None:
    """to_dict has namespace/exchanges/queues/bindings/workloads and survives json.dumps."""
    data = _topology(EMAILS).to_dict()
    assert list(data) == ["namespace", "exchanges", "queues", "bindings", "delays", "workloads"]
    assert data["namespace"] == "shop"
    assert data["exchanges"][0] == {"name": "shop.tasks", "type": "direct", "durable": True}
    assert set(data["queues"][0]) == {"name", "role", "workload", "durable", "arguments"}
    assert data["bindings"][0] == {
        "exchange": "shop.tasks",
        "queue": "shop.emails.work",
        "routing_key": "emails",
        "destination_type": "queue",
    }
    assert data["delays"]["levels"] == 28
    emails = data["workloads"]["emails"]
    assert set(emails) == {
        "source",
        "capacity",
        "queue_type",
        "max_attempts",
        "tiers",
        "max_message_bytes",
        "flow",
    }
    assert (emails["source"], emails["capacity"], emails["max_attempts"]) == ("shop.toml", 8, 4)
    assert emails["tiers"][0] == {
        "label": "200ms",
        "delay_seconds": 0.2,
        "queue": "shop.emails.retry.200ms",
    }
    assert json.loads(json.dumps(data)) == data


# Validation errors ----------------------------------------------------------------------------

WORKLOAD = "[workloads.emails]\n"
RETRY = "[workloads.emails.retry]\n"


@pytest.mark.parametrize(
    ("files", "file", "field", "bad"),
    [
        pytest.param({"a.toml": "namespace = "}, "a.toml", "", "not valid TOML", id="bad-toml"),
        pytest.param({"a.toml": "bogus = 1"}, "a.toml", "bogus", "1", id="unknown-top-field"),
        pytest.param(
            {"a.toml": WORKLOAD + "capcity = 8"},
            "a.toml",
            "workloads.emails.capcity",
            "8",
            id="unknown-workload-field",
        ),
        pytest.param(
            {"a.toml": RETRY + "delay = 1"},
            "a.toml",
            "workloads.emails.retry.delay",
            "1",
            id="unknown-retry-field",
        ),
        pytest.param(
            {"a.toml": WORKLOAD + "capacity = -1"},
            "a.toml",
            "workloads.emails.capacity",
            "-1",
            id="negative-capacity",
        ),
        pytest.param(
            {"a.toml": WORKLOAD + "capacity = 0"},
            "a.toml",
            "workloads.emails.capacity",
            "0",
            id="zero-capacity",
        ),
        pytest.param(
            {"a.toml": WORKLOAD + 'queue_type = "stream"'},
            "a.toml",
            "workloads.emails.queue_type",
            "'stream'",
            id="unknown-queue-type",
        ),
        pytest.param(
            {"a.toml": WORKLOAD + "max_priority = 256"},
            "a.toml",
            "workloads.emails.max_priority",
            "256",
            id="priority-too-high",
        ),
        pytest.param(
            {"a.toml": WORKLOAD + "max_message_bytes = 17000000"},
            "a.toml",
            "workloads.emails.max_message_bytes",
            "17000000",
            id="message-too-big",
        ),
        pytest.param(
            {"a.toml": RETRY + 'tiers = ["10s", "1s"]'},
            "a.toml",
            "workloads.emails.retry.tiers",
            "increasing",
            id="decreasing-tiers",
        ),
        pytest.param(
            {"a.toml": RETRY + 'tiers = ["1s", "1000ms"]'},
            "a.toml",
            "workloads.emails.retry.tiers",
            "increasing",
            id="equal-tiers",
        ),
        pytest.param(
            {"a.toml": RETRY + 'tiers = ["1s", "soon"]'},
            "a.toml",
            "workloads.emails.retry.tiers",
            "'soon'",
            id="bad-duration-string",
        ),
        pytest.param(
            {"a.toml": RETRY + 'tiers = ["1s", -5]'},
            "a.toml",
            "workloads.emails.retry.tiers",
            "-5",
            id="negative-tier",
        ),
        pytest.param(
            {"a.toml": RETRY + 'tiers = ["1s", {a = 1}]'},
            "a.toml",
            "workloads.emails.retry.tiers[1]",
            "number",
            id="tier-not-a-number",
        ),
        pytest.param(
            {"a.toml": RETRY + "max_attempts = 0"},
            "a.toml",
            "workloads.emails.retry.max_attempts",
            "0",
            id="zero-attempts",
        ),
        pytest.param(
            {"a.toml": RETRY + "tiers = []\nmax_attempts = 3"},
            "a.toml",
            "workloads.emails.retry",
            "at least one tier",
            id="retries-without-tiers",
        ),
        pytest.param(
            {"a.toml": WORKLOAD + 'queue_type = "quorum"\nmax_priority = 5'},
            "a.toml",
            "workloads.emails.max_priority",
            "5: max_priority is for classic queues",
            id="quorum-with-priority",
        ),
        pytest.param(
            {"a.toml": "[workloads.Emails]\n"},
            "a.toml",
            "workloads",
            "'Emails'",
            id="bad-workload-name",
        ),
        pytest.param(
            {"a.toml": '[workloads."emails.send"]\n'},
            "a.toml",
            "workloads",
            "'emails.send'",
            id="dotted-workload-name",
        ),
        pytest.param(
            {"a.toml": 'namespace = "Shop Floor"'},
            "a.toml",
            "namespace",
            "'Shop Floor'",
            id="bad-namespace",
        ),
        pytest.param(
            {"a.toml": 'namespace = "shop"', "b.toml": 'namespace = "other"'},
            "b.toml",
            "namespace",
            "'other'",
            id="conflicting-namespaces",
        ),
        pytest.param(
            {"a.toml": WORKLOAD, "b.toml": WORKLOAD + "capacity = 2"},
            "b.toml",
            "workloads.emails",
            "already declared in a.toml",
            id="duplicate-workload",
        ),
        pytest.param(
            {"a.toml": WORKLOAD, "b.toml": "capacity = 2"},
            "b.toml",
            "capacity",
            "2",
            id="error-in-second-file",
        ),
    ],
)
def test_invalid_topology_names_file_field_and_value(
    files: dict[str, str], file: str, field: str, bad: str
) -> None:
    """Each TopologyInvalid carries and prints the file, the field path and the bad value."""
    with pytest.raises(TopologyInvalid) as exc_info:
        parse_topology(files)
    exc = exc_info.value
    assert exc.file == file
    # A tier error may name the list or, more precisely, the element within it.
    assert exc.field == field or exc.field.startswith(f"{field}[")
    message = str(exc)
    assert message.startswith(f"{file}: {field}" if field else file)
    assert bad in message


NAME_IN_WORDS = (
    "lower-case letters, digits, '_' and '-', starting with a letter or digit (at most 63 "
    "characters)"
)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            WORKLOAD + "capcity = 8",
            "workloads.emails.capcity = 8: unknown key (did you mean 'capacity'?)",
        ),
        (
            RETRY + "max_attempt = 3",
            "workloads.emails.retry.max_attempt = 3: unknown key (did you mean 'max_attempts'?)",
        ),
        ('namespce = "shop"', "namespce = 'shop': unknown key (did you mean 'namespace'?)"),
        (
            WORKLOAD + "zzz = 1",
            "workloads.emails.zzz = 1: unknown key (known: queue_type, max_priority, capacity, "
            "max_message_bytes, max_redeliveries, replicas, parking_queue_type, retry)",
        ),
        ("[workloads.Emails]\n", f"workloads = 'Emails': a workload name must be {NAME_IN_WORDS}"),
        (
            'namespace = "Shop Floor"',
            "namespace = 'Shop Floor': a namespace must be lower-case letters, digits, '_', '-' "
            "and '.', starting with a letter or digit (at most 63 characters)",
        ),
        (
            WORKLOAD + "capacity = 0",
            "workloads.emails.capacity = 0: must be greater than or equal to 1",
        ),
        (
            WORKLOAD + 'queue_type = "stream"',
            "workloads.emails.queue_type = 'stream': must be 'classic' or 'quorum'",
        ),
    ],
    ids=[
        "typo-in-workload",
        "typo-in-retry",
        "typo-at-top",
        "unknown-key-lists-known",
        "workload-name",
        "namespace",
        "bound",
        "literal",
    ],
)
def test_invalid_topology_is_explained_in_our_words(text: str, problem: str) -> None:
    """A validation problem is worded by rabbitq, with a "did you mean" for a near-miss key."""
    with pytest.raises(TopologyInvalid) as exc_info:
        parse_topology({"a.toml": text})
    assert exc_info.value.problems == [problem]
    assert str(exc_info.value) == f"a.toml: {problem}"


def test_every_problem_of_a_file_is_reported() -> None:
    """A file with three problems gives one TopologyInvalid listing all three."""
    text = WORKLOAD + 'capcity = 8\nqueue_type = "stream"\n' + RETRY + "max_attempts = 0"
    with pytest.raises(TopologyInvalid) as exc_info:
        parse_topology({"a.toml": text})
    exc = exc_info.value
    assert exc.problems == [
        "workloads.emails.queue_type = 'stream': must be 'classic' or 'quorum'",
        "workloads.emails.retry.max_attempts = 0: must be greater than or equal to 1",
        "workloads.emails.capcity = 8: unknown key (did you mean 'capacity'?)",
    ]
    assert str(exc) == "a.toml: " + "; ".join(exc.problems)
    assert (exc.field, exc.value) == ("workloads.emails.queue_type", "stream")


def test_conflicting_namespaces_name_the_first_declaration() -> None:
    """A second namespace says which file declared the first one."""
    with pytest.raises(TopologyInvalid, match=r"a\.toml declares namespace 'shop'"):
        parse_topology({"a.toml": 'namespace = "shop"', "b.toml": 'namespace = "other"'})


def test_same_namespace_in_two_files_merges_their_workloads() -> None:
    """Two files with one namespace give one topology with both workloads."""
    topo = parse_topology(
        {
            "a.toml": 'namespace = "shop"\n[workloads.emails]\n',
            "b.toml": 'namespace = "shop"\n[workloads.sms]\n',
        }
    )
    assert topo.namespace == "shop"
    assert {n: w.source for n, w in topo.workloads.items()} == {"emails": "a.toml", "sms": "b.toml"}


def test_namespace_declared_in_one_file_applies_to_all() -> None:
    """A namespace in one file names the workloads of the other files too."""
    topo = parse_topology({"a.toml": "[workloads.emails]\n", "b.toml": 'namespace = "shop"\n'})
    assert topo.workload("emails").work_queue == "shop.emails.work"


@pytest.mark.parametrize(
    ("text", "override", "namespace"),
    [
        (EMAILS, None, "shop"),
        (EMAILS, "test-1a2b", "test-1a2b"),
        ("[workloads.emails]\n", None, DEFAULT_NAMESPACE),
        ("[workloads.emails]\n", "ci.run.7", "ci.run.7"),
    ],
)
def test_namespace_override_wins_over_the_files(
    text: str, override: str | None, namespace: str
) -> None:
    """parse_topology(namespace=...) replaces the declared (or default) namespace in every name."""
    w = _topology(text, override).workload("emails")
    assert w.namespace == namespace
    assert w.work_queue == f"{namespace}.emails.work"
    assert w.task_exchange == f"{namespace}.tasks"


@pytest.mark.parametrize("override", ["Bad NS", "-x", "a/b"])
def test_invalid_namespace_override_is_rejected(override: str) -> None:
    """An override that is not a valid namespace raises TopologyInvalid for --namespace."""
    with pytest.raises(TopologyInvalid) as exc_info:
        _topology(EMAILS, override)
    assert (exc_info.value.file, exc_info.value.field) == ("--namespace", "namespace")
    assert exc_info.value.value == override
    assert exc_info.value.problem.startswith("a namespace must be lower-case letters")


def test_parse_file_returns_the_validated_file() -> None:
    """parse_file gives the namespace and typed workload specs of one file."""
    parsed = parse_file("shop.toml", EMAILS)
    assert parsed.namespace == "shop"
    assert parsed.workloads["emails"].capacity == 8
    assert parsed.workloads["emails"].retry.tiers == [0.2, 1.0, 300.0]


# Loading from disk ----------------------------------------------------------------------------


def test_load_topology_reads_every_toml_file_sorted(tmp_path: Path) -> None:
    """load_topology merges *.toml files in name order, records sources and ignores other files."""
    (tmp_path / "b.toml").write_text("[workloads.sms]\n", encoding="utf-8")
    (tmp_path / "a.toml").write_text(EMAILS, encoding="utf-8")
    (tmp_path / "README.md").write_text("not a topology", encoding="utf-8")
    topo = load_topology(tmp_path)
    assert topo.namespace == "shop"
    assert list(topo.workloads) == ["emails", "sms"]
    assert topo.workload("sms").source == str(tmp_path / "b.toml")


def test_load_topology_reads_a_single_file(tmp_path: Path) -> None:
    """load_topology also takes the path of one file."""
    path = tmp_path / "shop.toml"
    path.write_text(EMAILS, encoding="utf-8")
    assert list(load_topology(path, "other").workloads) == ["emails"]
    assert load_topology(path, "other").namespace == "other"


def test_load_topology_errors_name_the_file_path(tmp_path: Path) -> None:
    """An invalid file in the directory is named by its full path, later files after earlier."""
    (tmp_path / "a.toml").write_text("[workloads.emails]\n", encoding="utf-8")
    (tmp_path / "b.toml").write_text("[workloads.emails]\n", encoding="utf-8")
    with pytest.raises(TopologyInvalid) as exc_info:
        load_topology(tmp_path)
    assert exc_info.value.file == str(tmp_path / "b.toml")
    assert str(tmp_path / "a.toml") in str(exc_info.value)


def test_load_topology_without_toml_files_is_an_error(tmp_path: Path) -> None:
    """A directory without *.toml files raises TopologyInvalid naming the directory."""
    (tmp_path / "notes.txt").write_text("nothing here", encoding="utf-8")
    with pytest.raises(TopologyInvalid, match=r"no \*\.toml topology files found") as exc_info:
        load_topology(tmp_path)
    assert exc_info.value.file == str(tmp_path)


def test_load_topology_of_a_missing_directory_says_it_does_not_exist(tmp_path: Path) -> None:
    """A --topology path that does not exist is named, with the option and env var to fix it."""
    with pytest.raises(
        TopologyInvalid,
        match=r"no such directory; point --topology \(or "
        r"RABBITQ_TOPOLOGY\)",
    ) as exc_info:
        load_topology(tmp_path / "nowhere")
    assert exc_info.value.file == str(tmp_path / "nowhere")


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_replicas_set_the_group_size_of_every_quorum_queue(queue_type: str) -> None:
    """`replicas` sizes the quorum queues (the tiers always, the work queue if quorum); the
    parking lot is classic. Unset, no argument: the broker's default, and no drift."""
    sized = _emails(f'queue_type = "{queue_type}"\nreplicas = 3').queues()
    quorum = [q for q in sized if q.arguments["x-queue-type"] == "quorum"]
    assert quorum and all(q.arguments["x-quorum-initial-group-size"] == 3 for q in quorum)
    assert all("x-quorum-initial-group-size" not in q.arguments for q in sized if q not in quorum)
    unsized = _emails(f'queue_type = "{queue_type}"').queues()
    assert all("x-quorum-initial-group-size" not in q.arguments for q in unsized)
