"""The shipped compose file, Prometheus config, alert rules and Grafana dashboard, without Docker.

They must agree with each other (service names, ports, the datasource uid, mounted paths) and
pass the tools that read them: `docker-compose config`, `promtool check config|rules`. That
the expressions return data from a real consumer and broker is tests/broker/test_prometheus.py.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from rabbitq._topology import load_topology
from tests.background import require
from tests.observability import (
    COMPOSE,
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    PROMETHEUS_CONFIG,
    ROOT,
    RULES,
    dashboard_queries,
    load_dashboard,
    load_yaml,
    panels,
    rule_queries,
    rules,
)

# The metric contract (issue #5): names the dashboard and the rules may use.
RABBITQ_METRICS = {
    "rabbitq_tasks_total",
    "rabbitq_tasks_parked_total",
    "rabbitq_task_duration_seconds",
    "rabbitq_task_queue_latency_seconds",
    "rabbitq_running_handlers",
    "rabbitq_capacity",
    "rabbitq_consumer_ready",
    "rabbitq_connected",
    "rabbitq_reconnects_total",
    "rabbitq_loop_blocked_seconds_total",
    "rabbitq_publishes_total",
    "rabbitq_publish_confirm_seconds",
}
BROKER_METRICS = {
    "rabbitmq_detailed_queue_messages_ready",
    "rabbitmq_detailed_queue_messages_unacked",
    "rabbitmq_detailed_queue_messages",
    "rabbitmq_detailed_queue_consumers",
    "rabbitmq_detailed_queue_head_message_timestamp",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


@pytest.fixture(scope="module")
def scrape() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(PROMETHEUS_CONFIG)
    return data


@pytest.fixture(scope="module")
def datasource() -> dict[str, Any]:
    (only,) = load_yaml(DATASOURCES)["datasources"]
    result: dict[str, Any] = only
    return result


def container_ports(service: dict[str, Any]) -> set[int]:
    """The ports a service listens on in its container, from `ports` and `expose`."""
    out = set()
    for entry in [*service.get("ports", []), *service.get("expose", [])]:
        target = str(entry).rsplit(":", 1)[-1].split("/")[0]
        out.add(int(target))
    return out


def option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_docker_compose_accepts_the_compose_file():
    """`docker-compose config` parses and validates docker-compose.yml."""
    binary = require("docker-compose", "docker-compose")
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_every_file_the_compose_file_mounts_or_builds_from_exists(services):
    """Bind mounts, build contexts and what the Dockerfile copies are all in the repository."""
    checked = 0
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"service {name!r} mounts missing {source!r}"
                checked += 1
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = (
                "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            )
            assert (context / dockerfile).is_file(), f"service {name!r} builds from nothing"
            checked += 1
    assert checked >= 8


def dockerfile_copies() -> list[str]:
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            sources.extend(parts[:-1])
    return sources


def test_the_image_gets_every_file_it_copies():
    """Each COPY source exists and .dockerignore does not exclude it from the context."""
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    sources = dockerfile_copies()
    assert {"pyproject.toml", "README.md", "rabbitq/", "topology/", "examples/"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies missing {source!r}"
        assert source.rstrip("/") not in ignored, f".dockerignore excludes {source!r}"


def scrape_targets(scrape: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(job, host, port) of every static target."""
    out = []
    for job in scrape["scrape_configs"]:
        for group in job["static_configs"]:
            for target in group["targets"]:
                host, port = target.rsplit(":", 1)
                out.append((job["job_name"], host, int(port)))
    return out


def test_scrape_targets_are_compose_services_listening_on_those_ports(scrape, services):
    """Each target is a service by that name whose container listens on the scraped port."""
    targets = scrape_targets(scrape)
    assert {(host, port) for _, host, port in targets} >= {("worker", 9100), ("rabbitmq", 15692)}
    for job, host, port in targets:
        assert host in services, f"job {job!r} scrapes {host!r}, which is not a service"
        assert port in container_ports(services[host]), (
            f"job {job!r} scrapes {host}:{port}, but the service does not publish or expose it"
        )
        if job == "rabbitq":
            command = services[host]["command"]
            assert option(command, "--metrics-port") == str(port), (
                f"{host!r} serves its metrics on {option(command, '--metrics-port')}, "
                f"Prometheus scrapes {port}"
            )


