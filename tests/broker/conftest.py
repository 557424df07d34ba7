"""Fixtures for tests against the real RabbitMQ at RABBITQ_TEST_URL.

Every test gets its own namespace (so its own exchanges and queues) and deletes them after.
The broker is checked once per run: unreachable means skip locally, fail under CI.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from rabbitq import _declare as declare
from rabbitq._management import Management, ManagementUnavailable
from rabbitq._topology import Topology, parse_topology
from tests.conftest import broker_url

_broker_checked: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.rabbitmq)


async def _check_broker(url: str) -> None:
    if _broker_checked:
        if _broker_checked[0] != "ok":
            _skip_or_fail(_broker_checked[0])
        return
    try:
        connection = await aio_pika.connect(url, timeout=5)
        await connection.close()
        _broker_checked.append("ok")
    except Exception as exc:
        _broker_checked.append(f"{type(exc).__name__}: {exc}")
        _skip_or_fail(_broker_checked[0])


def _skip_or_fail(reason: str) -> None:
    text = f"RabbitMQ at RABBITQ_TEST_URL is not reachable ({reason})"
    if os.environ.get("CI"):
        pytest.fail(text)
    pytest.skip(text)


@pytest.fixture
def url() -> str:
    return broker_url()


@pytest.fixture
async def connection(url: str, request: pytest.FixtureRequest) -> AsyncIterator[AbstractConnection]:
    """A connection for the test's own inspection, named after the test."""
    await _check_broker(url)
    conn = await aio_pika.connect(
        url, client_properties={"connection_name": f"test {request.node.nodeid}"[:200]}
    )
    yield conn
    await conn.close()


@pytest.fixture
async def management(url: str) -> Management:
    """The broker's management API: skipped locally without the plugin, a failure under CI."""
    api = Management.from_urls(url)
    try:
        await api.overview()
    except ManagementUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    return api


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def toml_for(workloads: dict[str, dict[str, Any]], delays: bool = False) -> str:
    """TOML text for workloads given as dicts (`retry` as a nested dict).

    Without the namespace's delay ladder unless `delays`: its 28 quorum queues take about a
    second to declare and delete, in every test that applies a topology.
    """
    lines: list[str] = [] if delays else ["delays = false"]
    for name, spec in workloads.items():
        lines.append(f"[workloads.{name}]")
        retry = spec.get("retry")
        for key, value in spec.items():
            if key != "retry":
                lines.append(f"{key} = {_toml_value(value)}")
        if retry is not None:
            lines.append(f"[workloads.{name}.retry]")
            for key, value in retry.items():
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


@pytest.fixture
async def make_topology(
    connection: AbstractConnection, namespace: str
) -> AsyncIterator[Callable[..., Any]]:
    """`await make_topology(name=spec, ...)` parses, applies and later deletes a topology.

    Defaults suit fast tests: tiny tier TTLs. Returns the Topology.
    """
    applied: list[Topology] = []

    async def make(
        apply: bool = True, delays: bool = False, **workloads: dict[str, Any]
    ) -> Topology:
        topology = parse_topology({"test.toml": toml_for(workloads, delays)}, namespace)
        if apply:
            await declare.apply(connection, topology)
        applied.append(topology)
        return topology

    yield make
    # A fresh connection: the test may have had the broker close its own.
    cleanup = await aio_pika.connect(broker_url())
    try:
        await delete_namespace(cleanup, applied)
    finally:
        await cleanup.close()


async def delete_namespace(connection: AbstractConnection, topologies: list[Topology]) -> None:
    channel = await connection.channel()
    for topology in topologies:
        for queue in topology.queues():
            with _ignore():
                await channel.queue_delete(queue.name)
            if channel.is_closed:
                channel = await connection.channel()
        for exchange in topology.exchanges():
            with _ignore():
                await channel.exchange_delete(exchange.name)
            if channel.is_closed:
                channel = await connection.channel()
    if not channel.is_closed:
        await channel.close()


class _ignore:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


@pytest.fixture
def topology_dir(tmp_path: Path) -> Callable[..., Path]:
    """Write workloads as a topology directory (for CLI and subprocess tests)."""

    def write(delays: bool = False, **workloads: dict[str, Any]) -> Path:
        directory = tmp_path / "topology"
        directory.mkdir(exist_ok=True)
        (directory / "test.toml").write_text(toml_for(workloads, delays))
        return directory

    return write
