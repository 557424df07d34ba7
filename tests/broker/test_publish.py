"""Publishing against the real broker: confirms, returns, batches, sync callers, the wire format."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractConnection
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from rabbitq import App, NotConfirmed, Outgoing, Task, TaskContext, Unroutable
from rabbitq._metrics import Metrics
from rabbitq._pipeline import PIPELINE_CHUNK
from rabbitq._publish import Publisher
from tests.helpers import drain_queue, queue_depth, running_consumer, wait_until
from tests.ledger import close_connections_named
from tests.proxy import Proxy

WORKLOAD = {"capacity": 4, "retry": {"tiers": ["50ms"], "max_attempts": 2}}


class Item(BaseModel):
    n: int


async def _noop(item: Item) -> None:
    pass


def item_tasks(app: App) -> tuple[Task[Item, None], Task[Item, None]]:
    """`a.item` for workload a (the tests declare it) and `b.item` for b (never declared)."""
    return (app.task("a.item", workload="a")(_noop), app.task("b.item", workload="b")(_noop))


@contextlib.asynccontextmanager
async def refusing_queue(
    connection: AbstractConnection, namespace: str, routing_key: str
) -> AsyncIterator[None]:
    """A queue bound to the task exchange for `routing_key` that the broker refuses every
    message into (max length 0, reject-publish: a nack); deleted on exit."""
    name = f"{namespace}.{routing_key}.refusing"
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        await queue.bind(f"{namespace}.tasks", routing_key=routing_key)
        yield
    finally:
        await channel.queue_delete(name)
        await channel.close()


async def test_publish_to_an_unbound_workload_raises_unroutable(
    make_topology, connection, url, namespace
):
    """A task whose workload has no queue bound is returned: Unroutable, nothing queued."""
    topology = await make_topology(a=WORKLOAD)
    app = App(namespace=namespace, url=url)

    a_item, b_item = item_tasks(app)

    try:
        with pytest.raises(Unroutable) as caught:
            await b_item.publish(Item(n=1), idempotency_key="lost-1")
        assert caught.value.message_id == "lost-1"
        assert caught.value.exchange == f"{namespace}.tasks"
        assert caught.value.routing_key == "b"
        assert "rabbitq topology apply" in str(caught.value)
        # the publisher still works after a return
        await a_item.publish(Item(n=2))
    finally:
        await app.close()
    assert await queue_depth(connection, topology.workload("a").work_queue) == 1


async def test_publish_to_a_namespace_without_exchange_raises_unroutable(
    make_topology, url, namespace
):
    """Publishing into a namespace whose exchange does not exist raises Unroutable too."""
    await make_topology(a=WORKLOAD)
    missing_namespace = f"{namespace}-missing"
    app = App(namespace=missing_namespace, url=url)

    a_item, _ = item_tasks(app)

    try:
        for _ in range(2):  # the second publish finds the publisher's channel reopened
            with pytest.raises(Unroutable) as caught:
                await a_item.publish(Item(n=1))
            assert caught.value.exchange == f"{missing_namespace}.tasks"
            assert caught.value.routing_key == "a"
    finally:
        await app.close()


async def test_publish_returns_after_the_confirm(make_topology, connection, url, namespace):
    """Once `publish` returns, the message is already counted in the work queue."""
    topology = await make_topology(a=WORKLOAD)
    work_queue = topology.workload("a").work_queue
    app = App(namespace=namespace, url=url)

    a_item, _ = item_tasks(app)

    try:
        for expected in (1, 2, 3):
            await a_item.publish(Item(n=expected))
            assert await queue_depth(connection, work_queue) == expected
    finally:
        await app.close()


async def test_publish_raises_not_confirmed_when_the_broker_nacks(
    make_topology, connection, url, namespace
):
    """A publish the broker nacks (a full reject-publish queue) raises NotConfirmed."""
    await make_topology(a=WORKLOAD)
    app = App(namespace=namespace, url=url)
    a_item, _ = item_tasks(app)
    async with refusing_queue(connection, namespace, "a"):
        try:
            with pytest.raises(NotConfirmed) as caught:
                await a_item.publish(Item(n=1), idempotency_key="nacked-1")
        finally:
            await app.close()
    assert caught.value.message_id == "nacked-1"
    assert "nacked" in caught.value.reason


async def test_publish_many_queues_the_whole_batch(make_topology, connection, url, namespace):
    """`publish_many` of 100 messages returns 100 distinct ids once all 100 are queued."""
    topology = await make_topology(a=WORKLOAD)
    app = App(namespace=namespace, url=url)

    a_item, _ = item_tasks(app)

    try:
        ids = await app.publish_many([a_item.message(Item(n=n)) for n in range(100)])
        assert await queue_depth(connection, topology.workload("a").work_queue) == 100
    finally:
        await app.close()
    assert len(set(ids)) == 100
    queued = await drain_queue(connection, topology.workload("a").work_queue)
    assert sorted(m.message_id for m in queued if m.message_id) == sorted(ids)


async def test_publish_many_raises_the_first_return_and_queues_the_rest(
    make_topology, connection, url, namespace
):
    """In a batch with unroutable messages, the routable ones are queued and Unroutable raised."""
    topology = await make_topology(a=WORKLOAD)
    app = App(namespace=namespace, url=url)

    a_item, b_item = item_tasks(app)

    batch = [a_item.message(Item(n=n)) for n in range(10)]
    batch[3] = b_item.message(Item(n=3), idempotency_key="lost-3")
    batch[7] = b_item.message(Item(n=7), idempotency_key="lost-7")
    try:
        with pytest.raises(Unroutable) as caught:
            await app.publish_many(batch)
    finally:
        await app.close()
    assert caught.value.message_id == "lost-3"
    assert any("1 more of the 10" in note for note in caught.value.__notes__)
    assert await queue_depth(connection, topology.workload("a").work_queue) == 8


SYNC_SCRIPT = textwrap.dedent(
    """\
    import sys

    from pydantic import BaseModel

    import rabbitq

    namespace, url, n = sys.argv[1:]
    app = rabbitq.App(namespace=namespace, url=url)


    class Item(BaseModel):
        n: int


    @app.task("sync.item", workload="w")
    def item(payload: Item) -> None:
        pass


    print(item.publish_sync(Item(n=int(n))))
    """
)


async def test_publish_sync_from_a_script_without_an_event_loop(
    make_topology, tmp_path, url, namespace
):
    """A plain script publishes with `publish_sync`, exits by itself, and the task runs."""
    topology = await make_topology(w=WORKLOAD)
    script = tmp_path / "publish_sync.py"
    script.write_text(SYNC_SCRIPT)

    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(script), namespace, url, "41"],
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert (result.returncode, result.stderr) == (0, "")
    published_id = result.stdout.strip()
    assert published_id
    app = App(namespace=namespace, url=url)
    ran: list[tuple[str, int]] = []

    @app.task("sync.item", workload="w")
    async def item(payload: Item, ctx: TaskContext) -> None:
        ran.append((ctx.message_id, payload.n))

    async with running_consumer(app, topology.workload("w"), url):
        await wait_until(lambda: bool(ran), what="the task published by the script to run")
    assert ran == [(published_id, 41)]


ASYNC_SCRIPT = textwrap.dedent(
    """\
    import asyncio
    import sys

    import uvloop
    from pydantic import BaseModel

    import rabbitq

    namespace, url, loop = sys.argv[1:]
    app = rabbitq.App(namespace=namespace, url=url)


    class Item(BaseModel):
        n: int


    @app.task("sync.item", workload="w")
    async def item(payload: Item) -> None:
        pass


    async def main() -> None:
        print(await item.publish(Item(n=1)), flush=True)
        if loop == "asyncio-then-broker-gone":
            await asyncio.to_thread(sys.stdin.readline)  # meanwhile the test cuts the broker off


    if loop == "asyncio-after-publish-sync":  # the app's publisher moves to another loop
        item.publish_sync(Item(n=0))
    (uvloop.run if loop == "uvloop" else asyncio.run)(main())
    """
)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop", "asyncio-after-publish-sync"])
async def test_a_script_that_publishes_and_never_closes_the_app_exits_quietly(
    make_topology, tmp_path, url, namespace, loop
):
    """`await publish()` under asyncio.run (or uvloop.run) without `app.close()` exits 0 and
    prints nothing: the app closes its publisher when the loop cancels the tasks left (and the
    one `publish_sync` opened before, when it moves to the new loop)."""
    await make_topology(w=WORKLOAD)
    script = tmp_path / "publish_async.py"
    script.write_text(ASYNC_SCRIPT)

    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(script), namespace, url, loop],
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.strip()


async def test_a_script_whose_broker_is_gone_exits_at_once_without_closing_the_app(
    make_topology, tmp_path, url, namespace
):
    """The app's own close at exit does not wait for a broker that dropped the connection."""
    await make_topology(w=WORKLOAD)
    parts = urlsplit(url)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    await proxy.start()
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}"
    script = tmp_path / "publish_async.py"
    script.write_text(ASYNC_SCRIPT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        namespace,
        urlunsplit(parts._replace(netloc=netloc)),
        "asyncio-then-broker-gone",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip()
        await proxy.cut()
        proc.stdin.write(b"exit now\n")
        await proc.stdin.drain()
        assert await asyncio.wait_for(proc.wait(), 5) == 0
    finally:
        await proxy.cut()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def close_sync_and_its_loop(app: App) -> None:
    """`app.close_sync()`: stops and closes the loop thread `publish_sync` started."""
    await asyncio.to_thread(app.close_sync)


async def test_close_sync_closes_the_event_loop_publish_sync_started(make_topology, url, namespace):
    """After `close_sync`, the loop thread that `publish_sync` started is stopped and closed."""
    await make_topology(w=WORKLOAD)
    app = App(namespace=namespace, url=url)

    @app.task("sync.item", workload="w")
    def publish_item(payload: Item) -> None:
        pass

    await asyncio.to_thread(publish_item.publish_sync, Item(n=1))
    loop_thread = app._loop_thread
    assert loop_thread is not None
    await asyncio.to_thread(app.close_sync)
    try:
        assert not loop_thread.thread.is_alive()
        assert loop_thread.loop.is_closed(), "close_sync left its event loop open"
    finally:
        if not loop_thread.loop.is_closed():
            loop_thread.loop.close()


async def test_publish_sync_from_a_plain_thread(make_topology, url, namespace):
    """`publish_sync` called from a thread with no event loop is confirmed and the task runs."""
    topology = await make_topology(w=WORKLOAD)
    publisher_app = App(namespace=namespace, url=url)

    @publisher_app.task("sync.item", workload="w")
    def publish_item(payload: Item) -> None:
        pass

    results: list[str] = []
    errors: list[BaseException] = []

    def publish_from_thread() -> None:
        try:
            results.append(publish_item.publish_sync(Item(n=42)))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=publish_from_thread, name="plain-publisher")
    thread.start()
    await wait_until(lambda: not thread.is_alive(), what="publish_sync in the thread to return")
    assert errors == []
    await close_sync_and_its_loop(publisher_app)
    app = App(namespace=namespace, url=url)
    ran: list[tuple[str, int]] = []

    @app.task("sync.item", workload="w")
    async def item(payload: Item, ctx: TaskContext) -> None:
        ran.append((ctx.message_id, payload.n))

    async with running_consumer(app, topology.workload("w"), url):
        await wait_until(lambda: bool(ran), what="the task published from the thread to run")
    assert ran == [(results[0], 42)]