def test_the_broker_is_scraped_on_the_detailed_endpoint_of_the_spec(scrape):
    """The rabbitmq job asks for the per-queue families the dashboard and the rules use."""
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "rabbitmq"]
    assert job["metrics_path"] == "/metrics/detailed"
    assert set(job["params"]["family"]) == {
        "queue_coarse_metrics",
        "queue_consumer_count",
        "queue_metrics",
    }
    assert job["static_configs"][0]["targets"] == ["rabbitmq:15692"]


def test_the_broker_container_enables_the_prometheus_plugin(services):
    """The mounted enabled_plugins file turns on management and prometheus."""
    mounts = dict(str(v).split(":")[:2] for v in services["rabbitmq"]["volumes"])
    source = next(s for s, target in mounts.items() if target == "/etc/rabbitmq/enabled_plugins")
    text = (ROOT / source).read_text()
    assert re.fullmatch(r"\[[a-z_,\s]+\]\.\s*", text), "enabled_plugins must be an Erlang list"
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= set(re.findall(r"[a-z_]+", text))


def test_the_containers_log_in_with_a_user_the_broker_defines(compose, services):
    """RABBITQ_URL's user and password match a hash in the definitions the broker loads."""
    url = urlsplit(compose["x-rabbitq"]["environment"]["RABBITQ_URL"])
    assert url.hostname == "rabbitmq" and url.hostname in services
    assert url.username != "guest", "guest may only connect from localhost"
    definitions = load_yaml(ROOT / "rabbitmq" / "definitions.json")
    (user,) = [u for u in definitions["users"] if u["name"] == url.username]
    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    raw = base64.b64decode(user["password_hash"])
    salt, digest = raw[:4], raw[4:]
    assert hashlib.sha256(salt + (url.password or "").encode()).digest() == digest
    assert any(p["user"] == url.username and p["vhost"] == "/" for p in definitions["permissions"])
    conf = (ROOT / "rabbitmq" / "rabbitmq.conf").read_text()
    assert "load_definitions = /etc/rabbitmq/definitions.json" in conf


def test_the_worker_runs_a_workload_and_app_that_exist(services):
    """`consume demo --app examples.demo_app:app`: the workload and the App are there."""
    command = services["worker"]["command"]
    assert command[:2] == ["consume", "demo"]
    load_topology(ROOT / "topology").workload(command[1])
    module, _, attribute = (option(command, "--app") or "").partition(":")
    assert hasattr(importlib.import_module(module), attribute)
    assert services["feeder"]["entrypoint"][-1] == "examples.feed"
    assert (ROOT / "examples" / "feed.py").is_file()


def test_the_console_is_published_on_its_port_with_its_token_from_the_environment(
    compose, services
):
    """`console --host 0.0.0.0 --port P` publishes P, reaches the broker as the others do, and
    takes RABBITQ_CONSOLE_TOKEN from the shell (never written in the file); the image has the
    console extra."""
    console = services["console"]
    command = console["command"]
    assert command[0] == "console" and option(command, "--host") == "0.0.0.0"
    assert int(option(command, "--port") or 0) in container_ports(console)
    environment = console["environment"]
    assert environment["RABBITQ_URL"] == compose["x-rabbitq"]["environment"]["RABBITQ_URL"]
    assert "RABBITQ_CONSOLE_TOKEN" in environment and environment["RABBITQ_CONSOLE_TOKEN"] is None
    installs = [
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if "pip install" in line
    ]
    assert any("[console]" in line for line in installs), installs


