"""Acceptance for issue #5: the shipped dashboard and alerts return data from a real run.

A real `prometheus` scrapes a `rabbitq consume --metrics-port` process, this test's own
publisher (as the compose feeder) and the broker's prometheus plugin, with the shipped config
(targets rewritten to this machine, 1 s intervals) and the shipped rules. The test runs
successes, retries, parked tasks (retries exhausted and poison), tasks whose publish time is
backdated past the latency alert's threshold, a workload with ready tasks and no consumer, and
closes the consumer's connection more than 3 times. Then every expression of the dashboard
(Grafana's variables expanded) and of the rules must return data through Prometheus' HTTP API,
and the counters must say what the test did.

Prometheus keeps only this test's queues from the broker (a metric_relabel_configs `keep` on the
namespace), so other users of the shared broker cannot make an expression return data.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from rabbitq import App, Metrics
from rabbitq._topology import Topology, Workload
from rabbitq._wire import HEADER_ATTEMPT, HEADER_PUBLISHED_AT
from tests.background import free_port, process, require, stderr_of
from tests.broker.obs_app import IDLE_WORKLOAD, WORKLOAD, Item
from tests.helpers import wait_until
from tests.observability import (
    PROMETHEUS_CONFIG,
    ROOT,
    dashboard_queries,
    load_yaml,
    rule_queries,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CAPACITY = 8
SPEC = {"capacity": CAPACITY, "retry": {"tiers": ["50ms"], "max_attempts": 2}}
IDLE_SPEC = {"retry": {"tiers": ["50ms"], "max_attempts": 2}}
BROKER_METRICS_PORT = 15692

OK, FLAKY, DOOMED, IDLE = 20, 5, 3, 3  # published through the App
LATE, UNKNOWN, INVALID = 10, 2, 2  # published raw: backdated, unknown task, invalid payload
BACKDATE_SECONDS = 180  # the latency alert fires over 60 s
CLOSES = 4  # the reconnect alert fires over 3 in 15 minutes

RUNS = OK + 2 * FLAKY + 2 * DOOMED + LATE  # handler runs: flaky and doomed run twice
OUTCOMES = {
    "succeeded": OK + FLAKY + LATE,
    "retried": FLAKY + DOOMED,
    "parked": DOOMED + UNKNOWN + INVALID,
    "expired": 0,
    "redelivered": 0,
}
PARKED = {
    ("retries_exhausted", "doomed"): DOOMED,
    ("unknown_task", "_unknown"): UNKNOWN,
    ("invalid_payload", "ok"): INVALID,
}


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and body; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


async def get(url: str) -> tuple[int, bytes]:
    return await asyncio.to_thread(http_get, url)


# -- the processes -------------------------------------------------------------------------


def prometheus_config(
    shipped: dict[str, Any], targets: dict[str, str], namespace: str
) -> dict[str, Any]:
    """The shipped config with this machine's targets, 1 s intervals and this test's queues."""
    config = copy.deepcopy(shipped)
    config["global"] |= {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    # the same rule files, found from here rather than from next to the temporary config
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in shipped["rule_files"]]
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            unknown = set(group["targets"]) - set(targets)
            assert not unknown, f"the test does not know where {unknown} runs here"
            group["targets"] = [targets[t] for t in group["targets"]]
        if job["job_name"] == "rabbitmq":
            job["metric_relabel_configs"] = [
                {
                    "source_labels": ["queue"],
                    "regex": re.escape(namespace) + r"\..+",
                    "action": "keep",
                }
            ]
    return config


@contextlib.contextmanager
def serving(registry: CollectorRegistry, port: int) -> Iterator[None]:
    """The registry on 127.0.0.1:port, as the compose feeder serves its publish metrics."""
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# -- reading the consumer's /metrics and Prometheus ------------------------------------------


async def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = await get(f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        return {}
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


async def query(base: str, expr: str) -> list[dict[str, Any]]:
    status, body = await get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    data = json.loads(body) if body else {}
    assert status in (0, 200), f"Prometheus rejected {expr!r}: {data.get('error', body)!r}"
    result: list[dict[str, Any]] = data.get("data", {}).get("result", [])
    return result


def values(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1]) for r in result}


# -- the broker ------------------------------------------------------------------------------


async def ensure_broker_exporter(host: str) -> None:
    """The broker's prometheus plugin answers on :15692; enabled here if it is not yet."""
    url = f"http://{host}:{BROKER_METRICS_PORT}/metrics"
    if (await get(url))[0] == 200:
        return
    plugins = require("rabbitmq-plugins", "rabbitmq-server")
    await asyncio.to_thread(
        subprocess.run,
        [plugins, "-q", "enable", "rabbitmq_prometheus"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    await wait_until(
        lambda: _answers(url), timeout=30, what=f"the broker's prometheus plugin to answer on {url}"
    )


async def _answers(url: str) -> bool:
    return (await get(url))[0] == 200


def socket_ports(pid: int, remote_port: int) -> set[int]:
    """Local ports of the process's TCP connections to `remote_port` (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            match = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
            if match:
                inodes.add(match[1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def consumer_connections(rabbitmqctl: str, pid: int, amqp_port: int) -> list[str]:
    """Broker pids of the consuming connection(s) of the consumer process `pid`: only ours.

    Matched by the client's port (the process's own sockets) and by rabbitq's connection name
    (`rabbitq consumer WORKLOAD on HOST`, not its publisher's).
    """
    ports = socket_ports(pid, amqp_port)
    listed = subprocess.run(
        [
            rabbitmqctl,
            "-q",
            "list_connections",
            "--no-table-headers",
            "peer_port",
            "pid",
            "client_properties",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    out = []
    for line in listed.splitlines():
        port, _, rest = line.partition("\t")
        broker_pid, _, properties = rest.partition("\t")
        name = re.search(r'\{"connection_name","([^"]*)"\}', properties)
        if (
            port.isdigit()
            and int(port) in ports
            and name
            and name[1].startswith(f"rabbitq consumer {WORKLOAD} ")
        ):
            out.append(broker_pid)
    return out


async def close_consumer_connection(rabbitmqctl: str, pid: int, amqp_port: int) -> None:
    found: list[str] = []

    async def listed() -> bool:
        found[:] = await asyncio.to_thread(consumer_connections, rabbitmqctl, pid, amqp_port)
        return len(found) == 1

    await wait_until(
        listed,
        timeout=20,
        interval=0.2,
        what="the consumer's connection to show in list_connections",
    )
    await asyncio.to_thread(
        subprocess.run,
        [rabbitmqctl, "-q", "close_connection", found[0], "test_prometheus: forced close"],
        capture_output=True,
        timeout=30,
        check=True,
    )


# -- publishing ------------------------------------------------------------------------------


def publisher_app(namespace: str, url: str, metrics: Metrics) -> tuple[App, dict[str, Any]]:
    """An App with the consumer app's task names and models, counting into `metrics`."""
    app = App(namespace=namespace, url=url, metrics=metrics)
    tasks = {}
    for name, workload in (
        ("ok", WORKLOAD),
        ("flaky", WORKLOAD),
        ("doomed", WORKLOAD),
        ("idle", IDLE_WORKLOAD),
    ):

        async def stub(item: Item) -> None:
            return None

        tasks[name] = app.task(name, workload=workload)(stub)
    return app, tasks


async def publish_raw(
    channel: aio_pika.abc.AbstractChannel,
    topology: Topology,
    task: str,
    body: bytes,
    published_at: float,
) -> None:
    """A task in the documented wire format, straight through aio-pika."""
    workload = topology.workload(WORKLOAD)
    exchange = await channel.get_exchange(workload.task_exchange, ensure=False)
    await exchange.publish(
        aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=uuid.uuid4().hex,
            type=task,
            timestamp=published_at,
            headers={HEADER_ATTEMPT: 1, HEADER_PUBLISHED_AT: int(published_at * 1000)},
        ),
        routing_key=workload.routing_key,
        mandatory=True,
    )


# -- the test --------------------------------------------------------------------------------


async def test_every_dashboard_and_alert_expression_returns_data_from_a_real_run(
    make_topology, topology_dir, connection, url, namespace, tmp_path
):
    """Each panel query and alert expression returns data; the counters match what ran."""
    prometheus = require("prometheus", "prometheus")
    rabbitmqctl = require("rabbitmqctl", "rabbitmq-server")
    broker = urllib.parse.urlsplit(url)
    host, amqp_port = broker.hostname or "127.0.0.1", broker.port or 5672
    await ensure_broker_exporter(host)

    # with the delay ladder: the dashboard shows what waits in it
    topology = await make_topology(delays=True, **{WORKLOAD: SPEC, IDLE_WORKLOAD: IDLE_SPEC})
    work = topology.workload(WORKLOAD)
    idle = topology.workload(IDLE_WORKLOAD)
    directory = topology_dir(**{WORKLOAD: SPEC, IDLE_WORKLOAD: IDLE_SPEC})
    consumer_port, feeder_port, prometheus_port = free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{prometheus_port}"
    shipped = load_yaml(PROMETHEUS_CONFIG)
    config = prometheus_config(
        shipped,
        {
            "worker:9100": f"127.0.0.1:{consumer_port}",
            "feeder:9101": f"127.0.0.1:{feeder_port}",
            "rabbitmq:15692": f"{host}:{BROKER_METRICS_PORT}",
        },
        namespace,
    )
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))

    registry = CollectorRegistry()
    app, tasks = publisher_app(namespace, url, Metrics(registry))
    with contextlib.ExitStack() as stack:
        stack.enter_context(serving(registry, feeder_port))
        consumer = stack.enter_context(
            process(
                [
                    sys.executable,
                    "-m",
                    "rabbitq",
                    "consume",
                    WORKLOAD,
                    "--app",
                    "tests.broker.obs_app:app",
                    "--topology",
                    str(directory),
                    "--namespace",
                    namespace,
                    "--metrics-port",
                    str(consumer_port),
                    "--grace",
                    "5",
                ],
                tmp_path,
                "consumer",
                cwd=ROOT,
                env={**os.environ, "RABBITQ_URL": url},
            )
        )
        stack.enter_context(
            process(
                [
                    prometheus,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                    "--log.level=warn",
                ],
                tmp_path,
                "prometheus",
            )
        )
        try:
            await run_and_check(
                base,
                app,
                tasks,
                connection,
                topology,
                work,
                idle,
                consumer,
                consumer_port,
                rabbitmqctl,
                amqp_port,
            )
        except BaseException:
            print("consumer stderr:\n" + stderr_of(tmp_path, "consumer"))
            print("prometheus stderr:\n" + stderr_of(tmp_path, "prometheus"))
            raise
        finally:
            await app.close()


