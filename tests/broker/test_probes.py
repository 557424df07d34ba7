"""`rabbitq consume --metrics-port` as a process: probes that follow the broker, metrics that
match the work, JSON log lines, and a password that never shows.

The broker is taken away from this one consumer by cutting a TCP proxy between them (the
broker itself is shared with other tests and keeps running).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aio_pika.abc import AbstractConnection
from prometheus_client.parser import text_string_to_metric_families

from rabbitq import App
from rabbitq._wire import HEADER_ATTEMPT
from tests.broker.apps import WORKLOAD, Note
from tests.helpers import drain_queue, free_port, http_get, plain_message, wait_until
from tests.ledger import rabbitmqctl
from tests.proxy import Proxy

ROOT = Path(__file__).resolve().parents[2]
QUICK = 5


def _samples(body: bytes, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _total(body: bytes, name: str, **labels: str) -> float:
    return sum(
        value for key, value in _samples(body, name).items() if labels.items() <= dict(key).items()
    )


@pytest.fixture
def secret_user() -> Iterator[tuple[str, str]]:
    """A broker user whose password has characters a URL must escape."""
    user = f"rq-probe-{uuid.uuid4().hex[:8]}"
    password = f"Pw/{uuid.uuid4().hex[:12]}:x"
    rabbitmqctl("add_user", user, password)
    rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    yield user, password
    rabbitmqctl("delete_user", user, check=False)


async def test_probes_metrics_and_logs_of_a_consumer_process(
    make_topology: Callable[..., Any],
    topology_dir: Callable[..., Path],
    connection: AbstractConnection,
    url: str,
    namespace: str,
    secret_user: tuple[str, str],
    tmp_path: Path,
) -> None:
    user, password = secret_user
    forms = (password, quote(password, safe=""))
    spec = {"capacity": 4, "retry": {"tiers": ["50ms"], "max_attempts": 2}}
    topology = await make_topology(**{WORKLOAD: spec})
    workload = topology.workload(WORKLOAD)
    directory = topology_dir(**{WORKLOAD: spec})
    proxy = Proxy()
    await proxy.start()
    secret_url = f"amqp://{user}:{quote(password, safe='')}@127.0.0.1:{proxy.port}/"
    port = free_port()
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "rabbitq",
            "consume",
            WORKLOAD,
            "--app",
            "tests.broker.apps:app",
            "--topology",
            str(directory),
            "--namespace",
            namespace,
            "--metrics-port",
            str(port),
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "--grace",
            "5",
            cwd=ROOT,
            env={**os.environ, "RABBITQ_URL": secret_url},
            stdout=stdout,
            stderr=stderr,
        )
    try:

        async def status_is(path: str, expected: int) -> bool:
            return (await http_get(port, path))[0] == expected

        await wait_until(lambda: status_is("/readyz", 200), timeout=20, what="/readyz 200")
        assert await status_is("/healthz", 200)

        # the same task names, published from an app of the test's own
        app = App(namespace=namespace, url=url)
        quick = app.task("quick", workload=WORKLOAD)(_noop)
        leaky = app.task("leaky", workload=WORKLOAD)(_noop)
        try:
            await app.publish_many([quick.message(Note(n=n)) for n in range(QUICK)])
            await leaky.publish(Note(n=1))
        finally:
            await app.close()
        channel = await connection.channel()
        exchange = await channel.get_exchange(workload.task_exchange, ensure=False)
        await exchange.publish(
            plain_message(
                b"not json", type="quick", message_id="poison-1", headers={HEADER_ATTEMPT: 1}
            ),
            routing_key=workload.routing_key,
        )
        await channel.close()

        async def metrics() -> bytes:
            return (await http_get(port, "/metrics"))[1]

        async def settled() -> bool:
            body = await metrics()
            return (
                _total(body, "rabbitq_tasks_total", outcome="succeeded") == QUICK
                and _total(body, "rabbitq_tasks_parked_total") == 2
            )

        await wait_until(settled, timeout=20, what="5 successes and 2 parked in /metrics")
        body = await metrics()
        assert _total(body, "rabbitq_tasks_total", outcome="retried", task="leaky") == 1
        assert _total(body, "rabbitq_tasks_parked_total", reason="retries_exhausted") == 1
        assert _total(body, "rabbitq_tasks_parked_total", reason="undecodable") == 1
        assert _total(body, "rabbitq_capacity") == 4
        assert _total(body, "process_resident_memory_bytes") > 0

        # the broker goes away: not ready, not healthy; back: ready again
        await proxy.cut()
        await wait_until(lambda: status_is("/readyz", 503), timeout=20, what="/readyz 503")
        assert await status_is("/healthz", 503)
        assert _total(await metrics(), "rabbitq_consumer_ready") == 0
        await proxy.restore()
        await wait_until(
            lambda: status_is("/readyz", 200),
            timeout=30,
            what="/readyz 200 after the broker came back",
        )
        assert await status_is("/healthz", 200)
        assert _total(await metrics(), "rabbitq_reconnects_total") >= 1

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proxy.cut()

    logged = err.read_text() + out.read_text()
    assert not any(form in logged for form in forms), "the password was logged"
    records = [json.loads(line) for line in err.read_text().splitlines()]
    outcomes = [r["outcome"] for r in records if "outcome" in r]
    assert outcomes.count("succeeded") == QUICK
    assert outcomes.count("retried") == 1 and outcomes.count("parked") == 2
    leaky_park = next(r for r in records if r.get("outcome") == "parked" and r["task"] == "leaky")
    assert f"cannot reach amqp://{user}:***@" in leaky_park["traceback"]
    assert leaky_park["traceback"].count("Traceback (most recent call last)") == 1
    parked = await drain_queue(connection, workload.parking_queue)
    assert len(parked) == 2
    assert not any(form in repr(m.headers) for m in parked for form in forms)


async def _noop(payload: Note) -> None:
    pass


@pytest.mark.parametrize(
    "command", [["topology", "plan"], ["consume", WORKLOAD, "--app", "tests.broker.apps:app"]]
)
async def test_a_wrong_password_is_one_error_line_without_it(
    make_topology: Callable[..., Any],
    topology_dir: Callable[..., Path],
    namespace: str,
    secret_user: tuple[str, str],
    command: list[str],
) -> None:
    user, _ = secret_user
    wrong = "Wr0ng/pass:word"
    spec = {"capacity": 1}
    await make_topology(**{WORKLOAD: spec})
    directory = topology_dir(**{WORKLOAD: spec})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rabbitq",
        *command,
        "--topology",
        str(directory),
        "--namespace",
        namespace,
        cwd=ROOT,
        env={**os.environ, "RABBITQ_URL": f"amqp://{user}:{quote(wrong, safe='')}@127.0.0.1/"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    text = (stdout + stderr).decode()
    assert proc.returncode != 0
    assert not any(form in text for form in (wrong, quote(wrong, safe=""))), text
    lines = stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert f"{user}:***@" in lines[0]
