"""Traces against the real broker: one trace from the publish through each attempt to the park.

Each test gets a TracerProvider of its own with an in-memory exporter, handed to rabbitq's
tracing module for the test only (the global provider is never set here).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel

from rabbitq import App, TaskContext
from rabbitq import _tracing as tracing
from tests.broker.test_publish_cli import APP, SPEC, invoke, payload
from tests.conftest import broker_url
from tests.helpers import drain_queue, running_consumer, wait_until

# the broker the tests use, as spans name it: host and port, no credentials
_BROKER = urlsplit(broker_url())
SERVER = (_BROKER.hostname, _BROKER.port or 5672)


class Item(BaseModel):
    n: int


class Boom(Exception):
    """The handler's own failure."""


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """The spans rabbitq ends during the test, from a provider of the test's own."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("rabbitq"))
    yield exporter
    provider.shutdown()


def named(spans: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name.startswith(prefix)]


def attempt_of(span: ReadableSpan) -> int:
    assert span.attributes is not None
    attempt = span.attributes["rabbitq.attempt"]
    assert isinstance(attempt, int)
    return attempt


async def test_one_trace_links_the_publish_each_attempt_and_the_park(
    make_topology, connection, url, namespace, spans
):
    """Attempts 1 and 2 retried, 3 parked: four spans, one trace, each process span a child of
    the publish, with the outcome and the exception; the parked copy carries the context."""
    topology = await make_topology(
        jobs={"capacity": 2, "retry": {"tiers": ["200ms"], "max_attempts": 3}}
    )
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)

    @app.task("jobs.fail", workload="jobs")
    async def fail(item: Item, ctx: TaskContext) -> None:
        raise Boom(f"attempt {ctx.attempt} failed")

    async with running_consumer(app, workload, url) as consumer:
        message_id = await fail.publish(Item(n=1), idempotency_key="traced-1")
        await wait_until(lambda: consumer.counts["parked:retries_exhausted"] == 1, what="the park")
        await wait_until(lambda: len(named(spans, "process ")) == 3, what="three process spans")

    [publish] = named(spans, "publish ")
    assert publish.kind is SpanKind.PRODUCER
    assert publish.name == f"publish {namespace}.tasks:jobs"
    assert publish.attributes == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": f"{namespace}.tasks:jobs",
        "messaging.rabbitmq.destination.routing_key": "jobs",
        "messaging.message.id": message_id,
        "rabbitq.task": "jobs.fail",
        "server.address": SERVER[0],
        "server.port": SERVER[1],
    }
    assert publish.context is not None
    trace_id = publish.context.trace_id

    processes = sorted(named(spans, "process "), key=attempt_of)
    assert [attempt_of(s) for s in processes] == [1, 2, 3]
    for span in processes:
        assert span.kind is SpanKind.CONSUMER
        assert span.context is not None and span.context.trace_id == trace_id
        assert span.parent is not None and span.parent.span_id == publish.context.span_id
        assert span.name == f"process {namespace}.tasks:jobs:{workload.work_queue}"
        assert span.attributes is not None
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.operation.type"] == "process"
        assert span.attributes["messaging.operation.name"] == "process"
        assert span.attributes["messaging.destination.name"] == (
            f"{namespace}.tasks:jobs:{workload.work_queue}"
        )
        assert span.attributes["messaging.rabbitmq.destination.routing_key"] == "jobs"
        assert span.attributes["messaging.message.id"] == "traced-1"
        assert span.attributes["rabbitq.task"] == "jobs.fail"
        assert (span.attributes["server.address"], span.attributes["server.port"]) == SERVER
        assert span.attributes["error.type"] == "tests.broker.test_tracing.Boom"
        assert span.status.status_code is StatusCode.ERROR
        [event] = [e for e in span.events if e.name == "exception"]
        assert event.attributes is not None
        assert event.attributes["exception.type"] == "tests.broker.test_tracing.Boom"
        assert event.attributes["exception.message"] == f"attempt {attempt_of(span)} failed"
    outcomes = [(s.attributes or {}).get("rabbitq.outcome") for s in processes]
    assert outcomes == ["retried", "retried", "parked"]
    assert (processes[0].attributes or {})["rabbitq.retry.tier"] == "200ms"
    assert (processes[2].attributes or {})["rabbitq.park.reason"] == "retries_exhausted"
    assert not {"messaging.destination", "messaging.operation"} & set(publish.attributes or {})

    [parked] = await drain_queue(connection, workload.parking_queue)
    traceparent = (parked.headers or {})["traceparent"]
    assert isinstance(traceparent, str)
    assert traceparent.startswith(f"00-{trace_id:032x}-{publish.context.span_id:016x}-")


async def test_child_tasks_batches_and_calls_join_the_trace_they_are_published_in(
    make_topology, url, namespace, spans
):
    """A task a handler publishes (async or sync) is a child of the handler's process span; a
    batch has a create span per message, linked from its publish span; a call's publish span
    ends at the confirm, before the handler runs."""
    topology = await make_topology(jobs={"capacity": 4})
    workload = topology.workload("jobs")
    app = App(namespace=namespace, url=url)
    done: list[int] = []

    @app.task("jobs.leaf", workload="jobs")
    def leaf(item: Item) -> int:
        if item.n == 5:  # the call's: long enough that its confirm comes while it runs
            time.sleep(0.3)
        done.append(item.n)
        return item.n

    @app.task("jobs.parent", workload="jobs")
    async def parent(item: Item) -> None:
        await leaf.publish(Item(n=item.n * 10), idempotency_key=f"leaf-{item.n * 10}")

    @app.task("jobs.sync_parent", workload="jobs")
    def sync_parent(item: Item) -> None:
        leaf.publish_sync(Item(n=item.n * 100), idempotency_key=f"leaf-{item.n * 100}")

    async with running_consumer(app, workload, url):
        await parent.publish(Item(n=1))
        await sync_parent.publish(Item(n=2))
        await app.publish_many(
            [leaf.message(Item(n=n), idempotency_key=f"leaf-{n}") for n in (3, 4)]
        )
        assert await leaf.call(Item(n=5), timeout=10, idempotency_key="leaf-5") == 5
        await wait_until(lambda: len(done) == 5, what="every leaf to run")
        await wait_until(lambda: len(named(spans, "process ")) == 7, what="seven process spans")

    finished = spans.get_finished_spans()
    by_id: dict[int, ReadableSpan] = {
        s.context.span_id: s for s in finished if s.context is not None
    }

    def process_of(n: int) -> ReadableSpan:
        span: ReadableSpan
        [span] = [
            s
            for s in finished
            if s.name.startswith("process ")
            and (s.attributes or {}).get("messaging.message.id") == f"leaf-{n}"
        ]
        return span

    def _publish_of(span: ReadableSpan) -> ReadableSpan:
        assert span.parent is not None
        return by_id[span.parent.span_id]

    # a child task: its publish span is a child of the handler's process span
    for parent_task, child_n in (("jobs.parent", 10), ("jobs.sync_parent", 200)):
        child_publish = _publish_of(process_of(child_n))
        assert child_publish.name.startswith("publish ")
        assert child_publish.parent is not None
        parent_process = by_id[child_publish.parent.span_id]
        assert parent_process.kind is SpanKind.CONSUMER
        assert (parent_process.attributes or {})["rabbitq.task"] == parent_task
        assert _publish_of(parent_process).name.startswith("publish ")
        assert child_publish.context is not None and parent_process.context is not None
        assert child_publish.context.trace_id == parent_process.context.trace_id

    # a batch: create spans carried by the messages, one publish span linked to both
    creates = [_publish_of(process_of(n)) for n in (3, 4)]
    assert {c.name for c in creates} == {f"create {namespace}.tasks:jobs"}
    assert all(c.kind is SpanKind.PRODUCER for c in creates)
    [batch] = [s for s in finished if s.kind is SpanKind.CLIENT]
    assert batch.name == f"publish {namespace}.tasks:jobs"
    assert (batch.attributes or {})["messaging.batch.message_count"] == 2
    assert ((batch.attributes or {})["server.address"], batch.attributes["server.port"]) == SERVER
    linked = {link.context.span_id for link in batch.links}
    assert linked == {c.context.span_id for c in creates if c.context is not None}

    # a call: the publish span ends at the confirm, not at the reply: while the handler still
    # sleeps (without the sleep either may end first: the broker may hold a persistent
    # message's confirm until it was acked)
    call_publish, call_process = _publish_of(process_of(5)), process_of(5)
    assert call_publish.end_time is not None and call_process.end_time is not None
    assert call_publish.end_time < call_process.end_time
    assert call_publish.status.status_code is StatusCode.UNSET
    assert (process_of(5).attributes or {})["rabbitq.outcome"] == "succeeded"


async def test_a_delayed_publish_names_its_template_not_its_delay(
    make_topology, url, namespace, spans
):
    """The ladder's key holds the delay: the span name and template leave it out."""
    topology = await make_topology(delays=True, jobs={})
    app = App(namespace=namespace, url=url)

    @app.task("jobs.later", workload="jobs")
    async def later(item: Item) -> None:
        pass

    try:
        await later.publish(Item(n=1), delay=3600)
    finally:
        await app.close()
    del topology
    [publish] = named(spans, "publish ")
    template = f"{namespace}.delay.{{level}}:{{delay}}.jobs"
    assert publish.name == f"publish {template}"
    assert (publish.attributes or {})["messaging.destination.template"] == template


