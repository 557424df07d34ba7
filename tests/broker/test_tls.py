"""`amqps://` against a RabbitMQ node of the test's own (tests/tls_node.py: a TLS listener only,
client certificates required, management over https): a task published and consumed, the CLI
with the files from the environment, and each way a handshake fails, said in one line without
the password or a key.

Locally the module skips when no node can start here; under CI it fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from pydantic import BaseModel

from rabbitq import App
from rabbitq import _declare as declare
from rabbitq._connection import connect
from rabbitq._errors import ConnectionFailed
from rabbitq._management import Management, ManagementUnavailable
from rabbitq._topology import parse_topology
from tests.broker.conftest import toml_for
from tests.broker.test_console_http import call, console
from tests.helpers import running_consumer, wait_until
from tests.tls_node import Certificates, TlsNode, unavailable

ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_SECONDS = 20


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def node() -> Iterator[TlsNode]:
    why = unavailable()
    if why:
        _skip_or_fail(why)
    tls_node = TlsNode.create(Path("/tmp"))
    try:
        try:
            tls_node.start()
        except RuntimeError as exc:
            _skip_or_fail(str(exc))
        yield tls_node
    finally:
        tls_node.stop()


def query(c: Certificates, **options: str) -> str:
    """The TLS query: our CA and client certificate, each overridable (an empty value drops it)."""
    base = {"cacertfile": c.ca, "certfile": c.client, "keyfile": c.client_key}
    return urlencode({k: v for k, v in {**base, **options}.items() if v}, safe="/")


def secrets_of(node: TlsNode) -> list[str]:
    """What must never be printed: the password and a line of each private key."""
    keys = [node.certificates.client_key, node.certificates.path("server.key")]
    return [node.password, *(Path(key).read_text().splitlines()[1] for key in keys)]


class Item(BaseModel):
    n: int


@pytest.mark.parametrize(
    ("host", "sni"),
    [("localhost", ""), ("127.0.0.2", "localhost")],
    ids=["by-name", "by-other-address-with-sni"],
)
async def test_a_task_published_over_amqps_runs_in_a_consumer_over_amqps(node, host, sni):
    """Published over TLS (the node has no plain listener), consumed by `Consumer` over TLS;
    by an address the certificate does not carry once the URL names the one it does."""
    url = node.url(host, query(node.certificates, server_name_indication=sni))
    namespace = f"tls{os.urandom(4).hex()}"
    topology = parse_topology({"t.toml": toml_for({"jobs": {"capacity": 2}})}, namespace)
    connection = await connect(url, "test tls")
    try:
        await declare.apply(connection, topology)
    finally:
        await connection.close()
    app = App(namespace=namespace, url=url)
    seen: list[int] = []

    @app.task("jobs.record", workload="jobs")
    async def record(item: Item) -> None:
        seen.append(item.n)

    async with running_consumer(app, topology.workload("jobs"), url) as consumer:
        for n in range(3):
            await record.publish(Item(n=n))
        await wait_until(lambda: consumer.counts["succeeded"] == 3, what="3 tasks over TLS")
    assert sorted(seen) == [0, 1, 2]


def rabbitq_cli(
    url: str, env: dict[str, str], *args: str | Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rabbitq", *map(str, args)],
        cwd=ROOT,
        env={**os.environ, "RABBITQ_URL": url, **env},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
    )


def tls_env(c: Certificates) -> dict[str, str]:
    return {
        "RABBITQ_TLS_CACERTFILE": c.ca,
        "RABBITQ_TLS_CERTFILE": c.client,
        "RABBITQ_TLS_KEYFILE": c.client_key,
    }


def test_the_cli_reads_the_certificates_from_the_environment(node, tmp_path):
    """`topology apply`, `publish`, `status` and `check` (management over https too), `parking
    list` and `consume --burst` work with a bare amqps:// URL and RABBITQ_TLS_*."""
    directory = tmp_path / "topology"
    directory.mkdir()
    namespace = f'namespace = "tls{os.urandom(4).hex()}"\n'
    (directory / "t.toml").write_text(namespace + toml_for({"proc": {}}))
    url, env = node.url(), tls_env(node.certificates)
    api = f"https://localhost:{node.management_port}"
    runs = {
        "apply": rabbitq_cli(url, env, "topology", "apply", "-t", directory),
        "publish": rabbitq_cli(
            url,
            env,
            "publish",
            "slow",
            "--app",
            "tests.broker.apps:app",
            "-t",
            directory,
            "--json",
            '{"seconds": 0, "marker": "/dev/null"}',
        ),
        "status": rabbitq_cli(
            url, env, "status", "--json", "-t", directory, "--management-url", api
        ),
        "parking": rabbitq_cli(url, env, "parking", "list", "proc", "--json", "-t", directory),
        "check": rabbitq_cli(url, env, "check", "--json", "-t", directory, "--management-url", api),
        # on uvloop, by an address the certificate does not carry, with the name it does
        "consume": rabbitq_cli(
            node.url("127.0.0.2", "server_name_indication=localhost"),
            env,
            *("consume", "proc", "--burst", "--json", "--app", "tests.broker.apps:app"),
            *("-t", directory),
        ),
    }
    for what, run in runs.items():
        assert run.returncode == 0, f"{what}: {run.stdout}\n{run.stderr}"
        for secret in secrets_of(node):
            assert secret not in run.stdout + run.stderr
    # check read the broker over both: its topology and alarms come from amqps and https
    found = {f["check"]: f for f in json.loads(runs["check"].stdout)["findings"]}
    assert found["topology"]["status"] == "ok" and found["alarm"]["status"] == "ok", found
    status = json.loads(runs["status"].stdout)
    assert status["management"] is True and status["note"] is None, status  # read over https
    assert status["workloads"]["proc"]["ready"] == 1, status
    assert json.loads(runs["consume"].stdout)["outcomes"]["succeeded"] == 1, runs["consume"].stdout