def _wire_message(message_id: str, n: int, headers: dict[str, Any]) -> aio_pika.Message:
    """A task message built only from the wire format in rabbitq/_wire.py's docstring."""
    return aio_pika.Message(
        json.dumps({"n": n}).encode(),
        content_type="application/json",
        message_id=message_id,
        timestamp=datetime.now(UTC),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        type="wire.item",
        headers=headers,
    )


async def test_a_task_published_by_plain_aio_pika_runs(make_topology, connection, url, namespace):
    """Messages in the documented wire format, with or without a deadline, run their handler."""
    topology = await make_topology(w=WORKLOAD)
    workload = topology.workload("w")
    deadline_ms = int((time.time() + 120) * 1000)
    app = App(namespace=namespace, url=url)
    ran: dict[str, tuple[int, int, float | None]] = {}

    @app.task("wire.item", workload="w")
    async def wire_item(payload: Item, ctx: TaskContext) -> None:
        ran[ctx.message_id] = (payload.n, ctx.attempt, ctx.deadline)

    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await channel.get_exchange(f"{namespace}.tasks")
    await exchange.publish(
        _wire_message("wire-plain", 1, {"rabbitq-attempt": 1}), routing_key="w", mandatory=True
    )
    await exchange.publish(
        _wire_message("wire-deadline", 2, {"rabbitq-attempt": 1, "rabbitq-deadline": deadline_ms}),
        routing_key="w",
        mandatory=True,
    )
    await channel.close()

    async with running_consumer(app, workload, url) as consumer:
        await wait_until(lambda: consumer.counts["succeeded"] == 2, what="both tasks to be acked")
    assert ran == {
        "wire-plain": (1, 1, None),
        "wire-deadline": (2, 1, deadline_ms / 1000),
    }
    assert await queue_depth(connection, workload.work_queue) == 0
    assert await queue_depth(connection, workload.parking_queue) == 0


