"""Calls against the real broker: a task's result comes back over direct reply-to."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import timedelta
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from pydantic import BaseModel

import rabbitq
from rabbitq import App, Park, TaskContext
from rabbitq._reply import HEADER_OUTCOME, REPLY_TO_PREFIX
from tests.helpers import queue_depth, running_consumer, wait_until
from tests.ledger import close_connections_named

FAST_RETRY = {"tiers": ["50ms"], "max_attempts": 2}


class Item(BaseModel):
    n: int


class Doubled(BaseModel):
    n: int
    doubled: int


def double_app(
    namespace: str, url: str, shuffle: bool = False
) -> tuple[App, rabbitq.Task[Any, Any]]:
    """An app with one task that returns its input doubled, as a model; with `shuffle`, the
    tasks finish out of order (each sleeps 0 to 9 ms, by its input)."""
    app = App(namespace=namespace, url=url)

    @app.task("calc.double", workload="calc")
    async def double(item: Item) -> Doubled:
        if shuffle:
            await asyncio.sleep(item.n * 7919 % 10 / 1000)
        return Doubled(n=item.n, doubled=2 * item.n)

    return app, double


async def test_call_returns_the_handlers_model_and_json_types(make_topology, url, namespace):
    """`call` returns a pydantic model, an int and a dict, each validated as annotated; a task
    annotated `-> None` returns None."""
    topology = await make_topology(calc={"capacity": 4})
    app, double = double_app(namespace, url)

    @app.task("calc.square", workload="calc")
    async def square(item: Item) -> int:
        return item.n * item.n

    @app.task("calc.describe", workload="calc")
    def describe(item: Item) -> dict[str, list[int]]:  # a sync handler, in a thread
        return {"digits": [int(d) for d in str(item.n)]}

    @app.task("calc.nothing", workload="calc")
    async def nothing(item: Item) -> None:
        return None

    async with running_consumer(app, topology.workload("calc"), url) as consumer:
        assert await double.call(Item(n=21), timeout=10) == Doubled(n=21, doubled=42)
        assert await square.call({"n": 7}, timeout=10) == 49
        assert await describe.call(Item(n=305), timeout=10) == {"digits": [3, 0, 5]}
        assert await nothing.call(Item(n=1), timeout=10) is None
        await wait_until(lambda: consumer.counts["succeeded"] == 4, what="4 acks")


async def test_a_call_that_times_out_raises_call_timeout_and_the_task_still_completes(
    make_topology, connection, url, namespace
):
    """A handler slower than the call's timeout: CallTimeout (a TimeoutError too), which says
    the task may still run; the task does run to its end and is acked."""
    topology = await make_topology(calc={"capacity": 2})
    workload = topology.workload("calc")
    app = App(namespace=namespace, url=url)
    finished = asyncio.Event()

    @app.task("calc.slow", workload="calc")
    async def slow(item: Item) -> int:
        await asyncio.sleep(1.0)
        finished.set()
        return item.n

    async with running_consumer(app, workload, url) as consumer:
        started = time.monotonic()
        with pytest.raises(rabbitq.CallTimeout) as caught:
            await slow.call(Item(n=1), timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 1.0
        assert isinstance(caught.value, TimeoutError)
        assert "may still run" in str(caught.value)
        assert caught.value.task == "calc.slow"
        await asyncio.wait_for(finished.wait(), timeout=10)
        await wait_until(lambda: consumer.counts["succeeded"] == 1, what="the slow task's ack")
        assert consumer.reconnects == 0
    assert await queue_depth(connection, workload.work_queue) == 0
    assert await queue_depth(connection, workload.parking_queue) == 0


async def test_a_parked_task_raises_task_failed_with_its_reason_and_error(
    make_topology, url, namespace
):
    """Park by the handler, retries exhausted, and an expired deadline (poison: it never ran)
    each raise TaskFailed with the parked copy's reason, error type and error."""
    topology = await make_topology(calc={"capacity": 4, "retry": FAST_RETRY})
    app = App(namespace=namespace, url=url)

    @app.task("calc.refuse", workload="calc")
    async def refuse(item: Item) -> int:
        raise Park(f"item {item.n} is not wanted")

    @app.task("calc.broken", workload="calc")
    async def broken(item: Item) -> int:
        raise ValueError(f"cannot handle {item.n}")

    async with running_consumer(app, topology.workload("calc"), url) as consumer:
        with pytest.raises(rabbitq.TaskFailed) as parked:
            await refuse.call(Item(n=3), timeout=10)
        assert (parked.value.reason, parked.value.error_type) == ("parked_by_handler", "Park")
        assert parked.value.error == "item 3 is not wanted"

        with pytest.raises(rabbitq.TaskFailed) as exhausted:
            await broken.call(Item(n=4), timeout=10, idempotency_key="broken-4")
        assert exhausted.value.reason == "retries_exhausted"
        assert (exhausted.value.error_type, exhausted.value.error) == (
            "ValueError",
            "cannot handle 4",
        )
        assert exhausted.value.message_id == "broken-4"
        assert isinstance(exhausted.value, rabbitq.CallError)

        with pytest.raises(rabbitq.TaskFailed) as expired:
            await broken.call(Item(n=5), timeout=10, deadline=timedelta(seconds=-1))
        assert (expired.value.reason, expired.value.error_type) == ("expired", "Poison")
        await wait_until(lambda: consumer.counts.total() >= 4, what="3 parked and a retry")
        assert consumer.counts["retried"] == 1  # the exhausted one's first attempt: no reply