FAILURES = [
    # (case, host, query options, a regex for what the one line says)
    ("untrusted-ca", "localhost", {"cacertfile": "other-ca"}, "not signed by a trusted CA"),
    ("hostname", "127.0.0.2", {}, r"does not name '127\.0\.0\.2' \(hostname mismatch\)"),
    (
        "sni-name",
        "localhost",
        {"server_name_indication": "mq.example"},
        "does not name 'mq.example'",
    ),
    (
        "missing-ca",
        "localhost",
        {"cacertfile": "/nonexistent/ca.pem"},
        "cannot read cacertfile '/nonexistent/ca.pem': No such file",
    ),
    (
        "no-client-cert",
        "localhost",
        {"certfile": "", "keyfile": ""},
        # over TLS 1.3 the broker's alert can be lost to the reset that follows it
        "(the broker requires|it may require) a client certificate",
    ),
    (
        "client-cert-of-other-ca",
        "localhost",
        {"certfile": "other-client", "keyfile": "other-client-key"},
        "the broker does not trust the client certificate's CA|it may have refused the client",
    ),
]


def _options(c: Certificates, options: dict[str, str]) -> dict[str, str]:
    names = {
        "other-ca": c.other_ca,
        "other-client": c.other_client,
        "other-client-key": c.other_client_key,
    }
    return {k: names.get(v, v) for k, v in options.items()}


@pytest.mark.parametrize(
    ("host", "options", "says"), [pytest.param(*case[1:], id=case[0]) for case in FAILURES]
)
async def test_a_failed_handshake_says_why_in_one_line(node, host, options, says):
    """The library raises ConnectionFailed naming the cause; no password, no key in it."""
    url = node.url(host, query(node.certificates, **_options(node.certificates, options)))
    with pytest.raises(ConnectionFailed) as failed:
        connection = await connect(url, "test tls failure")
        await connection.close()
    text = str(failed.value)
    assert re.search(says, text), text
    assert "\n" not in text
    for secret in secrets_of(node):
        assert secret not in text


@pytest.mark.parametrize("case", ["untrusted-ca", "hostname"])
def test_the_cli_prints_one_error_line_and_exits_1(node, tmp_path, case):
    """`rabbitq topology apply` over a bad handshake: `error: ...` naming the cause, exit 1."""
    _, host, options, says = next(f for f in FAILURES if f[0] == case)
    url = node.url(host, query(node.certificates, **_options(node.certificates, options)))
    directory = tmp_path / "topology"
    directory.mkdir()
    (directory / "t.toml").write_text('namespace = "tlsfail"\n' + toml_for({"jobs": {}}))
    run = rabbitq_cli(url, {}, "topology", "apply", "-t", directory)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(says, lines[0]), (
        run.stderr
    )
    for secret in secrets_of(node):
        assert secret not in run.stdout + run.stderr


async def test_an_expired_broker_certificate_fails_with_its_own_error(node):
    """With the broker serving an expired certificate, connecting says it expired."""
    await asyncio.to_thread(node.serve, "expired-server")
    try:
        with pytest.raises(ConnectionFailed, match="the broker's certificate has expired"):
            connection = await connect(node.url(query=query(node.certificates)), "test expired")
            await connection.close()
    finally:
        await asyncio.to_thread(node.serve, "server")


async def test_the_management_api_is_verified_with_the_amqp_urls_ca(node):
    """The https API is read with the URL's CA and client certificate; another CA fails."""
    api = f"https://localhost:{node.management_port}"
    good = Management.from_urls(node.url(query=query(node.certificates)), api)
    assert (await good.overview())["node"] == node.name
    bad_url = node.url(query=query(node.certificates, cacertfile=node.certificates.other_ca))
    with pytest.raises(ManagementUnavailable, match="not signed by a trusted CA"):
        await Management.from_urls(bad_url, api).overview()


async def test_the_console_reads_the_broker_over_amqps(node, tmp_path):
    """The console's overview comes from amqps (the certificates in the URL's query) and the
    management API over https, and shows no secret."""
    directory = tmp_path / "topology"
    directory.mkdir()
    namespace = f"tls{os.urandom(4).hex()}"
    (directory / "t.toml").write_text(f'namespace = "{namespace}"\n' + toml_for({"proc": {}}))
    applied = rabbitq_cli(
        node.url(), tls_env(node.certificates), "topology", "apply", "-t", directory
    )
    assert applied.returncode == 0, applied.stderr
    url = node.url(query=query(node.certificates))
    api = f"https://localhost:{node.management_port}"
    async with console(url, directory, namespace, "--management-url", api) as base:
        code, page = await call(base, "/")
        parked = await call(base, "/workloads/proc")
    # its depths came over amqps; a management API it could not read would be a note
    assert code == 200 and 'data-workload="proc"' in page and 'class="note"' not in page, page
    assert parked[0] == 200, parked
    for secret in secrets_of(node):
        assert secret not in page + parked[1]
