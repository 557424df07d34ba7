"""The metrics: names, bounded labels, series that exist before the first task, no globals."""

from __future__ import annotations

import re
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from rabbitq._errors import NotConfirmed, Unroutable
from rabbitq._metrics import OUTCOMES, UNKNOWN_TASK, Metrics, WorkloadMetrics


def _workload(registry: CollectorRegistry, running: float = 0) -> WorkloadMetrics:
    return Metrics(registry).workload("emails", ["emails.send"], 8, lambda: running)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_nothing_is_registered_globally() -> None:
    before = set(prometheus_client.REGISTRY._names_to_collectors)
    _workload(CollectorRegistry())
    assert set(prometheus_client.REGISTRY._names_to_collectors) == before


def test_two_registries_hold_their_own_metrics() -> None:
    """A Metrics per registry: two consumers in one process (tests, embedders) do not clash."""
    a, b = CollectorRegistry(), CollectorRegistry()
    _workload(a).task("emails.send").succeeded.inc()
    _workload(b)
    assert (
        _value(a, "rabbitq_tasks_total", workload="emails", task="emails.send", outcome="succeeded")
        == 1
    )
    assert (
        _value(b, "rabbitq_tasks_total", workload="emails", task="emails.send", outcome="succeeded")
        == 0
    )


@pytest.mark.parametrize("task", ["emails.send", UNKNOWN_TASK])
@pytest.mark.parametrize("outcome", OUTCOMES)
def test_every_outcome_series_exists_at_zero_before_the_first_task(task: str, outcome: str) -> None:
    registry = CollectorRegistry()
    _workload(registry)
    assert (
        _value(registry, "rabbitq_tasks_total", workload="emails", task=task, outcome=outcome) == 0
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("emails.send", "emails.send"),
        ("forged.name", UNKNOWN_TASK),
        (None, UNKNOWN_TASK),
        ("", UNKNOWN_TASK),
    ],
)
def test_a_task_label_is_a_registered_name_or_unknown(name: str | None, expected: str) -> None:
    """Poison names anything; only registered names become label values (bounded)."""
    registry = CollectorRegistry()
    _workload(registry).task(name).succeeded.inc()
    assert (
        _value(
            registry, "rabbitq_tasks_total", workload="emails", task=expected, outcome="succeeded"
        )
        == 1
    )


@pytest.mark.parametrize(
    ("reason", "outcome"),
    [("retries_exhausted", "parked"), ("invalid_payload", "parked"), ("expired", "expired")],
)
def test_a_park_counts_its_reason_and_one_outcome(reason: str, outcome: str) -> None:
    registry = CollectorRegistry()
    _workload(registry).task("emails.send").park(reason)
    assert (
        _value(
            registry,
            "rabbitq_tasks_parked_total",
            workload="emails",
            task="emails.send",
            reason=reason,
        )
        == 1
    )
    outcomes = {
        o: _value(registry, "rabbitq_tasks_total", workload="emails", task="emails.send", outcome=o)
        for o in OUTCOMES
    }
    assert outcomes == {o: (1 if o == outcome else 0) for o in OUTCOMES}


def test_gauges_read_state_at_scrape_time() -> None:
    registry = CollectorRegistry()
    state = {"running": 3}
    Metrics(registry).workload("emails", [], 8, lambda: state["running"])
    assert _value(registry, "rabbitq_running_handlers", workload="emails") == 3
    state["running"] = 5
    assert _value(registry, "rabbitq_running_handlers", workload="emails") == 5
    assert _value(registry, "rabbitq_capacity", workload="emails") == 8
    assert _value(registry, "rabbitq_consumer_ready", workload="emails") == 0


def test_publish_metrics_count_confirms_and_failures() -> None:
    registry = CollectorRegistry()
    publishing = Metrics(registry).publishing()
    publishing.count("retry", None, 0.002)
    publishing.count("park", Unroutable("m-1", "shop.parking", "emails"), 0.0)
    publishing.count("park", NotConfirmed("m-2", "no", nacked=True), 0.0)
    publishing.count("park", NotConfirmed("m-3", "timeout"), 0.0)
    publishing.count("task", TimeoutError(), 0.0)
    assert _value(registry, "rabbitq_publishes_total", kind="retry", outcome="confirmed") == 1
    assert _value(registry, "rabbitq_publishes_total", kind="park", outcome="returned") == 1
    assert _value(registry, "rabbitq_publishes_total", kind="park", outcome="nacked") == 1
    assert _value(registry, "rabbitq_publishes_total", kind="park", outcome="failed") == 1
    assert _value(registry, "rabbitq_publishes_total", kind="task", outcome="failed") == 1
    assert _value(registry, "rabbitq_publish_confirm_seconds_count", kind="retry") == 1
    assert (
        _value(registry, "rabbitq_publish_confirm_seconds_bucket", kind="retry", le="0.0025") == 1
    )


