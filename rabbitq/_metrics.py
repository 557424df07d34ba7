"""rabbitq's Prometheus metrics, on a registry that is handed in.

Nothing is registered at import and nothing goes to prometheus-client's global registry:
`Metrics(registry)` registers everything once, and the consumer and the publisher take the
label children they need up front, so the hot path never looks up a label.

The per-task counters and histograms are rabbitq's own (`Count`, `Buckets`): an increment is
an addition and an observation a bisect, a quarter of a microsecond, where prometheus-client's
take a lock per value (about a microsecond each, 5% of a drain's CPU at three a task). One
collector turns them into Prometheus families when scraped. They are updated on the
consumer's event loop only; a scrape from another thread may see a sum and a count one
observation apart, never a torn value. Gauges that mirror state (running handlers) are read
when scraped, at no cost per task.

Label values are bounded: workload names come from the topology, task names from the app's
registry (`_unknown` for poison that names no registered task), reasons and outcomes from
fixed sets. Never an id.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from rabbitq._errors import NotConfirmed, ParkReason, Unroutable

UNKNOWN_TASK = "_unknown"
OUTCOMES = ("succeeded", "retried", "parked", "expired", "redelivered")
PUBLISH_KINDS = ("task", "retry", "park", "redeliver")
PUBLISH_OUTCOMES = ("confirmed", "returned", "nacked", "failed")

# Handlers run from a millisecond to minutes; queue latency from a millisecond to hours of
# backlog.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
)
CONFIRM_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


class Metrics:
    """Every rabbitq metric, registered on `registry`.

    Args:
        registry: where the metrics live; `rabbitq consume --metrics-port` serves the one the
            CLI makes. Embedders pass their own (one `Metrics` per registry).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.tasks = CountFamily(
            "rabbitq_tasks", "Settled deliveries by outcome: succeeded, retried, parked, "
            "expired (deadline passed before it ran; also in the parking lot) or redelivered "
            "(came back unsettled and was requeued with its count raised).",
            ("workload", "task", "outcome"),
        )
        self.parked = CountFamily(
            "rabbitq_tasks_parked", "Tasks moved to the parking lot, by reason.",
            ("workload", "task", "reason"),
        )
        self.duration = BucketsFamily(
            "rabbitq_task_duration_seconds", "Handler run time, whatever the outcome.",
            ("workload", "task"), DURATION_BUCKETS,
        )
        self.queue_latency = BucketsFamily(
            "rabbitq_task_queue_latency_seconds", "Handler start minus the time the task could "
            "first run: its publish time, or the end of its retry delay.",
            ("workload", "task"), LATENCY_BUCKETS,
        )
        self.running = Gauge(
            "rabbitq_running_handlers", "Handlers running now.", ["workload"], registry=registry,
        )
        self.capacity = Gauge(
            "rabbitq_capacity", "The most handlers that run at once (the prefetch).",
            ["workload"], registry=registry,
        )
        self.ready = Gauge(
            "rabbitq_consumer_ready", "1 while consuming.", ["workload"], registry=registry,
        )
        self.connected = Gauge(
            "rabbitq_connected", "1 while the consumer's connection is open.", ["workload"],
            registry=registry,
        )
        self.reconnects = Counter(
            "rabbitq_reconnects", "Lost connections the consumer reconnected after.",
            ["workload"], registry=registry,
        )
        self.loop_blocked = Counter(
            "rabbitq_loop_blocked_seconds", "Time the event loop was blocked (a second or more "
            "at a time): no heartbeats or acks went out meanwhile.", ["workload"],
            registry=registry,
        )
        self.publishes = CountFamily(
            "rabbitq_publishes", "Publishes by kind (task, retry, park, redeliver) and outcome "
            "(confirmed, returned, nacked, failed).", ("kind", "outcome"),
        )
        self.confirm = BucketsFamily(
            "rabbitq_publish_confirm_seconds", "From publish to the broker's confirm.",
            ("kind",), CONFIRM_BUCKETS,
        )
        registry.register(_Families(
            (self.tasks, self.parked, self.duration, self.queue_latency, self.publishes,
             self.confirm)
        ))

    def workload(
        self, name: str, tasks: Iterable[str], capacity: int, running: Callable[[], float]
    ) -> WorkloadMetrics:
        """The children of one workload; `running` is read at scrape time."""
        return WorkloadMetrics(self, name, tasks, capacity, running)

    def publishing(self) -> PublishMetrics:
        return PublishMetrics(self)