async def test_publish_sends_the_documented_wire_format(make_topology, connection, url, namespace):
    """What `publish` sends is exactly what rabbitq/_wire.py's docstring describes."""
    topology = await make_topology(w={**WORKLOAD, "max_priority": 5})
    app = App(namespace=namespace, url=url)

    @app.task("wire.item", workload="w")
    async def wire_item(payload: Item) -> None:
        pass

    before = time.time()
    try:
        await wire_item.publish(Item(n=3), idempotency_key="key-3", priority=2)
        await wire_item.publish(Item(n=4), deadline=datetime.fromtimestamp(before + 60, UTC))
    finally:
        await app.close()

    first, second = await drain_queue(connection, topology.workload("w").work_queue)
    assert json.loads(first.body) == {"n": 3}
    assert first.content_type == "application/json"
    assert first.message_id == "key-3"
    assert first.type == "wire.item"
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert first.priority == 2
    assert first.timestamp is not None and abs(first.timestamp.timestamp() - before) < 5
    assert first.headers is not None
    published_ms = first.headers.pop("rabbitq-published-at")
    assert isinstance(published_ms, int) and abs(published_ms / 1000 - before) < 5
    assert first.headers == {"rabbitq-attempt": 1}
    assert first.exchange == f"{namespace}.tasks" and first.routing_key == "w"
    assert json.loads(second.body) == {"n": 4}
    assert second.message_id and second.message_id != "key-3"
    assert second.headers is not None
    second.headers.pop("rabbitq-published-at")
    assert second.headers == {"rabbitq-attempt": 1, "rabbitq-deadline": int((before + 60) * 1000)}


