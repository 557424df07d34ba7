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
from functools import partial
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from rabbitq._errors import NotConfirmed, ParkReason, Unroutable

UNKNOWN_TASK = "_unknown"
OUTCOMES = ("succeeded", "retried", "parked", "expired", "redelivered")
PUBLISH_KINDS = ("task", "retry", "park", "redeliver")
PUBLISH_OUTCOMES = ("confirmed", "returned", "nacked", "failed")
Reading = Callable[[], float]

# Bucket bounds in seconds. Handlers run from a millisecond to minutes; queue latency from a
# millisecond to hours of backlog.
_UP_TO_30S = "0.001 0.0025 0.005 0.01 0.025 0.05 0.1 0.25 0.5 1 2.5 5 10 30"
DURATION_BUCKETS = tuple(float(b) for b in f"{_UP_TO_30S} 60 120 300".split())
LATENCY_BUCKETS = tuple(float(b) for b in f"{_UP_TO_30S} 60 300 900 3600".split())
CONFIRM_BUCKETS = tuple(float(b) for b in f"0.0005 {_UP_TO_30S}".split())


class Metrics:
    """Every rabbitq metric, registered on `registry`.

    Args:
        registry: where the metrics live; `rabbitq consume --metrics-port` serves the one the
            CLI makes. Embedders pass their own (one `Metrics` per registry).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        per_task = ("workload", "task")
        self.tasks = CountFamily(
            "rabbitq_tasks",
            "Settled deliveries by outcome: succeeded, retried, parked, "
            "expired (deadline passed before it ran; also in the parking lot) or redelivered "
            "(came back unsettled and was requeued with its count raised).",
            (*per_task, "outcome"),
        )
        self.parked = CountFamily(
            "rabbitq_tasks_parked",
            "Tasks moved to the parking lot, by reason.",
            (*per_task, "reason"),
        )
        self.duration = BucketsFamily(
            "rabbitq_task_duration_seconds",
            "Handler run time, whatever the outcome.",
            per_task,
            DURATION_BUCKETS,
        )
        self.queue_latency = BucketsFamily(
            "rabbitq_task_queue_latency_seconds",
            "Handler start minus the time the task could "
            "first run: its publish time, or the end of its retry delay.",
            per_task,
            LATENCY_BUCKETS,
        )
        self.publishes = CountFamily(
            "rabbitq_publishes",
            "Publishes by kind (task, retry, park, redeliver) and outcome "
            "(confirmed, returned, nacked, failed).",
            ("kind", "outcome"),
        )
        self.confirm = BucketsFamily(
            "rabbitq_publish_confirm_seconds",
            "From publish to the broker's confirm.",
            ("kind",),
            CONFIRM_BUCKETS,
        )
        gauge = partial(Gauge, labelnames=["workload"], registry=registry)
        counter = partial(Counter, labelnames=["workload"], registry=registry)
        self.running = gauge("rabbitq_running_handlers", "Handlers running now.")
        self.capacity = gauge(
            "rabbitq_capacity", "The most handlers that run at once (the prefetch)."
        )
        self.ready = gauge("rabbitq_consumer_ready", "1 while consuming.")
        self.connected = gauge("rabbitq_connected", "1 while the consumer's connection is open.")
        self.node = Gauge(
            "rabbitq_broker_node",
            "1 for the broker node (host:port) the consumer receives its tasks from.",
            ["workload", "node"],
            registry=registry,
        )
        self.reconnects = counter(
            "rabbitq_reconnects", "Lost connections the consumer reconnected after."
        )
        self.loop_blocked = counter(
            "rabbitq_loop_blocked_seconds",
            "Time the event loop was blocked (a second or more "
            "at a time): no heartbeats or acks went out meanwhile.",
        )
        # rabbitq's own families are shown to the registry by this object, when it is scraped
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        counts = (self.tasks, self.parked, self.publishes)
        for family in (*counts, self.duration, self.queue_latency, self.confirm):
            yield family.family()

    def describe(self) -> Iterator[Metric]:
        # the names, so the registry refuses a second Metrics on it
        return self.collect()

    def workload(
        self, name: str, tasks: Iterable[str], capacity: int, running: Reading
    ) -> WorkloadMetrics:
        """The children of one workload; `running` is read at scrape time."""
        return WorkloadMetrics(self, name, tasks, capacity, running)

    def publishing(self) -> PublishMetrics:
        return PublishMetrics(self)


class TaskMetrics:
    """The children of one (workload, task)."""

    __slots__ = (*OUTCOMES, "duration", "queue_latency", "_parked_by_reason")

    def __init__(self, metrics: Metrics, workload: str, task: str) -> None:
        self.succeeded, self.retried, self.parked, self.expired, self.redelivered = (
            metrics.tasks.labels(workload, task, o) for o in OUTCOMES
        )
        self.duration = metrics.duration.labels(workload, task)
        self.queue_latency = metrics.queue_latency.labels(workload, task)
        # every reason up front: a series born at its first park would hide that park from
        # rate() and increase()
        self._parked_by_reason = {
            str(r): metrics.parked.labels(workload, task, str(r)) for r in ParkReason
        }

    def park(self, reason: str) -> None:
        """Count an arrival in the parking lot (`expired` counts as its own outcome)."""
        self._parked_by_reason[reason].inc()
        (self.expired if reason == "expired" else self.parked).inc()


class WorkloadMetrics:
    """The children of one workload, one `TaskMetrics` per registered task."""

    def __init__(
        self, metrics: Metrics, name: str, tasks: Iterable[str], capacity: int, running: Reading
    ) -> None:
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
        self._node_family = metrics.node
        self._node: str | None = None

    def on_node(self, node: str) -> None:
        """The consumer now receives from `node` (host:port): 1 there, the old series gone."""
        if self._node is not None and self._node != node:
            self._node_family.remove(self.name, self._node)
        self._node = node
        self._node_family.labels(self.name, node).set(1)

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
        self, name: str, documentation: str, labelnames: tuple[str, ...], bounds: tuple[float, ...]
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
            cumulative = accumulate(list(child.counts))
            buckets = [(le, float(c)) for le, c in zip(self.les, cumulative, strict=True)]
            family.add_metric(values, buckets, child.sum)
        return family