class TaskMetrics:
    """The children of one (workload, task)."""

    __slots__ = ("succeeded", "retried", "parked", "expired", "redelivered", "duration",
                 "queue_latency", "_parked_by_reason")

    def __init__(self, metrics: Metrics, workload: str, task: str) -> None:
        children = {o: metrics.tasks.labels(workload, task, o) for o in OUTCOMES}
        self.succeeded = children["succeeded"]
        self.retried = children["retried"]
        self.parked = children["parked"]
        self.expired = children["expired"]
        self.redelivered = children["redelivered"]
        self.duration = metrics.duration.labels(workload, task)
        self.queue_latency = metrics.queue_latency.labels(workload, task)
        # every reason up front: a series born at its first park would hide that park from
        # rate() and increase()
        self._parked_by_reason: dict[str, Count] = {
            str(r): metrics.parked.labels(workload, task, str(r)) for r in ParkReason
        }

    def park(self, reason: str) -> None:
        """Count an arrival in the parking lot (`expired` counts as its own outcome)."""
        self._parked_by_reason[reason].inc()
        (self.expired if reason == "expired" else self.parked).inc()


class WorkloadMetrics:
    """The children of one workload, one `TaskMetrics` per registered task."""

    def __init__(
        self,
        metrics: Metrics,
        name: str,
        tasks: Iterable[str],
        capacity: int,
        running: Callable[[], float],
    ) -> None:
        self._metrics = metrics
        self.name = name
        # created up front so every series exists at 0 before the first task (rate() and
        # alerts then see the first increment)
        self._tasks = {t: TaskMetrics(metrics, name, t) for t in (*tasks, UNKNOWN_TASK)}
        self.unknown = self._tasks[UNKNOWN_TASK]
        metrics.capacity.labels(name).set(capacity)
        metrics.running.labels(name).set_function(running)
        self.ready = metrics.ready.labels(name)
        self.connected = metrics.connected.labels(name)
        self.reconnects = metrics.reconnects.labels(name)
        self.loop_blocked = metrics.loop_blocked.labels(name)
        self.ready.set(0)
        self.connected.set(0)

    def task(self, name: str | None) -> TaskMetrics:
        """The children of a registered task, or of `_unknown`."""
        return self._tasks.get(name or "", self.unknown)


class PublishMetrics:
    """The publish counters and confirm latency, per kind."""

    __slots__ = ("_counts", "_confirm")

    def __init__(self, metrics: Metrics) -> None:
        self._counts = {
            (k, o): metrics.publishes.labels(k, o) for k in PUBLISH_KINDS for o in PUBLISH_OUTCOMES
        }
        self._confirm = {k: metrics.confirm.labels(k) for k in PUBLISH_KINDS}

    def count(self, kind: str, error: BaseException | None, seconds: float) -> None:
        """One publish: confirmed after `seconds`, or `returned`, `nacked` or `failed` (no
        confirm: connection lost, timed out or cancelled)."""
        if error is None:
            self._counts[kind, "confirmed"].inc()
            self._confirm[kind].observe(seconds)
        elif isinstance(error, Unroutable):
            self._counts[kind, "returned"].inc()
        elif isinstance(error, NotConfirmed) and error.nacked:
            self._counts[kind, "nacked"].inc()
        else:
            self._counts[kind, "failed"].inc()


class Count:
    """A counter child: `inc()` is one addition."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Buckets:
    """A histogram child: `observe()` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # a value equal to a bound belongs to that bound's bucket (le = less or equal)
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class CountFamily:
    """A labelled counter whose children are `Count`s."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.children: dict[tuple[str, ...], Count] = {}

    def labels(self, *values: str) -> Count:
        return self.children.setdefault(values, Count())

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self.children.items()):
            family.add_metric(values, child.value)
        return family


class BucketsFamily:
    """A labelled histogram whose children are `Buckets`."""

    def __init__(
        self, name: str, documentation: str, labelnames: tuple[str, ...],
        bounds: tuple[float, ...],
    ) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.bounds = bounds
        # as prometheus-client writes `le` (the same series whichever made it)
        self.les = [repr(float(b)) for b in bounds] + ["+Inf"]
        self.children: dict[tuple[str, ...], Buckets] = {}

    def labels(self, *values: str) -> Buckets:
        return self.children.setdefault(values, Buckets(self.bounds))

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self.children.items()):
            cumulative, buckets = 0, []
            for le, count in zip(self.les, list(child.counts), strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(values, buckets, child.sum)
        return family


class _Families:
    """The collector that shows rabbitq's own families to a registry when it is scraped."""

    def __init__(self, families: tuple[CountFamily | BucketsFamily, ...]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.family()

    def describe(self) -> Iterator[Metric]:
        # the names, so the registry refuses a second Metrics on it
        return self.collect()
