"""The quick-start demo: apply the topology, publish tasks, run a consumer, print a summary.

Run from the repository root: `make demo` (or `.venv/bin/python -m examples.demo`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aio_pika

from examples.demo_app import Flaky, Greeting, app, doomed, flaky, greet
from rabbitq import _declare as declare
from rabbitq._connection import DEFAULT_URL, connect, mask_url
from rabbitq._errors import ConnectionFailed
from rabbitq._topology import load_topology
from rabbitq._wire import HEADER_PARK_ATTEMPTS, HEADER_PARK_ERROR, HEADER_PARK_REASON

ROOT = Path(__file__).resolve().parent.parent
URL = os.environ.get("RABBITQ_URL", DEFAULT_URL)

NO_BROKER = """\
error: no RabbitMQ answers at {url} ({reason})
  Start one, then run this again:
    Debian/Ubuntu:  sudo apt-get install -y rabbitmq-server && sudo rabbitmq-server -detached
    Docker:         docker compose up -d rabbitmq
  or point RABBITQ_URL at yours."""


async def peek_parked(queue_name: str, run_id: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """This run's parked tasks; everything read is returned to the parking lot untouched."""
    connection = await connect(URL, "demo-peek")
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name, ensure=False)
        seen = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            seen.append(message)
        mine = [m for m in seen if (m.message_id or "").startswith(run_id)]
        for message in seen:
            await message.nack(requeue=True)
        return mine
    finally:
        await connection.close()


async def prepare(run_id: str) -> str:
    topology = load_topology(ROOT / "topology", app.namespace)
    try:
        connection = await connect(URL, "demo")
    except ConnectionFailed as exc:
        print(NO_BROKER.format(url=mask_url(URL), reason=exc.reason), file=sys.stderr)
        raise SystemExit(1) from None
    try:
        items = await declare.apply(connection, topology)
    finally:
        await connection.close()
    created = sum(1 for i in items if i.action == "create")
    print(
        f"1. topology applied: {len(items)} objects ({created} created, "
        f"{len(items) - created} already there)"
    )
    app.url = URL
    messages = [
        greet.message(
            Greeting(name=f"guest {i}"), idempotency_key=f"{run_id}-greet-{i}", priority=i % 3
        )
        for i in range(20)
    ]
    messages += [flaky.message(Flaky(n=i), idempotency_key=f"{run_id}-flaky-{i}") for i in range(5)]
    messages.append(doomed.message(Greeting(name="nobody"), idempotency_key=f"{run_id}-doomed"))
    await app.publish_many(messages)
    await app.close()
    print(
        f"2. published {len(messages)} tasks, every one confirmed by the broker: "
        "20 succeed, 5 fail once and retry, 1 always fails"
    )
    return topology.workload("demo").parking_queue


def main() -> None:
    # aiormq logs a failed connect itself; the demo says it once, with what to do.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    parking_queue = asyncio.run(prepare(run_id))
    print("3. running `rabbitq consume demo --burst` until the queue and its tiers are empty:")
    started = time.monotonic()
    env = {**os.environ, "RABBITQ_URL": URL}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rabbitq",
            "consume",
            "demo",
            "--app",
            "examples.demo_app:app",
            "--topology",
            str(ROOT / "topology"),
            "--burst",
            "--grace",
            "10",
            "--json",
        ],
        cwd=ROOT,
        env=env,
        check=False,
        stdout=subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        print(f"error: the consumer exited with {result.returncode}", file=sys.stderr)
        raise SystemExit(1)
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])["outcomes"]
    parked = asyncio.run(peek_parked(parking_queue, run_id))
    print(f"4. summary (consumer ran {time.monotonic() - started:.1f}s):")
    print(
        f"   {outcomes.get('succeeded', 0)} succeeded; {outcomes.get('retried', 0)} retries "
        "went through a tier and came back"
    )
    print(f"   {len(parked)} parked in {parking_queue}:")
    for message in parked:
        headers = message.headers or {}
        print(
            f"     {message.type} {message.message_id}: reason={headers[HEADER_PARK_REASON]!s} "
            f"attempts={headers[HEADER_PARK_ATTEMPTS]!s} error={headers[HEADER_PARK_ERROR]!r}"
        )
    if len(parked) != 1:
        print("error: expected exactly one parked task from this run", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