async def test_a_retried_task_keeps_the_caller_waiting_for_its_final_result(
    make_topology, url, namespace
):
    """A handler that fails on its first attempt and succeeds on its second: the call returns
    the second attempt's result (the retry sent no reply)."""
    topology = await make_topology(calc={"capacity": 2, "retry": {"tiers": ["50ms"]}})
    app = App(namespace=namespace, url=url)

    @app.task("calc.flaky", workload="calc")
    async def flaky(item: Item, ctx: TaskContext) -> dict[str, int]:
        if ctx.attempt == 1:
            raise ConnectionError("not yet")
        return {"n": item.n, "attempt": ctx.attempt}

    async with running_consumer(app, topology.workload("calc"), url) as consumer:
        assert await flaky.call(Item(n=9), timeout=10) == {"n": 9, "attempt": 2}
        assert consumer.counts["retried"] == 1


async def test_call_sync_works_from_sync_code_and_from_a_sync_handler(
    make_topology, url, namespace
):
    """`call_sync` from a thread with no loop returns the result; so does a sync handler that
    calls another task inside the running consumer (over the consumer's publisher)."""
    topology = await make_topology(calc={"capacity": 4})
    app, double = double_app(namespace, url)

    @app.task("calc.quadruple", workload="calc")
    def quadruple(item: Item) -> int:
        once = double.call_sync(Item(n=item.n), timeout=10)
        return int(double.call_sync({"n": once.doubled}, timeout=10).doubled)

    caller_app, caller_double = double_app(namespace, url)  # another process's app, as it were
    async with running_consumer(app, topology.workload("calc"), url):
        result = await asyncio.to_thread(caller_double.call_sync, Item(n=5), timeout=10)
        assert result == Doubled(n=5, doubled=10)
        assert await asyncio.to_thread(quadruple.call_sync, Item(n=3), timeout=10) == 12
    await asyncio.to_thread(caller_app.close_sync)


async def test_a_thousand_concurrent_calls_each_get_their_own_result(make_topology, url, namespace):
    """1,000 calls at once from one process (one caller channel), finishing out of order:
    each returns its own input doubled."""
    topology = await make_topology(calc={"capacity": 64})
    app, _ = double_app(namespace, url, shuffle=True)
    caller_app, double = double_app(namespace, url)
    try:
        async with running_consumer(app, topology.workload("calc"), url):
            results = await asyncio.gather(
                *(double.call(Item(n=n), timeout=30) for n in range(1000))
            )
        assert [r.doubled for r in results] == [2 * n for n in range(1000)]
        assert [r.n for r in results] == list(range(1000))
    finally:
        await caller_app.close()


async def test_a_caller_that_goes_away_does_not_disturb_the_consumer(
    make_topology, connection, url, namespace
):
    """The caller's connection closes while its task runs: the task completes and is acked,
    its reply is dropped, and the consumer keeps its connection and serves the next call."""
    topology = await make_topology(calc={"capacity": 2})
    workload = topology.workload("calc")
    app = App(namespace=namespace, url=url)
    release = asyncio.Event()

    @app.task("calc.wait", workload="calc")
    async def wait(item: Item) -> int:
        await release.wait()
        return item.n

    caller_app = App(namespace=namespace, url=url)
    caller_wait = caller_app.task("calc.wait", workload="calc")(wait.definition.fn)
    (await caller_app.publisher()).name = f"caller {namespace}"  # so the broker can close it
    async with running_consumer(app, workload, url) as consumer:
        call = asyncio.create_task(caller_wait.call(Item(n=1), timeout=30))
        await wait_until(lambda: consumer.running == 1, what="the task running")
        assert await close_connections_named(f"caller {namespace}") == 1
        with pytest.raises(rabbitq.CallLost, match="may still run"):
            await asyncio.wait_for(call, timeout=10)
        release.set()
        await wait_until(lambda: consumer.counts["succeeded"] == 1, what="the task's ack")
        # the next call from the same app opens a new channel, lazily
        assert await caller_wait.call(Item(n=2), timeout=10) == 2
        assert consumer.reconnects == 0 and consumer.counts["succeeded"] == 2
    await caller_app.close()
    assert await queue_depth(connection, workload.work_queue) == 0
    assert await queue_depth(connection, workload.parking_queue) == 0