async def test_handlers_publish_child_tasks_over_the_consumer_connection(
    make_topology, monkeypatch, url, namespace
):
    """An async handler awaiting `publish` and a sync one calling `publish_sync` both get run."""
    topology = await make_topology(w=WORKLOAD)
    app = App(namespace=namespace, url=url)
    children: list[str] = []

    @app.task("child", workload="w")
    async def child(item: Item, ctx: TaskContext) -> None:
        children.append(f"child of {item.n}")

    @app.task("parent.async", workload="w")
    async def parent_async(item: Item) -> None:
        await child.publish(Item(n=item.n))

    @app.task("parent.sync", workload="w")
    def parent_sync(item: Item) -> None:
        assert threading.current_thread() is not threading.main_thread()
        child.publish_sync(Item(n=item.n))

    async with running_consumer(app, topology.workload("w"), url) as consumer:
        sent: Counter[str | None] = Counter()
        send = consumer.publisher.send

        async def counting_send(out: Outgoing) -> None:
            sent[out.task] += 1
            await send(out)

        monkeypatch.setattr(consumer.publisher, "send", counting_send)
        await parent_async.publish(Item(n=1))
        await parent_sync.publish(Item(n=2))
        await wait_until(lambda: consumer.counts["succeeded"] == 4, what="parents and children")
    assert sorted(children) == ["child of 1", "child of 2"]
    assert sent == {"parent.async": 1, "parent.sync": 1, "child": 2}


class Blob(BaseModel):
    n: int
    data: str


async def test_publish_many_reports_every_message_in_order(
    make_topology, connection, url, namespace
):
    """Across several write chunks, each returned message gets its own Unroutable, in order."""
    topology = await make_topology(a=WORKLOAD)
    app = App(namespace=namespace, url=url)

    a_item, b_item = item_tasks(app)

    lost = [0, 5, PIPELINE_CHUNK - 1, PIPELINE_CHUNK, 2 * PIPELINE_CHUNK + 1, 599]
    batch = [(b_item if n in lost else a_item).message(Item(n=n)) for n in range(600)]
    publisher = await app.publisher()
    try:
        errors = await publisher.send_many(batch)
        channel = publisher._underlay
        assert isinstance(channel, aiormq.Channel)
        # nothing is left in aiormq's bookkeeping once the batch is settled
        await wait_until(
            lambda: not channel.confirmations and not channel.message_id_delivery_tag,
            what="the channel's confirm bookkeeping to empty",
        )
    finally:
        await app.close()
    assert [n for n, e in enumerate(errors) if e is not None] == lost
    for n in lost:
        error = errors[n]
        assert isinstance(error, Unroutable) and error.message_id == batch[n].message_id
        assert error.routing_key == "b"
    queued = await drain_queue(connection, topology.workload("a").work_queue)
    assert [json.loads(m.body)["n"] for m in queued] == [n for n in range(600) if n not in lost]