async def run_and_check(
    base: str,
    app: App,
    tasks: dict[str, Any],
    connection: aio_pika.abc.AbstractConnection,
    topology: Topology,
    work: Workload,
    idle: Workload,
    consumer: subprocess.Popen[bytes],
    consumer_port: int,
    rabbitmqctl: str,
    amqp_port: int,
) -> None:
    async def consumer_ready() -> bool:
        assert consumer.poll() is None, "the consumer exited"
        return (await get(f"http://127.0.0.1:{consumer_port}/readyz"))[0] == 200

    await wait_until(consumer_ready, timeout=30, interval=0.1, what="the consumer's /readyz")

    async def every_target_up() -> bool:
        status, body = await get(f"{base}/api/v1/targets")
        if status != 200:
            return False
        targets = json.loads(body)["data"]["activeTargets"]
        return len(targets) == 3 and all(t["health"] == "up" for t in targets)

    await wait_until(
        every_target_up,
        timeout=30,
        interval=0.2,
        what="Prometheus to scrape the consumer, the publisher and the broker",
    )

    async def queues_seen() -> bool:
        # the parking lot must be seen empty first: the growth alert compares with it
        seen = values(await query(base, "rabbitmq_detailed_queue_messages"), "queue")
        return seen.get((work.parking_queue,)) == 0 and (idle.work_queue,) in seen

    await wait_until(
        queues_seen,
        timeout=30,
        interval=0.2,
        what="Prometheus to see this test's queues, empty, from the broker",
    )

    # The run: through the App, then raw (backdated, and poison) in the documented wire format.
    await app.publish_many(
        [tasks["ok"].message(Item(n=i)) for i in range(OK)]
        + [tasks["flaky"].message(Item(n=i)) for i in range(FLAKY)]
        + [tasks["doomed"].message(Item(n=i)) for i in range(DOOMED)]
        + [tasks["idle"].message(Item(n=i)) for i in range(IDLE)]
    )
    channel = await connection.channel()
    try:
        now = time.time()
        for i in range(LATE):
            await publish_raw(
                channel,
                topology,
                "ok",
                Item(n=i).model_dump_json().encode(),
                now - BACKDATE_SECONDS,
            )
        for _ in range(UNKNOWN):
            await publish_raw(channel, topology, "no.such.task", b"{}", now)
        for _ in range(INVALID):
            await publish_raw(channel, topology, "ok", b'{"n": "not a number"}', now)
    finally:
        await channel.close()

    async def settled() -> bool:
        samples = await scrape(consumer_port)
        return all(
            total(samples, "rabbitq_tasks_total", outcome=o) == n for o, n in OUTCOMES.items()
        )

    await wait_until(
        settled, timeout=30, interval=0.1, what=f"the consumer to settle every task as {OUTCOMES}"
    )

    # Reconnects: close the consumer's own connection, each time after it is consuming again.
    for closed in range(1, CLOSES + 1):
        await close_consumer_connection(rabbitmqctl, consumer.pid, amqp_port)

        async def reconnected(closed: int = closed) -> bool:
            assert consumer.poll() is None, "the consumer exited"
            samples = await scrape(consumer_port)
            return (
                total(samples, "rabbitq_reconnects_total") == closed
                and total(samples, "rabbitq_consumer_ready") == 1
            )

        await wait_until(
            reconnected,
            timeout=30,
            interval=0.1,
            what=f"the consumer to reconnect after forced close {closed}",
        )

    # Every expression returns data (the broker refreshes its statistics every 5 s).
    pending = {q.expr: q for q in dashboard_queries() + rule_queries()}
    assert len(pending) >= 25

    async def all_return_data() -> bool:
        for expr in list(pending):
            if await query(base, expr):
                del pending[expr]
        return not pending

    try:
        await wait_until(
            all_return_data,
            timeout=60,
            interval=0.5,
            what="every dashboard and alert expression to return data",
        )
    except AssertionError:
        missing = "\n".join(f"  {q.where}: {q.expr}" for q in pending.values())
        raise AssertionError(f"these expressions never returned data:\n{missing}") from None

    # Grafana's variable query: label_values(rabbitq_tasks_total, workload).
    status, body = await get(
        f"{base}/api/v1/label/workload/values?"
        + urllib.parse.urlencode({"match[]": "rabbitq_tasks_total"})
    )
    assert status == 200 and WORKLOAD in json.loads(body)["data"]

    await assert_values(base, work, idle)


