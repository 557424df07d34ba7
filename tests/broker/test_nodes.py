"""RABBITQ_URL listing several nodes, against the real broker with a dead node in the list: the
consumer, the publisher and the CLI reach the node that answers; none answering is one error
naming each node, without a password. (A real cluster's failover: tests/cluster/.)"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from rabbitq import App
from rabbitq import _connection as connection_
from rabbitq._connection import NodeOrder, nodes
from rabbitq._metrics import Metrics
from tests.broker.test_declare import rabbitq_cli
from tests.helpers import running_consumer, wait_until

DEAD = "127.0.0.1:1"  # nothing listens there: refused at once


class Job(BaseModel):
    n: int


def with_dead_node_first(url: str) -> str:
    parts = urlsplit(url)
    live = f"{parts.hostname}:{parts.port or 5672}"
    dead_first = urlunsplit(parts._replace(netloc=f"{parts.netloc.rpartition('@')[0]}@{DEAD}"))
    return f"{dead_first},{live}"


@pytest.fixture
def dead_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process tries the list in the order written: the dead node first."""

    class Written(NodeOrder):
        def candidates(self, url: str) -> list[str]:
            self._orders.setdefault(url, nodes(url))  # not shuffled
            return super().candidates(url)

    monkeypatch.setattr(connection_, "NODE_ORDER", Written())


async def test_consumer_and_publisher_use_the_node_that_answers(
    make_topology: Any, url: str, namespace: str, dead_first: None
) -> None:
    listed = with_dead_node_first(url)
    workload = (await make_topology(w={})).workload("w")
    app = App(namespace=namespace, url=listed)
    done: list[int] = []

    @app.task("nodes.job", workload="w")
    async def job(payload: Job) -> None:
        done.append(payload.n)

    registry = CollectorRegistry()
    async with running_consumer(app, workload, listed, metrics=Metrics(registry)):
        await app.publish_many([job.message(Job(n=n)) for n in range(20)])
        await wait_until(lambda: len(done) == 20, what="every task to run")
        live = f"{urlsplit(url).hostname}:{urlsplit(url).port or 5672}"
        labels = {"workload": "w", "node": live}
        assert registry.get_sample_value("rabbitq_broker_node", labels) == 1
    assert sorted(done) == list(range(20))


async def test_the_cli_reaches_the_node_that_answers(
    make_topology: Any, topology_dir: Any, url: str, namespace: str
) -> None:
    await make_topology(w={})
    listed = with_dead_node_first(url)
    args = ("topology", "plan", "--topology", topology_dir(w={}), "--namespace", namespace)
    # each process shuffles the list: a few runs try the dead node first at least once
    results = await asyncio.gather(*(rabbitq_cli(listed, *args) for _ in range(4)))
    for result in results:
        assert result.returncode == 0, result.stderr
        assert "unchanged queue" in result.stdout


async def test_no_node_answering_is_one_error_naming_each(topology_dir: Any, url: str) -> None:
    parts = urlsplit(url)
    user = parts.username or "guest"
    listed = f"amqp://{user}:n0-such-pass@127.0.0.1:1/,127.0.0.1:2"
    result = await rabbitq_cli(listed, "topology", "plan", "--topology", topology_dir(w={}))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("error: cannot connect to ") and "no node answered" in line
    assert "127.0.0.1:1" in line and "127.0.0.1:2" in line
    assert "n0-such-pass" not in line
