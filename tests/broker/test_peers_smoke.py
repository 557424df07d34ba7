"""The peer systems of the benchmark (FastStream, Dramatiq) still set up, consume, publish and
tear down. Benchmarks are not tests: no time is asserted, only the counts."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractConnection

from benchmarks import broker
from benchmarks.probe import uvloop_installed
from benchmarks.run import context
from benchmarks.systems import RunContext
from tests.conftest import broker_url

pytest.importorskip("faststream.rabbit", reason="the bench extra is not installed")
pytest.importorskip("dramatiq.brokers.rabbitmq", reason="the bench extra is not installed")

from benchmarks.peers import DramatiqSide, FastStreamSide  # after the skips

DRAIN = 200
PUBLISH = 50
PUBLISHERS = 8
PACED_RATE = 200.0
# Generous: a worker process imports its framework and connects before it is ready.
WORKER_SECONDS = 20.0
LOOP = "uvloop" if uvloop_installed() else "asyncio"


def peer_context(url: str, namespace: str) -> RunContext:
    """The run context the peers see (they read only the URL, the namespace and the loop)."""
    return context(url, namespace, Path("unused.toml"), LOOP)


async def queue_exists(url: str, name: str) -> bool:
    try:
        await broker.message_count(url, name)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("side_class", [FastStreamSide, DramatiqSide])
async def test_peer_drains_publishes_and_tears_down(
    side_class: Any, connection: AbstractConnection
) -> None:
    """A fill is drained to the last task, every publish mode arrives in full, the latency
    worker sees every paced task, and tear-down leaves none of the side's queues."""
    url = broker_url()
    side = side_class(peer_context(url, f"bench-t{uuid.uuid4().hex[:8]}"))
    await side.set_up()
    try:
        assert "drain" in side.measures and "latency" in side.measures
        drain_queue = side.work_queue("drain-c64")
        await broker.purge(url, side.queues("drain-c64"))
        worker = side.worker("drain", "drain-c64", 64, expect=DRAIN)
        try:
            await worker.start()
            await side.fill("drain-c64", DRAIN)
            await worker.ready(WORKER_SECONDS)
            worker.go()
            result = await worker.result(WORKER_SECONDS)
        finally:
            await worker.stop()
        assert result["handled"] == DRAIN
        assert result["last_at"] > result["go_at"]
        assert await broker.message_count(url, drain_queue) == 0

        publish_queue = side.work_queue("publish")
        for publishers in (1, PUBLISHERS):
            await broker.purge(url, side.queues("publish"))
            if publishers == 1:
                seconds = await side.publish_one_at_a_time(PUBLISH)
            else:
                seconds = await side.publish_concurrent(PUBLISH, publishers)
            assert seconds > 0
            assert await broker.message_count(url, publish_queue) == PUBLISH

        await broker.purge(url, side.queues("latency"))
        worker = side.worker("latency", "latency", 64, expect=PUBLISH)
        try:
            await worker.start()
            await worker.ready(WORKER_SECONDS)
            assert await side.publish_paced("latency", PACED_RATE, PUBLISH) > 0
            result = await worker.result(WORKER_SECONDS)
        finally:
            await worker.stop()
        assert result["handled"] == PUBLISH
        assert result["latency_ms"]["samples"] > 0
        assert result["latency_ms"]["p50"] >= 0
    finally:
        await side.tear_down()
    for workload in ("publish", "drain-c64", "latency"):
        for name in side.queues(workload):
            assert not await queue_exists(url, name), f"{name} is left after tear-down"
