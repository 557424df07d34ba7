"""`topology export`, the objects `topology plan` finds no longer declared, and `rabbitq check`,
against the real broker (with its management API; rabbitmqctl for vhosts and consumer_timeout).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import pytest
from typer.testing import CliRunner, Result

from rabbitq._cli import cli
from rabbitq._management import Management
from tests.broker.test_declare import rabbitq_cli
from tests.helpers import wait_until

W = {"queue_type": "quorum", "max_redeliveries": 5, "retry": {"tiers": ["1s"], "max_attempts": 2}}
OLD = {"retry": {"tiers": ["1s"], "max_attempts": 2}}


def rabbitmqctl(*args: str) -> str:
    if shutil.which("rabbitmqctl") is None:
        if os.environ.get("CI"):
            pytest.fail("rabbitmqctl is not on PATH")
        pytest.skip("rabbitmqctl is not on PATH")
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def put(api: Management, path: str, body: dict[str, Any] | None, method: str = "PUT") -> None:
    """A write to the management API (the package only reads it)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(api.base + path, data=data, method=method)
    token = base64.b64encode(f"{api.user}:{api.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10):
        pass


def with_vhost(url: str, vhost: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(vhost, safe="")))


def invoke(*args: str | Path) -> Result:
    """The command through typer's runner, off the test's event loop (the CLI runs its own)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
async def vhost(url: str, management: Management) -> AsyncIterator[str]:
    name = f"t{uuid.uuid4().hex[:10]}"
    user = urlsplit(url).username or "guest"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


def plan_lines(result: subprocess.CompletedProcess[str]) -> set[tuple[str, ...]]:
    return {tuple(line.split(maxsplit=2)) for line in result.stdout.splitlines()}


async def test_export_imported_into_a_fresh_vhost_makes_plan_in_sync(
    topology_dir, url, namespace, vhost
):
    directory = topology_dir(w=W, old=OLD)
    exported = await rabbitq_cli(
        url,
        "topology",
        "export",
        "--topology",
        directory,
        "--namespace",
        namespace,
        "--vhost",
        vhost,
    )
    assert exported.returncode == 0, exported.stderr
    doc = json.loads(exported.stdout)
    assert len(doc["queues"]) == 6 and len(doc["bindings"]) == 6
    # rabbitmqctl runs as the rabbitmq user: the file must be readable by it
    folder = tempfile.mkdtemp()
    os.chmod(folder, 0o755)
    path = Path(folder) / "definitions.json"
    path.write_text(exported.stdout)
    path.chmod(0o644)
    try:
        rabbitmqctl("import_definitions", str(path))
    finally:
        shutil.rmtree(folder)
    in_vhost = with_vhost(url, vhost)
    args = ("topology", "plan", "--topology", directory, "--namespace", namespace)
    planned: list[subprocess.CompletedProcess[str]] = []

    async def in_sync() -> bool:  # the import runs asynchronously on the broker
        planned.append(await rabbitq_cli(in_vhost, *args, "--url", in_vhost))
        return {line[0] for line in plan_lines(planned[-1])} == {"unchanged"}

    await wait_until(in_sync, timeout=30, what="plan in sync after the import", interval=0.5)
    assert planned[-1].returncode == 0, planned[-1].stderr
    assert len(plan_lines(planned[-1])) == 3 + 6 + 6  # exchanges, queues, bindings


async def test_plan_reports_objects_no_longer_declared_and_a_missing_binding(
    topology_dir, url, namespace, vhost
):
    in_vhost = with_vhost(url, vhost)
    directory = topology_dir(w=W, old=OLD)
    base = ("--topology", directory, "--namespace", namespace, "--url", in_vhost)
    applied = await rabbitq_cli(in_vhost, "topology", "apply", *base)
    assert applied.returncode == 0, applied.stderr
    directory = topology_dir(w=W)  # the workload "old" is no longer declared
    # unbound through AMQP, as an operator's mistake would be
    conn = await aio_pika.connect(in_vhost)
    try:
        channel = await conn.channel()
        queue = await channel.get_queue(f"{namespace}.w.retry.1s", ensure=False)
        await queue.unbind(f"{namespace}.retry", "w.1s")
    finally:
        await conn.close()

    planned = await rabbitq_cli(in_vhost, "topology", "plan", *base)
    assert planned.returncode == 0, planned.stderr
    extra = {line[1:] for line in plan_lines(planned) if line[0] == "extra"}
    old = f"{namespace}.old"
    assert extra == {
        ("queue", f"{old}.work (0 messages)"),
        ("queue", f"{old}.retry.1s (0 messages)"),
        ("queue", f"{old}.parking (0 messages)"),
        ("binding", f"{namespace}.tasks --old--> {old}.work"),
        ("binding", f"{namespace}.retry --old.1s--> {old}.retry.1s"),
        ("binding", f"{namespace}.parking --old--> {old}.parking"),
    }
    created = {line[1:] for line in plan_lines(planned) if line[0] == "create"}
    assert created == {("binding", f"{namespace}.retry --w.1s--> {namespace}.w.retry.1s")}
    assert "rabbitq never deletes" in planned.stderr

    blind = await rabbitq_cli(
        in_vhost, "topology", "plan", *base, "--management-url", "http://127.0.0.1:1"
    )
    assert blind.returncode == 0 and "extra" not in blind.stdout
    assert "were not looked for" in blind.stderr and "guest" not in blind.stderr.replace(
        "user 'guest'", ""
    )


APP = """
from pydantic import BaseModel
from rabbitq import App