def test_grafana_reads_the_prometheus_service(datasource, scrape, services):
    """The datasource URL is the prometheus service's port; its interval is the scrape's."""
    url = urlsplit(datasource["url"])
    assert (url.hostname, url.port) == ("prometheus", 9090)
    assert 9090 in container_ports(services["prometheus"])
    assert datasource["type"] == "prometheus" and datasource["uid"]
    assert datasource["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]


def test_the_dashboards_load_from_where_compose_mounts_them(services):
    """The provider's path is the container side of the grafana/dashboards mount."""
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    mounts = dict(str(v).split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_the_dashboard_is_well_formed_and_every_panel_uses_the_provisioned_datasource(
    datasource,
):
    """Unique ids, laid out on the grid, each query with a refId and the datasource by uid."""
    dashboard = load_dashboard()
    assert dashboard["uid"] == "rabbitq" and dashboard["title"] == "rabbitq"
    every = panels(dashboard)
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    queried = [p for p in every if p["type"] != "row"]
    assert len(queried) >= 12
    for panel in queried:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, title
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, title
        assert panel["targets"], f"panel {title!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target["expr"].strip(), title
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], title
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "workload"
    assert variable["datasource"]["uid"] == datasource["uid"]
    assert variable["query"]["query"] == "label_values(rabbitq_tasks_total, workload)"
    assert variable["includeAll"] and variable["allValue"] == ".+"


def test_the_dashboard_covers_the_requested_panels():
    """Throughput, parking, latencies, capacity, depths, consumers, publishes and reconnects."""
    titles = {p["title"] for p in panels(load_dashboard())}
    assert {
        "Throughput by outcome",
        "Parked by reason",
        "Handler duration",
        "Queue latency",
        "Running handlers against capacity",
        "Queue depths",
        "Parking lot growth",
        "Oldest parked task",
        "Consumers per work queue",
        "Publishes by kind and outcome",
        "Publish confirm latency p99",
        "Reconnects",
    } <= titles


def test_dashboard_rates_use_grafanas_rate_interval():
    """Every range vector in the dashboard is `[$__rate_interval]` (or `[$__range]`)."""
    for panel in panels(load_dashboard()):
        for target in panel.get("targets", []):
            outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', target["expr"])
            for window in re.findall(r"\[([^\]]*)\]", outside_strings):
                assert window in ("$__rate_interval", "$__range"), (panel["title"], window)


def test_every_grafana_variable_of_the_dashboard_is_expanded_for_prometheus():
    """After `expand`, no `$variable` is left but label_replace's `$1`."""
    for query in dashboard_queries():
        assert "$" not in query.expr.replace('"$1"', ""), query


@pytest.mark.parametrize("query", dashboard_queries() + rule_queries(), ids=lambda q: q.where)
def test_queries_use_only_metrics_of_the_contract(query):
    """No typo in a metric name: each is rabbitq's (issue #5) or the broker's detailed family."""
    names = set(re.findall(r"\b(rabbit(?:q|mq)_[a-z_]+)\b", query.expr))
    assert names, query.expr
    for name in names:
        base = name
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in RABBITQ_METRICS:
                base = name.removesuffix(suffix)
        assert base in RABBITQ_METRICS | BROKER_METRICS, f"{query.where} uses unknown {name!r}"


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_every_alert_has_a_for_a_severity_and_annotations(rule):
    """Alerts wait (`for:`), carry a severity and explain themselves."""
    assert re.fullmatch(r"\d+[smh]", rule["for"])
    assert rule["labels"]["severity"] in ("warning", "critical")
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_requested_alerts_are_there():
    """Parking growth, no consumer, queue latency over 60 s, frequent reconnects."""
    by_name = {rule["alert"]: rule["expr"] for rule in rules()}
    assert set(by_name) == {
        "RabbitqParkingLotGrowing",
        "RabbitqWorkQueueWithoutConsumer",
        "RabbitqQueueLatencyHigh",
        "RabbitqConsumerReconnecting",
    }
    assert "rabbitmq_detailed_queue_consumers" in by_name["RabbitqWorkQueueWithoutConsumer"]
    assert re.search(r"\)\s*>\s*60\s*$", by_name["RabbitqQueueLatencyHigh"])
    assert re.search(r"\[15m\]\)\s*>\s*3\s*$", by_name["RabbitqConsumerReconnecting"])


def test_promtool_accepts_the_config_and_the_rules():
    """`promtool check config` (which loads the rule files) and `promtool check rules` pass."""
    promtool = require("promtool", "prometheus")
    for args in (["check", "config", str(PROMETHEUS_CONFIG)], ["check", "rules", str(RULES)]):
        result = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    """The dashboard's queries, variables expanded as Grafana would, are valid PromQL."""
    promtool = require("promtool", "prometheus")
    recording = [
        {"record": f"dashboard:query_{i}", "expr": query.expr}
        for i, query in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