BLOCKED = textwrap.dedent(
    """
    import asyncio, json, sys

    class NoOpenTelemetry:
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ImportError(f"no module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, NoOpenTelemetry())

    import aio_pika
    from pydantic import BaseModel
    import rabbitq
    from rabbitq import _tracing
    from rabbitq._topology import parse_topology

    url, namespace = sys.argv[1], sys.argv[2]
    app = rabbitq.App(namespace=namespace, url=url)
    ran = []

    class Item(BaseModel):
        n: int

    @app.task("jobs.run", workload="jobs")
    async def run(item: Item) -> None:
        ran.append(item.n)

    async def main():
        topology = parse_topology({"t.toml": "delays = false\\n[workloads.jobs]\\n"}, namespace)
        workload = topology.workload("jobs")
        await run.publish(Item(n=1))
        connection = await aio_pika.connect(url)
        channel = await connection.channel()
        queue = await channel.get_queue(workload.work_queue, ensure=False)
        message = await queue.get(no_ack=True)
        headers = sorted(message.headers)
        await connection.close()
        await run.publish(Item(n=2))
        await app.publish_many([run.message(Item(n=3))])
        consumer = rabbitq.Consumer(app, workload, url, burst=True)
        await consumer.run()
        await app.close()
        print(json.dumps({
            "enabled": _tracing.ENABLED,
            "imported": sorted(m for m in sys.modules if m.startswith("opentelemetry")),
            "headers": headers,
            "ran": sorted(ran),
            "succeeded": consumer.counts["succeeded"],
        }))

    asyncio.run(main())
    """
)