async def test_publish_many_reports_nacks_per_message(make_topology, connection, url, namespace):
    """In a batch, the messages a full reject-publish queue refuses are NotConfirmed, only them."""
    topology = await make_topology(a=WORKLOAD)
    app = App(namespace=namespace, url=url)
    a_item, _ = item_tasks(app)
    full_item = app.task("full.item", workload="full")(_noop)
    batch = [(full_item if n % 3 == 0 else a_item).message(Item(n=n)) for n in range(300)]
    async with refusing_queue(connection, namespace, "full"):
        try:
            errors = await (await app.publisher()).send_many(batch)
        finally:
            await app.close()
    for n, error in enumerate(errors):
        if n % 3 == 0:
            assert isinstance(error, NotConfirmed) and "nacked" in error.reason, (n, error)
            assert error.message_id == batch[n].message_id
        else:
            assert error is None, (n, error)
    assert await queue_depth(connection, topology.workload("a").work_queue) == 200


async def test_publish_many_into_a_missing_exchange_fails_every_message_at_once(
    make_topology, url, namespace
):
    """The broker closes the channel (no such exchange): every message is Unroutable at once,
    not after the confirm timeout, and the publisher works again afterwards."""
    await make_topology(a=WORKLOAD)
    app = App(namespace=f"{namespace}-missing", url=url)

    a_item, _ = item_tasks(app)

    publisher = await app.publisher()
    try:
        for _ in range(2):  # the second batch finds the publisher's channel reopened
            started = time.monotonic()
            errors = await publisher.send_many([a_item.message(Item(n=n)) for n in range(500)])
            assert time.monotonic() - started < 10
            assert all(isinstance(e, Unroutable) for e in errors), errors[:3]
        app.namespace = namespace
        assert await publisher.send_many([a_item.message(Item(n=1))]) == [None]
    finally:
        await app.close()


async def test_publish_many_sends_bodies_larger_than_a_frame(
    make_topology, connection, url, namespace
):
    """Bodies over the negotiated frame size go out split, among small ones, intact."""
    topology = await make_topology(a=WORKLOAD)
    app = App(namespace=namespace, url=url)

    @app.task("a.blob", workload="a")
    async def a_blob(blob: Blob) -> None:
        pass

    sizes = [10, 300_000, 0, 131_072, 131_064, 131_063, 1_000_000] + [50] * 300
    blobs = [Blob(n=n, data="x" * size) for n, size in enumerate(sizes)]
    try:
        ids = await app.publish_many([a_blob.message(b) for b in blobs])
    finally:
        await app.close()
    queued = await drain_queue(connection, topology.workload("a").work_queue)
    assert [m.message_id for m in queued] == ids
    assert [Blob.model_validate_json(m.body) for m in queued] == blobs


async def test_publish_many_matches_returns_to_messages_that_share_an_id(
    make_topology, connection, url, namespace
):
    """aiormq finds a returned publish by message id: a batch that repeats an idempotency key
    still reports the returned copy, not its routable namesake."""
    topology = await make_topology(a=WORKLOAD)
    app = App(namespace=namespace, url=url)

    a_item, b_item = item_tasks(app)

    batch = [
        b_item.message(Item(n=0), idempotency_key="k1"),  # returned
        a_item.message(Item(n=1), idempotency_key="k1"),
        a_item.message(Item(n=2), idempotency_key="k2"),
        b_item.message(Item(n=3), idempotency_key="k2"),  # returned
        b_item.message(Item(n=4), idempotency_key="k3"),  # returned
        b_item.message(Item(n=5), idempotency_key="k3"),  # returned
        *(a_item.message(Item(n=n)) for n in range(6, 300)),
        a_item.message(Item(n=300), idempotency_key="k1"),
    ]
    try:
        errors = await (await app.publisher()).send_many(batch)
    finally:
        await app.close()
    assert [n for n, e in enumerate(errors) if e is not None] == [0, 3, 4, 5]
    assert all(isinstance(errors[n], Unroutable) for n in (0, 3, 4, 5))
    queued = await drain_queue(connection, topology.workload("a").work_queue)
    assert [json.loads(m.body)["n"] for m in queued] == [1, 2, *range(6, 301)]