async def _answer(connection: AbstractConnection, queue: str, replies: list[Any]) -> None:
    """Act as a foreign responder: take one request and send back `replies`, in order, each a
    (body, headers, correlation id or None for the request's)."""
    channel = await connection.channel()
    try:
        work = await channel.get_queue(queue, ensure=False)
        got: list[AbstractIncomingMessage] = []

        async def take() -> bool:
            if (message := await work.get(fail=False)) is not None:
                got.append(message)
            return bool(got)

        await wait_until(take, what="the request")
        request = got[0]
        assert request.reply_to is not None
        assert request.reply_to.startswith(REPLY_TO_PREFIX)
        for body, headers, correlation_id in replies:
            message = aio_pika.Message(
                body, headers=headers, correlation_id=correlation_id or request.correlation_id
            )
            await channel.default_exchange.publish(message, routing_key=request.reply_to)
        await request.ack()
    finally:
        await channel.close()


@pytest.mark.parametrize(
    ("body", "headers", "problem"),
    [
        (b'"forty-two"', {HEADER_OUTCOME: "succeeded"}, "valid integer"),
        (b"{not json", {HEADER_OUTCOME: "succeeded"}, "Invalid JSON"),
        (b"42", {}, "'rabbitq-outcome' is None"),
        (b"42", {HEADER_OUTCOME: "maybe"}, "'rabbitq-outcome' is 'maybe'"),
    ],
)
async def test_an_untrusted_reply_raises_reply_invalid_and_strays_are_ignored(
    make_topology, connection, url, namespace, body, headers, problem
):
    """A reply that is not a result of the task's type raises ReplyInvalid; a reply with an
    unknown correlation id, sent first, is ignored."""
    topology = await make_topology(calc={"capacity": 1})
    app = App(namespace=namespace, url=url)

    @app.task("calc.answer", workload="calc")
    async def answer(item: Item) -> int:
        return item.n

    stray = (b"7", {HEADER_OUTCOME: "succeeded"}, "not-a-call-of-ours")
    responder = asyncio.create_task(
        _answer(connection, topology.workload("calc").work_queue, [stray, (body, headers, None)])
    )
    try:
        with pytest.raises(rabbitq.ReplyInvalid, match=problem):
            await answer.call(Item(n=1), timeout=10)
        await responder
    finally:
        await app.close()


async def test_a_call_to_a_workload_with_no_queue_raises_unroutable(url, namespace, make_topology):
    """As `publish`: nothing is bound for the workload, so the call fails at once."""
    await make_topology(calc={"capacity": 1})
    app = App(namespace=namespace, url=url)

    @app.task("other.task", workload="other")
    async def other(item: Item) -> int:
        return item.n

    try:
        with pytest.raises(rabbitq.Unroutable):
            await other.call(Item(n=1), timeout=5)
    finally:
        await app.close()


async def test_a_task_unknown_to_the_consumer_raises_task_failed_as_poison(
    make_topology, url, namespace
):
    """The caller's app knows a task the consumer's does not: it is parked as unknown_task, and
    the caller hears so."""
    topology = await make_topology(calc={"capacity": 1})
    app = App(namespace=namespace, url=url)  # the consumer's: no tasks
    caller_app = App(namespace=namespace, url=url)

    @caller_app.task("calc.missing", workload="calc")
    async def missing(item: Item) -> int:
        return item.n

    try:
        async with running_consumer(app, topology.workload("calc"), url):
            with pytest.raises(rabbitq.TaskFailed) as caught:
                await missing.call(Item(n=1), timeout=10)
        assert (caught.value.reason, caught.value.error_type) == ("unknown_task", "Poison")
        assert "calc.missing" in caught.value.error
    finally:
        await caller_app.close()


async def test_a_reply_to_that_names_a_queue_gets_no_reply(
    make_topology, connection, url, namespace
):
    """Only direct reply-to is answered: a task whose reply_to names a queue runs and is acked,
    and nothing is published into that queue."""
    topology = await make_topology(calc={"capacity": 1})
    app, double = double_app(namespace, url)
    channel = await connection.channel()
    target = await channel.declare_queue("", exclusive=True)
    message = dataclasses.replace(
        double.message(Item(n=1)), properties={"reply_to": target.name, "correlation_id": "c1"}
    )
    async with running_consumer(app, topology.workload("calc"), url) as consumer:
        await app.publish_many([message])
        await wait_until(lambda: consumer.counts["succeeded"] == 1, what="the task's ack")
        settler = consumer._settler  # the replies it has on their way
        await wait_until(lambda: not settler.replies, what="no reply on its way")
    assert await queue_depth(connection, target.name) == 0
    await channel.close()