async def test_without_opentelemetry_publish_and_consume_work_and_add_no_headers(
    make_topology, url, namespace
):
    """opentelemetry not importable: tracing is off, tasks still go and run, no trace headers."""
    await make_topology(jobs={})
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", BLOCKED, url, namespace],
        capture_output=True,
        text=True,
        timeout=25,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["enabled"] is False
    assert report["imported"] == []
    assert report["headers"] == ["rabbitq-attempt", "rabbitq-published-at"]
    assert report["ran"] == [2, 3] and report["succeeded"] == 2


async def test_rabbitq_publish_is_traced_as_a_batch(
    make_topology, connection, namespace, url, spans
):
    """The CLI's publish carries a trace context once its --app module set a provider."""
    topology = await make_topology(proc=SPEC)
    result = await invoke(
        "publish", "slow", "--json", json.dumps(payload(1)), "--app", APP,
        "--namespace", namespace, "--url", url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [create] = named(spans, "create ")
    [batch] = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert [link.context.span_id for link in batch.links] == [create.context.span_id]
    assert batch.attributes is not None
    assert (batch.attributes["server.address"], batch.attributes["server.port"]) == SERVER
    [queued] = await drain_queue(connection, topology.workload("proc").work_queue)
    traceparent = (queued.headers or {})["traceparent"]
    assert isinstance(traceparent, str) and create.context is not None
    context = create.context
    assert traceparent.startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