app = App(namespace={namespace!r})


class Job(BaseModel):
    n: int


@app.task("check.long", workload="w", timeout_seconds=120)
async def long(job: Job) -> None: ...
"""


@contextlib.contextmanager
def consumer_timeout(ms: int) -> Iterator[None]:
    """The node's consumer_timeout changed at runtime, and restored whatever happens."""
    before = rabbitmqctl("eval", "application:get_env(rabbit, consumer_timeout).").strip()
    rabbitmqctl("eval", f"application:set_env(rabbit, consumer_timeout, {ms}).")
    try:
        yield
    finally:
        if before.startswith("{ok,"):
            value = before[4:-1]
            rabbitmqctl("eval", f"application:set_env(rabbit, consumer_timeout, {value}).")
        else:
            rabbitmqctl("eval", "application:unset_env(rabbit, consumer_timeout).")


def findings(result: Result | subprocess.CompletedProcess[str]) -> dict[tuple[str, str], str]:
    doc = json.loads(result.stdout)
    return {(f["check"], f["subject"]): f["status"] for f in doc["findings"]}


async def test_check_flags_a_consumer_timeout_shorter_than_the_longest_task(
    topology_dir, url, namespace, management, make_topology, tmp_path, monkeypatch
):
    await make_topology(w=W)
    (tmp_path / "checkapp.py").write_text(APP.format(namespace=namespace))
    monkeypatch.syspath_prepend(str(tmp_path))
    directory = topology_dir(w=W)
    args = ("check", "--app", "checkapp:app", "--topology", directory, "--namespace", namespace)
    work = f"{namespace}.w.work"

    with consumer_timeout(60_000):  # one minute, against a task allowed two
        flagged = await asyncio.to_thread(invoke, *args, "--url", url, "--json")
    assert flagged.exit_code == 3, flagged.output
    assert findings(flagged)[("consumer_timeout", work)] == "fail"
    assert "consumer_timeout" in flagged.stderr and "1m" in flagged.stdout

    fine = await asyncio.to_thread(invoke, *args, "--url", url, "--json")
    assert findings(fine)[("consumer_timeout", work)] == "ok", fine.output
    assert fine.exit_code == 0, fine.output
    assert findings(fine)[("topology", "namespace")] == "ok"
    assert findings(fine)[("alarm", "cluster")] == "ok"


async def test_check_flags_a_quorum_delivery_limit_below_max_redeliveries(
    topology_dir, url, namespace, management, make_topology
):
    await make_topology(w=W)
    directory = topology_dir(w=W)
    work = f"{namespace}.w.work"
    policy = f"/api/policies/{quote(management.vhost, safe='')}/{namespace}-limit"
    body = {
        "pattern": f"^{namespace}\\.w\\.work$",
        "definition": {"delivery-limit": 2},
        "apply-to": "queues",
        "priority": 10,
    }
    args = ("check", "--topology", directory, "--namespace", namespace, "--json")
    ok = await rabbitq_cli(url, *args)
    assert findings(ok)[("delivery_limit", work)] == "ok", ok.stdout
    await asyncio.to_thread(put, management, policy, body)
    try:
        checked: list[subprocess.CompletedProcess[str]] = []

        async def flagged() -> bool:  # a policy reaches the queue asynchronously
            checked.append(await rabbitq_cli(url, *args))
            return findings(checked[-1]).get(("delivery_limit", work)) == "fail"

        await wait_until(flagged, timeout=20, what="the delivery limit flagged", interval=0.5)
        assert checked[-1].returncode == 3
        text = await rabbitq_cli(url, *args[:-1])
        assert "below max_redeliveries 5" in text.stdout and f"{namespace}-limit" in text.stdout
    finally:
        await asyncio.to_thread(put, management, policy, None, "DELETE")


def test_check_and_export_help_show_an_example() -> None:
    for command in (["check"], ["topology", "export"]):
        result = CliRunner().invoke(cli, [*command, "--help"])
        assert result.exit_code == 0 and "Example: rabbitq" in result.output
