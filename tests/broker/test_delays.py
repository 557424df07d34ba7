"""Tasks that run later, against the real broker: the namespace's delay ladder (`_ladder.py`)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

from rabbitq import App, ConfigError, Unroutable
from rabbitq import _cli_status as cli_status
from rabbitq import _ladder as ladder
from rabbitq import _status as status_
from rabbitq._app import Task
from rabbitq._wire import HEADER_RUN_AT
from tests.helpers import queue_depth, running_consumer, wait_until
from tests.ledger import broker_stopped, dlx_retry_as_shipped
from tests.stalls import Stalls

# how far from its time a delayed task may start (the bar), the broker's expiry and the
# consumer's start included
ON_TIME_SECONDS = 1.0


class Item(BaseModel):
    n: int


def _noted(app: App, workload: str = "later") -> tuple[Task[Item, None], dict[int, float]]:
    """A task that notes when each item ran (monotonic clock), and its notes."""
    ran: dict[int, float] = {}

    @app.task("later.note", workload=workload)
    async def note(item: Item) -> None:
        ran[item.n] = time.monotonic()

    return note, ran


async def _ladder_depths(connection: AbstractConnection, namespace: str) -> dict[int, int]:
    return {
        i: await queue_depth(connection, ladder.level_name(namespace, i))
        for i in range(ladder.LEVELS)
    }


async def _where(url: str, namespace: str, ran: dict[int, float]) -> str:
    """Where the tasks are, for a failure: what ran, the ladder's and the work queue's depths."""
    connection = await aio_pika.connect(url)
    try:
        levels = {i: n for i, n in (await _ladder_depths(connection, namespace)).items() if n}
        work = await queue_depth(connection, f"{namespace}.later.work")
    finally:
        await connection.close()
    return f"ran {sorted(ran)}, ladder levels holding tasks {levels}, work queue {work}"


@pytest.mark.timeout(120)
async def test_delayed_tasks_run_at_their_time_in_any_publish_order(
    make_topology, connection, url, namespace
):
    """Delays of 65 s, 7 s and 1 s, published longest first (and one by `at=`), each run at
    their time within a second: no task waits behind a longer one.

    Timed on the monotonic clock, which the broker's timers follow (a step of the wall clock
    moves neither); a span in which the whole machine stood still (`tests/stalls.py`) delays the
    broker and this test alike, so it is not counted against the broker.
    """
    topology = await make_topology(delays=True, later={"capacity": 4})
    app = App(namespace=namespace, url=url)
    task, ran = _noted(app)
    wanted = {65: 65.0, 7: 7.0, 1: 1.0}
    due: dict[int, float] = {}
    with Stalls() as stalls:
        async with running_consumer(app, topology.workload("later"), url):
            published = time.monotonic()
            for n, delay in wanted.items():
                due[n] = time.monotonic() + delay
                await task.publish(Item(n=n), delay=timedelta(seconds=delay))
            at = datetime.now(UTC) + timedelta(seconds=3)
            due[3] = time.monotonic() + (at - datetime.now(UTC)).total_seconds()
            await task.publish(Item(n=3), at=at)
            # every one is in the ladder, not in the consumer
            assert sum((await _ladder_depths(connection, namespace)).values()) == 4
            await wait_until(lambda: len(ran) == 4, timeout=80)
    late = {n: round(ran[n] - due[n], 3) for n in due}
    excused = {n: round(stalls.within(published, ran[n]), 3) for n in due}
    print(f"seconds late, by delay: {late}; machine stalls: {stalls}")
    assert all(-ON_TIME_SECONDS <= late[n] - excused[n] <= ON_TIME_SECONDS for n in due), (
        f"late {late}, of which the machine stood still {excused}"
    )
    assert sorted(ran, key=ran.__getitem__) == [1, 3, 7, 65]


async def test_a_long_delay_waits_in_the_levels_of_its_binary_digits(
    make_topology, connection, url, namespace
):
    """1 h 3 min = 3780 s = 2048 + 1024 + 512 + 128 + 64 + 4: the task sits in level 11 with
    those digits in its key, and the TTLs left on its way add up to the rest of its delay."""
    topology = await make_topology(delays=True, later={})
    app = App(namespace=namespace, url=url)
    task, _ = _noted(app)
    published = time.time()
    await task.publish(Item(n=1), delay=timedelta(hours=1, minutes=3))
    await app.close()
    assert ladder.path(3780) == [11, 10, 9, 7, 6, 2]
    depths = await _ladder_depths(connection, namespace)
    assert depths == {i: int(i == 11) for i in range(ladder.LEVELS)}
    channel = await connection.channel()
    try:
        queue = await channel.get_queue(ladder.level_name(namespace, 11), ensure=False)
        held = await queue.get(no_ack=False, timeout=5)
        assert held.routing_key == f"{ladder.digits(3780)}.later"
        run_at = int((held.headers or {})[HEADER_RUN_AT])
        assert abs(run_at / 1000 - (published + 3780)) < 1
    finally:
        await channel.close()  # never acked: the task goes back where it was
    # the levels it still has to pass, as declared on the broker's queues
    ttls = {
        q.name: int(q.arguments["x-message-ttl"]) for q in topology.queues() if q.role == "delay"
    }
    rest = sum(ttls[ladder.level_name(namespace, i)] for i in ladder.path(3780))
    assert rest == 3780 * 1000
    # the work queue is where it ends: the due exchange's binding for the workload
    due = [b for b in topology.bindings() if b.exchange == ladder.due_exchange(namespace)]
    assert [(b.routing_key, b.queue) for b in due] == [("#.later", f"{namespace}.later.work")]
    # back where it was once the broker has taken the return (a quorum queue does it apart)
    level = ladder.level_name(namespace, 11)
    await wait_until(lambda: _depth_is(connection, level, 1), timeout=10)


async def _depth_is(connection: AbstractConnection, queue: str, depth: int) -> bool:
    return await queue_depth(connection, queue) == depth


@pytest.mark.timeout(240)
async def test_delayed_tasks_survive_a_broker_restart(make_topology, url, namespace):
    """stop_app while tasks wait in the ladder, start_app after some were due: each runs, none
    before its time, those due meanwhile right after the broker is back.

    With the broker setting rabbitmq/advanced.config ships: a hop that meets a queue still
    recovering waits for the dead-letter worker's retry (180 s by the broker's default, 15 s as
    shipped), so "right after" means within that retry.
    """
    with Stalls() as stalls:
        async with dlx_retry_as_shipped() as retry_ms:
            topology = await make_topology(delays=True, later={"capacity": 4})
            app = App(namespace=namespace, url=url)
            task, _ = _noted(app)
            due: dict[int, float] = {}
            for n, delay in ((1, 3), (2, 6), (3, 25)):
                due[n] = time.monotonic() + delay
                await task.publish(Item(n=n), delay=delay)
            await app.close()
            async with broker_stopped(url):
                # down past two tasks' time: a span of time, not a synchronisation
                await asyncio.sleep(max(0.0, due[2] + 1 - time.monotonic()))
            back = time.monotonic()
            app = App(namespace=namespace, url=url)
            _, ran = _noted(app)
            async with running_consumer(app, topology.workload("later"), url):
                try:
                    await wait_until(lambda: len(ran) == 3, timeout=90, what="all 3 to run")
                except AssertionError as error:
                    raise AssertionError(f"{error}: {await _where(url, namespace, ran)}") from None
    print(f"back {back - due[2]:.1f}s after task 2's time; ran, after its time: ", end="")
    print({n: round(ran[n] - due[n], 2) for n in ran}, f"; machine stalls: {stalls}")
    assert ran[1] >= due[1] and ran[2] >= due[2]
    soon = 10 + retry_ms / 1000
    assert ran[1] - back < soon and ran[2] - back < soon
    assert abs(ran[3] - due[3]) - stalls.within(back, ran[3]) <= ON_TIME_SECONDS


async def test_a_delayed_task_for_a_workload_without_a_work_queue_is_not_sent(
    make_topology, connection, url, namespace
):
    """The ladder takes any routing key: the publisher checks the work queue is there, so a
    task that could never run raises Unroutable instead of vanishing when it is due."""
    await make_topology(delays=True, later={})
    app = App(namespace=namespace, url=url)

    @app.task("ghost.run", workload="ghost")
    async def ghost(item: Item) -> None:
        pass

    with pytest.raises(Unroutable, match=rf"queue '{namespace}.ghost.work'.* does not exist"):
        await ghost.publish(Item(n=1), delay=5)
    with pytest.raises(Unroutable):
        await app.publish_many([ghost.message(Item(n=2), delay=5)])
    await app.close()
    assert sum((await _ladder_depths(connection, namespace)).values()) == 0


async def test_a_namespace_without_a_ladder_refuses_delayed_tasks(
    make_topology, connection, url, namespace
):
    """With `delays = false` there is no ladder: a delayed publish raises, nothing is queued."""
    await make_topology(later={})
    app = App(namespace=namespace, url=url)
    task, _ = _noted(app)
    with pytest.raises(Unroutable):
        await task.publish(Item(n=1), delay=5)
    # and an immediate one still goes straight to the work queue
    await task.publish(Item(n=2))
    await app.close()
    assert await queue_depth(connection, f"{namespace}.later.work") == 1


async def test_a_deadline_before_the_delay_is_refused_at_publish(make_topology, url, namespace):
    await make_topology(delays=True, later={})
    app = App(namespace=namespace, url=url)
    task, _ = _noted(app)
    with pytest.raises(ConfigError, match="deadline is 50s before"):
        await task.publish(Item(n=1), delay=60, deadline=timedelta(seconds=10))
    await app.close()


async def test_a_ladder_level_passes_a_task_down_by_its_digit(
    make_topology, connection, url, namespace
):
    """What the ladder's exchanges do with a key, seen without waiting: a key published to
    level 5's exchange with digit 5 clear goes down, level by level, to the first set digit."""
    await make_topology(delays=True, later={})
    channel = await connection.channel(publisher_confirms=True)
    try:
        exchange = await channel.get_exchange(ladder.level_name(namespace, 5), ensure=False)
        key = f"{ladder.digits(0b000110)}.later"  # digits 2 and 1 set, 5 clear
        message = aio_pika.Message(b"{}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await exchange.publish(message, routing_key=key, mandatory=True)
    finally:
        await channel.close()
    depths = await _ladder_depths(connection, namespace)
    assert depths == {i: int(i == 2) for i in range(ladder.LEVELS)}


async def test_status_counts_the_tasks_waiting_in_the_ladder(
    make_topology, connection, url, namespace, management
):
    """`rabbitq status` says how many tasks wait in the ladder, for the whole namespace."""
    topology = await make_topology(delays=True, later={})
    app = App(namespace=namespace, url=url)
    task, _ = _noted(app)
    for n, delay in enumerate((30, 600, 86400)):
        await task.publish(Item(n=n), delay=delay)
    await app.close()
    levels = [q.name for q in topology.ladder_queues()]
    workloads = [topology.workload("later")]
    found = await status_.read(connection, namespace, workloads, management, levels)
    assert found.delayed == 3
    assert found.document(time.time())["delayed"] == 3
    assert "delayed: 3 tasks wait in the delay ladder (every workload)" in cli_status.text(
        found, time.time()
    )
    without = await status_.read(connection, namespace, workloads, management)
    assert without.delayed is None