def test_names_follow_prometheus_conventions() -> None:
    registry = CollectorRegistry()
    _workload(registry)
    Metrics(CollectorRegistry())  # a second Metrics on another registry is fine
    names = {m.name: m.type for m in registry.collect()}
    for name, kind in names.items():
        assert name.startswith("rabbitq_")
        if kind == "counter":
            assert not name.endswith("_total")  # the client adds it to the samples
        if kind == "histogram":
            assert name.endswith("_seconds"), name


def test_every_park_reason_and_publish_outcome_series_exists_at_zero() -> None:
    """A series born at its first increment hides that increment from rate() and increase()."""
    from rabbitq._errors import ParkReason
    from rabbitq._metrics import PUBLISH_KINDS, PUBLISH_OUTCOMES

    registry = CollectorRegistry()
    _workload(registry)
    for reason in ParkReason:
        assert (
            _value(
                registry,
                "rabbitq_tasks_parked_total",
                workload="emails",
                task="emails.send",
                reason=str(reason),
            )
            == 0
        )
    publishing_registry = CollectorRegistry()
    Metrics(publishing_registry).publishing()
    for kind in PUBLISH_KINDS:
        for outcome in PUBLISH_OUTCOMES:
            assert (
                _value(publishing_registry, "rabbitq_publishes_total", kind=kind, outcome=outcome)
                == 0
            )


def test_own_histograms_and_counters_expose_what_prometheus_client_would() -> None:
    """rabbitq's lock-free children give the samples prometheus-client's would, bucket edges
    (a value equal to a bound is in that bound's bucket) and +Inf included."""
    from prometheus_client import Counter, Histogram

    from rabbitq._metrics import LATENCY_BUCKETS

    values = [0.0, 0.001, 0.0011, 0.5, 1.0, 59.9, 60.0, 3600.0, 4000.0, 0.25]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    task = Metrics(ours).workload("emails", ["emails.send"], 8, lambda: 0).task("emails.send")
    reference = Histogram(
        "rabbitq_task_queue_latency_seconds",
        "x",
        ["workload", "task"],
        buckets=LATENCY_BUCKETS,
        registry=theirs,
    ).labels("emails", "emails.send")
    counter = Counter("rabbitq_tasks", "x", ["workload", "task", "outcome"], registry=theirs)
    for value in values:
        task.queue_latency.observe(value)
        reference.observe(value)
        task.succeeded.inc()
        counter.labels("emails", "emails.send", "succeeded").inc()

    def samples(registry: CollectorRegistry, prefix: str) -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels.get("le", "")): s.value
            for m in registry.collect()
            for s in m.samples
            if s.name.startswith(prefix)
            and not s.name.endswith("_created")
            and s.labels.get("task") == "emails.send"
            and s.labels.get("outcome", "succeeded") == "succeeded"
        }

    assert samples(ours, "rabbitq_task_queue_latency") == samples(
        theirs, "rabbitq_task_queue_latency"
    )
    assert samples(ours, "rabbitq_tasks_total") == samples(theirs, "rabbitq_tasks_total")


def test_a_second_metrics_on_one_registry_is_refused() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    with pytest.raises(ValueError, match="Duplicated"):
        Metrics(registry)


def test_the_parked_metric_documents_every_park_reason() -> None:
    """docs/observability.md lists exactly the ParkReason values on rabbitq_tasks_parked_total."""
    from rabbitq._errors import ParkReason

    docs = Path(__file__).resolve().parents[2] / "docs" / "observability.md"
    row = next(r for r in docs.read_text().splitlines() if r.startswith("| `rabbitq_tasks_parked"))
    meaning = row.split("|")[4].split(":", 1)[1].strip()
    listed = set(re.findall(r"(?:^|, )`([a-z_]+)`", meaning))
    assert listed == {str(r) for r in ParkReason}