async def assert_values(base: str, work: Any, idle: Any) -> None:
    """What Prometheus holds is what the test did."""
    expected: dict[str, tuple[tuple[str, ...], dict[tuple[str, ...], float]]] = {
        "sum(rabbitq_tasks_parked_total)": ((), {(): DOOMED + UNKNOWN + INVALID}),
        "sum by (reason, task) (rabbitq_tasks_parked_total) > 0": (
            ("reason", "task"),
            {k: float(v) for k, v in PARKED.items()},
        ),
        "sum by (outcome) (rabbitq_tasks_total)": (
            ("outcome",),
            {(o,): float(n) for o, n in OUTCOMES.items()},
        ),
        "sum(rabbitq_task_duration_seconds_count)": ((), {(): RUNS}),
        "sum(rabbitq_task_queue_latency_seconds_count)": ((), {(): RUNS}),
        # only the backdated tasks waited over a minute
        "sum(rabbitq_task_queue_latency_seconds_count)"
        ' - sum(rabbitq_task_queue_latency_seconds_bucket{le="60.0"})': ((), {(): LATE}),
        'sum by (kind) (rabbitq_publishes_total{outcome="confirmed"})': (
            ("kind",),
            {
                ("task",): OK + FLAKY + DOOMED + IDLE,
                ("retry",): FLAKY + DOOMED,
                ("park",): DOOMED + UNKNOWN + INVALID,
                ("redeliver",): 0,
            },
        ),
        # no failed publish (those series exist only once one happens)
        'sum(rabbitq_publishes_total{outcome!="confirmed"}) or vector(0)': ((), {(): 0}),
        "sum(rabbitq_reconnects_total)": ((), {(): CLOSES}),
        "sum(rabbitq_capacity)": ((), {(): CAPACITY}),
        "sum(rabbitq_connected)": ((), {(): 1}),
        f'rabbitmq_detailed_queue_messages{{queue="{work.parking_queue}"}}': (
            (),
            {(): DOOMED + UNKNOWN + INVALID},
        ),
        f'rabbitmq_detailed_queue_messages_ready{{queue="{idle.work_queue}"}}': ((), {(): IDLE}),
        f'rabbitmq_detailed_queue_consumers{{queue="{work.work_queue}"}}': ((), {(): 1}),
        f'rabbitmq_detailed_queue_messages{{queue="{work.work_queue}"}}': ((), {(): 0}),
    }
    found: dict[str, dict[tuple[str, ...], float]] = {}

    async def all_match() -> bool:
        for expr, (labels, _) in expected.items():
            found[expr] = values(await query(base, expr), *labels)
        return all(found[e] == want for e, (_, want) in expected.items())

    try:
        await wait_until(all_match, timeout=20, interval=0.5, what="the values to match")
    except AssertionError:
        wrong = "\n".join(
            f"  {e}: found {found[e]}, expected {want}"
            for e, (_, want) in expected.items()
            if found[e] != want
        )
        raise AssertionError(f"Prometheus holds other values than the run made:\n{wrong}") from None