async def test_publish_many_fails_what_is_in_flight_at_once_when_the_connection_closes(
    make_topology, url, namespace
):
    """A connection lost mid-batch: every unconfirmed message is NotConfirmed at once, not
    after the confirm timeout; the confirmed ones stay confirmed; the next batch reconnects."""
    await make_topology(a=WORKLOAD)
    app = App(namespace=namespace, url=url)

    a_item, _ = item_tasks(app)

    publisher = await app.publisher()
    try:
        await publisher.start()
        channel = publisher._underlay
        assert isinstance(channel, aiormq.Channel) and publisher._connection is not None
        batch = [a_item.message(Item(n=n)) for n in range(5000)]
        started = time.monotonic()
        sending = asyncio.create_task(publisher.send_many(batch))
        await wait_until(
            lambda: channel.delivery_tag > 0, interval=0.001, what="the first chunk to be written"
        )
        await publisher._connection.close()
        errors = await sending
        assert time.monotonic() - started < 10
        failed = [e for e in errors if e is not None]
        assert failed, "the connection closed after the whole batch was confirmed"
        assert all(isinstance(e, NotConfirmed) for e in failed), failed[:3]
        assert await publisher.send_many(batch[:10]) == [None] * 10
    finally:
        await app.close()


async def test_a_cancelled_publish_many_leaves_the_publisher_usable(make_topology, url, namespace):
    """Cancelling a batch mid-way: later batches confirm, and aiormq's bookkeeping empties."""
    await make_topology(a=WORKLOAD)
    app = App(namespace=namespace, url=url)

    a_item, _ = item_tasks(app)

    publisher = await app.publisher()
    try:
        await publisher.start()
        channel = publisher._underlay
        assert isinstance(channel, aiormq.Channel)
        sending = asyncio.create_task(
            publisher.send_many([a_item.message(Item(n=n)) for n in range(3000)])
        )
        await wait_until(
            lambda: channel.delivery_tag > 0, interval=0.001, what="the first chunk to be written"
        )
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        assert (
            await publisher.send_many([a_item.message(Item(n=n)) for n in range(10)]) == [None] * 10
        )
        await wait_until(
            lambda: not channel.confirmations and not channel.message_id_delivery_tag,
            what="the channel's confirm bookkeeping to empty",
        )
    finally:
        await app.close()


async def test_publish_many_counts_every_message_like_publish_does(
    make_topology, connection, url, namespace
):
    """With metrics, a batch counts each message's outcome and confirm latency, per message."""
    await make_topology(a=WORKLOAD)
    registry = CollectorRegistry()
    app = App(namespace=namespace, url=url, metrics=Metrics(registry))
    tasks = {name: app.task(f"{name}.item", workload=name)(_noop) for name in ("a", "b", "full")}
    kinds = ["a"] * 250 + ["b"] * 30 + ["full"] * 20
    async with refusing_queue(connection, namespace, "full"):
        try:
            errors = await (await app.publisher()).send_many(
                [tasks[k].message(Item(n=n)) for n, k in enumerate(kinds)]
            )
        finally:
            await app.close()
    assert [type(e).__name__ for e in errors] == (
        ["NoneType"] * 250 + ["Unroutable"] * 30 + ["NotConfirmed"] * 20
    )

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"kind": "task", **labels})

    assert sample("rabbitq_publishes_total", outcome="confirmed") == 250
    assert sample("rabbitq_publishes_total", outcome="returned") == 30
    assert sample("rabbitq_publishes_total", outcome="nacked") == 20
    assert sample("rabbitq_publish_confirm_seconds_count") == 250
    total = sample("rabbitq_publish_confirm_seconds_sum")
    assert total is not None and 0 < total / 250 < 10


async def test_a_connection_the_broker_dropped_is_closed_before_it_is_replaced(
    make_topology, url, namespace
):
    """The broker drops the publisher's connection: the next publish reconnects, and the old
    connection was closed (no `coroutine 'Connection.close' was never awaited` when collected)."""
    await make_topology(a=WORKLOAD)
    app = App(namespace=namespace, url=url)
    a_item, _ = item_tasks(app)
    publisher = Publisher(url, name=f"test-publisher {namespace}")
    try:
        await publisher.send(a_item.message(Item(n=1)))
        assert await close_connections_named(f"test-publisher {namespace} on ") == 1
        await wait_until(lambda: not publisher.is_connected, what="the publisher to see the close")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await publisher.send(a_item.message(Item(n=2)))
            # Finalizers run in the thread that collects; in a sync handler's thread, aio-pika's
            # __del__ has no loop to schedule the close it starts.
            await asyncio.to_thread(gc.collect)
        assert [str(w.message) for w in caught] == []
    finally:
        await publisher.close()
        await app.close()
