"""Least privilege against the real broker: each role, granted exactly what `rabbitq topology
permissions` prints, does its job and nothing else.

Every test makes its own users (unique names, random passwords that no output shows) through
the management API and deletes them after; deleting a user closes its connections.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import shlex
import subprocess
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import aiormq
import pytest
from pydantic import BaseModel

from rabbitq import App, Park, PublishRefused, TaskContext
from rabbitq import _declare as declare
from rabbitq._management import Management
from rabbitq._publish import Publisher
from rabbitq._topology import Topology, load_topology
from rabbitq._wire import Outgoing
from tests.broker.conftest import delete_namespace
from tests.broker.test_declare import rabbitq_cli
from tests.helpers import queue_depth, running_consumer, wait_until

RETRY = {"tiers": ["50ms"], "max_attempts": 2}
REFUSED_LINE = re.compile(
    r"error: user '(?P<user>[^']+)' may not (?P<action>[a-z ()]+) (?P<kind>queue|exchange) "
    r"'(?P<name>[^']+)' in vhost '/' \(ACCESS_REFUSED, it needs [a-z, ]+\): "
    r"grant it with 'rabbitq topology permissions'"
)


class Login(str):
    """A user's broker URL; its repr (what a failed assertion shows) hides the password."""

    user: str

    def __repr__(self) -> str:
        return f"<url of user {self.user!r}>"


class Item(BaseModel):
    n: int


Grant = Callable[..., Awaitable[Login]]


@pytest.fixture
async def grant(management: Management, url: str, namespace: str) -> AsyncIterator[Grant]:
    """`await grant(role, directory)`: a new user with the permissions the command prints for
    `role` (or several, with `roles=`) and the management `tags`, its login URL; deleted after
    the test."""
    made: list[str] = []

    def admin(method: str, path: str, body: dict[str, str] | None = None) -> None:
        request = urllib.request.Request(
            management.base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
        )
        token = base64.b64encode(f"{management.user}:{management.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        request.add_header("content-type", "application/json")
        with urllib.request.urlopen(request, timeout=5):
            pass

    async def make(
        role: str, directory: Path, roles: tuple[str, ...] = (), ns: str = namespace, tags: str = ""
    ) -> Login:
        user = f"rabbitq-test-{role}-{uuid.uuid4().hex[:8]}"
        options = [a for r in roles or (role,) for a in ("--role", r)]
        printed = await rabbitq_cli(
            url,
            "topology",
            "permissions",
            *options,
            "--user",
            user,
            "-t",
            directory,
            "--namespace",
            ns,
        )
        assert printed.returncode == 0, printed.stderr
        [line] = [li for li in printed.stdout.splitlines() if li.startswith("rabbitmqctl ")]
        words = shlex.split(line)
        assert words[:3] == ["rabbitmqctl", "set_permissions", "-p"] and words[4] == user
        vhost, configure, write, read = words[3], *words[5:]
        password = secrets.token_urlsafe(18)
        await asyncio.to_thread(
            admin, "PUT", f"/api/users/{user}", {"password": password, "tags": tags}
        )
        made.append(user)
        permissions = {"configure": configure, "write": write, "read": read}
        await asyncio.to_thread(
            admin, "PUT", f"/api/permissions/{quote(vhost, safe='')}/{user}", permissions
        )
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        login = Login(urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}")))
        login.user = user
        return login

    yield make
    for user in made:
        await asyncio.to_thread(admin, "DELETE", f"/api/users/{user}")


def refusal(result: subprocess.CompletedProcess[str], login: Login) -> re.Match[str]:
    """The one error line a refused command printed, naming the user; no password shown."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    match = REFUSED_LINE.fullmatch(lines[0])
    assert match is not None and match["user"] == login.user, lines[0]
    assert (urlsplit(login).password or "-") not in result.stderr + result.stdout
    return match


async def refused(login: Login, operation: Callable[[Any], Awaitable[Any]]) -> str:
    """The broker's 403 text when `operation(channel)` runs as `login`'s user."""
    connection = await aio_pika.connect(login)
    try:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as caught:
            await operation(channel)
        return str(caught.value)
    finally:
        await connection.close()


async def purge(channel: aio_pika.abc.AbstractChannel, name: str) -> None:
    await (await channel.get_queue(name, ensure=False)).purge()


async def delete(channel: aio_pika.abc.AbstractChannel, name: str) -> None:
    await (await channel.get_queue(name, ensure=False)).delete(if_unused=False, if_empty=False)


def jobs_app(namespace: str, url: str) -> tuple[App, dict[str, Any]]:
    """Tasks of workload `jobs`: one that fails its first attempt, one that parks, one that
    answers calls."""
    app = App(namespace=namespace, url=url)

    @app.task("jobs.flaky", workload="jobs")
    async def flaky(item: Item, ctx: TaskContext) -> None:
        if ctx.attempt == 1:
            raise RuntimeError("the first attempt fails")

    @app.task("jobs.doomed", workload="jobs")
    async def doomed(item: Item) -> None:
        raise Park("never worth a retry")

    @app.task("jobs.double", workload="jobs")
    async def double(item: Item) -> int:
        return 2 * item.n

    return app, {"flaky": flaky, "doomed": doomed, "double": double}


async def test_the_deployer_applies_the_topology_and_nothing_beyond_it(
    grant, topology_dir, url, connection
):
    """Its namespace has a dot and a dash, both taken literally: it applies (ladder included)
    and plans (listing extras with the `management` tag alone), and cannot declare a name where
    the dot is any other character."""
    ns = f"t{uuid.uuid4().hex[:8]}.d-1"
    directory = topology_dir(delays=True, jobs={"retry": RETRY})
    topology = load_topology(directory, ns)
    deployer = await grant("deployer", directory, ns=ns, tags="management")
    try:
        applied = await rabbitq_cli(
            deployer, "topology", "apply", "-t", directory, "--namespace", ns
        )
        assert applied.returncode == 0, applied.stderr
        # `management` lists its objects; the replica count would need `monitoring`
        assert "not looked for" not in applied.stderr, applied.stderr
        planned = await rabbitq_cli(
            deployer, "topology", "plan", "-t", directory, "--namespace", ns
        )
        assert planned.returncode == 0, planned.stderr
        items = await declare.plan(connection, topology)
        assert {i.action for i in items} == {"unchanged"}

        near = ns.replace(".", "X") + ".tasks"
        text = await refused(deployer, lambda ch: ch.declare_exchange(near, durable=True))
        assert f"exchange '{near}'" in text
    finally:
        await delete_namespace(connection, [topology])


async def test_the_worker_consumes_retries_parks_and_answers_calls_but_configures_nothing(
    grant, make_topology, topology_dir, url, namespace, connection
):
    """A worker with no configure permission runs its workload: a retry, a park and a call's
    reply all go through; it cannot declare, delete, or read the parking lot (`status` says
    what it cannot show)."""
    topology: Topology = await make_topology(jobs={"retry": RETRY})
    directory = topology_dir(jobs={"retry": RETRY})
    worker = await grant("worker", directory)
    jobs = topology.workload("jobs")
    worker_app, _ = jobs_app(namespace, worker)
    caller_app, tasks = jobs_app(namespace, url)
    try:
        async with running_consumer(worker_app, jobs, worker) as consumer:
            await tasks["flaky"].publish(Item(n=1))
            await tasks["doomed"].publish(Item(n=2))
            assert await tasks["double"].call(Item(n=21), timeout=10) == 42
            await wait_until(
                lambda: (
                    consumer.counts["retried"] == 1
                    and consumer.counts["succeeded"] == 2
                    and consumer.counts["parked:parked_by_handler"] == 1
                ),
                what="a retry, two successes and a park",
            )
        assert await queue_depth(connection, jobs.parking_queue) == 1
    finally:
        await caller_app.close()
        await worker_app.close()

    scratch = f"{namespace}.jobs.scratch"
    assert "refused" in await refused(worker, lambda ch: ch.declare_queue(scratch, durable=True))
    assert "refused" in await refused(worker, lambda ch: purge(ch, jobs.parking_queue))
    assert "refused" in await refused(worker, lambda ch: delete(ch, jobs.work_queue))
    assert await queue_depth(connection, jobs.parking_queue) == 1
    # `status` needs no permission but read on the parking lot, for its oldest task's age
    where = ("-t", directory, "--namespace", namespace)
    status = await rabbitq_cli(worker, "status", "jobs", *where)
    assert status.returncode == 0, status.stderr
    assert (
        f"note: the age of the oldest parked task is unknown: user {worker.user!r} may not read "
        f"the head of queue {jobs.parking_queue!r}"
    ) in status.stdout
    # RabbitMQ has no finer grain than read: what may consume a queue may purge it too
    worker_conn = await aio_pika.connect(worker)
    try:
        await purge(await worker_conn.channel(), jobs.work_queue)
    finally:
        await worker_conn.close()


async def test_the_publisher_publishes_now_and_later_and_calls_but_never_reads(
    grant, make_topology, topology_dir, url, namespace, connection
):
    """It publishes a task, a delayed one and a call; it cannot take a task off the work queue,
    declare, publish where tasks are retried or parked, or run `consume` and `apply` (each
    refused with one line naming what it lacks)."""
    topology: Topology = await make_topology(delays=True, jobs={})
    directory = topology_dir(delays=True, jobs={})
    publisher = await grant("publisher", directory)
    jobs = topology.workload("jobs")
    publisher_app, tasks = jobs_app(namespace, publisher)
    worker_app, _ = jobs_app(namespace, url)
    try:
        await tasks["double"].publish(Item(n=1))
        await tasks["double"].publish(Item(n=2), delay=3600)
        assert await queue_depth(connection, jobs.work_queue) == 1
        ladder = [q.name for q in topology.ladder_queues()]
        assert sum([await queue_depth(connection, name) for name in ladder]) == 1
        async with running_consumer(worker_app, jobs, url):
            assert await tasks["double"].call(Item(n=21), timeout=10) == 42

        parked_by_hand = Outgoing(jobs.parking_exchange, jobs.routing_key, b"{}", "m1", {})
        sender = Publisher(publisher)
        try:
            with pytest.raises(PublishRefused) as caught:
                await sender.send(parked_by_hand)
        finally:
            await sender.close()
        assert (caught.value.kind, caught.value.name) == ("exchange", jobs.parking_exchange)
        assert caught.value.user == publisher.user
    finally:
        await publisher_app.close()
        await worker_app.close()

    async def take(channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.get_queue(jobs.work_queue, ensure=False)
        await queue.get(fail=False)

    assert "refused" in await refused(publisher, take)
    scratch = f"{namespace}.jobs.scratch"
    assert "refused" in await refused(publisher, lambda ch: ch.declare_queue(scratch))

    where = ("-t", directory, "--namespace", namespace)
    consumed = await rabbitq_cli(
        publisher, "consume", "jobs", "--app", "tests.broker.apps:app", *where
    )
    match = refusal(consumed, publisher)
    assert (match["action"], match["name"]) == ("consume from", jobs.work_queue)
    applied = await rabbitq_cli(publisher, "topology", "apply", *where)
    assert refusal(applied, publisher)["action"].startswith("declare")


async def test_the_operator_lists_replays_and_purges_the_parking_lot_but_cannot_apply(
    grant, make_topology, topology_dir, url, namespace, connection
):
    """Three parked tasks: the operator lists them, replays one, reads the status and purges
    the rest; `topology apply` and taking from the work queue are refused."""
    spec = {"retry": {"tiers": [], "max_attempts": 1}}
    topology: Topology = await make_topology(jobs=spec)
    directory = topology_dir(jobs=spec)
    operator = await grant("operator", directory)
    jobs = topology.workload("jobs")
    app, tasks = jobs_app(namespace, url)
    try:
        async with running_consumer(app, jobs, url) as consumer:
            await tasks["doomed"].publish_many([Item(n=n) for n in range(3)])
            await wait_until(
                lambda: consumer.counts["parked:parked_by_handler"] == 3, what="3 parks"
            )
    finally:
        await app.close()

    where = ("-t", directory, "--namespace", namespace)
    listed = await rabbitq_cli(operator, "parking", "list", "jobs", "--json", *where)
    assert listed.returncode == 0, listed.stderr
    ids = [task["message_id"] for task in json.loads(listed.stdout)]
    assert len(ids) == 3
    shown = await rabbitq_cli(operator, "parking", "show", "jobs", ids[0], *where)
    assert shown.returncode == 0, shown.stderr
    replayed = await rabbitq_cli(operator, "parking", "replay", "jobs", "--id", ids[0], *where)
    assert replayed.returncode == 0, replayed.stderr
    assert await queue_depth(connection, jobs.work_queue) == 1
    status = await rabbitq_cli(operator, "status", "jobs", "--json", *where)
    assert status.returncode == 0, status.stderr
    row = json.loads(status.stdout)["workloads"]["jobs"]
    assert row["parked"] == 2 and row["oldest_parked_age_seconds"] is not None
    purged = await rabbitq_cli(operator, "parking", "purge", "jobs", "--all", "--yes", *where)
    assert purged.returncode == 0, purged.stderr
    assert await queue_depth(connection, jobs.parking_queue) == 0

    applied = await rabbitq_cli(operator, "topology", "apply", *where)
    assert refusal(applied, operator)["action"].startswith("declare")

    async def take(channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.get_queue(jobs.work_queue, ensure=False)
        await queue.get(fail=False)

    assert "refused" in await refused(operator, take)
    assert await queue_depth(connection, jobs.work_queue) == 1


async def test_parking_list_as_a_worker_is_refused_at_once(
    grant, make_topology, topology_dir, namespace, connection
):
    """A worker may not read its parking lot: `parking list` says so in one line at once,
    rather than wait as if another reader held the lot."""
    topology: Topology = await make_topology(jobs={})
    directory = topology_dir(jobs={})
    worker = await grant("worker", directory)
    listed = await rabbitq_cli(
        worker, "parking", "list", "jobs", "-t", directory, "--namespace", namespace
    )
    match = refusal(listed, worker)
    assert match["name"] == topology.workload("jobs").parking_queue
