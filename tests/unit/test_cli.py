"""The `rabbitq` command without a broker: topology show, and errors as one line on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import rabbitq._cli
from rabbitq._cli import cli

TOPOLOGY = """
namespace = "shop"

[workloads.emails]
capacity = 8

[workloads.emails.retry]
tiers = ["200ms", "1s"]
max_attempts = 3
"""

# Keep the developer's environment out of the options that read env vars.
CLEAN_ENV: dict[str, str | None] = {
    "RABBITQ_TOPOLOGY": None,
    "RABBITQ_NAMESPACE": None,
    "RABBITQ_URL": None,
    "RABBITQ_APP": None,
}


def _invoke(*args: str) -> Result:
    # typer 0.29's CliRunner keeps stdout and stderr apart (`output` has both, interleaved).
    return CliRunner(env=CLEAN_ENV).invoke(cli, list(args))


@pytest.fixture
def topology_dir(tmp_path: Path) -> Path:
    (tmp_path / "shop.toml").write_text(TOPOLOGY, encoding="utf-8")
    return tmp_path


def test_topology_show_prints_queues_bindings_and_flow(topology_dir: Path) -> None:
    """`topology show` prints the namespace, exchanges, queues with arguments, bindings and flow."""
    result = _invoke("topology", "show", "--topology", str(topology_dir))
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "namespace shop"
    for line in [
        "  shop.tasks (direct, durable)",
        "  shop.emails.work [work] x-queue-type=classic x-max-priority=4 "
        "x-dead-letter-exchange=shop.parking x-dead-letter-routing-key=emails",
        "  shop.emails.retry.200ms [tier] x-queue-type=quorum x-message-ttl=200 "
        "x-dead-letter-exchange=shop.tasks x-dead-letter-routing-key=emails "
        "x-dead-letter-strategy=at-least-once x-overflow=reject-publish",
        "  shop.emails.retry.1s [tier] x-queue-type=quorum x-message-ttl=1000 "
        "x-dead-letter-exchange=shop.tasks x-dead-letter-routing-key=emails "
        "x-dead-letter-strategy=at-least-once x-overflow=reject-publish",
        "  shop.emails.parking [parking] x-queue-type=classic",
        "  shop.retry --emails.200ms--> shop.emails.retry.200ms",
        "  emails (capacity 8, 3 attempts):",
        "    shop.tasks -> shop.emails.work",
        "    fails (attempt 1) -> shop.emails.retry.200ms (200ms) -> work",
        "    fails (attempt 2) -> shop.emails.retry.1s (1s) -> work",
        "    fails (attempt 3) or poison -> shop.emails.parking",
    ]:
        assert line in lines
    assert [h for h in lines if h.endswith(":") and not h.startswith(" ")] == [
        "exchanges:",
        "queues:",
        "bindings:",
        "flow:",
    ]


def test_topology_show_namespace_option_overrides_the_files(topology_dir: Path) -> None:
    """`--namespace` renames every exchange and queue."""
    result = _invoke("topology", "show", "--topology", str(topology_dir), "--namespace", "ci")
    assert result.exit_code == 0, result.output
    assert "  ci.emails.work [work]" in result.stdout
    assert "shop." not in result.stdout


def test_topology_show_json_is_one_document(topology_dir: Path) -> None:
    """`topology show --json` prints one JSON document with stable top-level keys, nothing else."""
    result = _invoke("topology", "show", "--topology", str(topology_dir), "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    data = json.loads(result.stdout)
    assert set(data) == {"namespace", "exchanges", "queues", "bindings", "workloads"}
    assert data["namespace"] == "shop"
    assert [q["name"] for q in data["queues"]] == [
        "shop.emails.work",
        "shop.emails.retry.200ms",
        "shop.emails.retry.1s",
        "shop.emails.parking",
    ]
    assert data["workloads"]["emails"]["source"] == str(topology_dir / "shop.toml")


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("namespace = ", ""),
        ("[workloads.emails]\ncapacity = -1\n", "workloads.emails.capacity"),
        ('[workloads.emails.retry]\ntiers = ["10s", "1s"]\n', "workloads.emails.retry.tiers"),
        ("[workloads.emails]\nbogus = 1\n", "workloads.emails.bogus"),
    ],
)
def test_invalid_topology_prints_one_error_line_and_exits_1(
    tmp_path: Path, text: str, field: str
) -> None:
    """An invalid file gives exactly one `error: ` line on stderr naming file and field; exit 1."""
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    result = _invoke("topology", "show", "--topology", str(tmp_path))
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: {field}" if field else f"error: {path}")
    assert "Traceback" not in result.output


def test_invalid_topology_with_json_prints_an_error_object(tmp_path: Path) -> None:
    """With --json, an invalid file gives one JSON object on stderr with its facts; exit 1."""
    path = tmp_path / "bad.toml"
    path.write_text("[workloads.emails]\ncapacity = -1\n", encoding="utf-8")
    result = _invoke("topology", "show", "--topology", str(tmp_path), "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    error = json.loads(result.stderr)
    assert error["type"] == "TopologyInvalid"
    assert (error["file"], error["field"], error["value"]) == (
        str(path),
        "workloads.emails.capacity",
        "-1",
    )


def test_topology_dir_without_files_is_one_error_line(tmp_path: Path) -> None:
    """A directory with no *.toml files is an error line naming the directory; exit 1."""
    result = _invoke("topology", "show", "--topology", str(tmp_path))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"error: {tmp_path}: no *.toml topology files found"]


@pytest.fixture
def quiet_consume(monkeypatch: pytest.MonkeyPatch) -> None:
    # `consume` configures root logging and imports the --app from the working directory;
    # keep both from leaking into other tests.
    monkeypatch.setattr(rabbitq._cli, "_setup_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.mark.usefixtures("quiet_consume")
@pytest.mark.parametrize(
    ("app_spec", "message"),
    [
        (
            "no_such_module_for_rabbitq_tests:app",
            "cannot import 'no_such_module_for_rabbitq_tests'",
        ),
        ("tests.unit.test_cli", "must look like 'package.module:app'"),
        (":app", "must look like 'package.module:app'"),
        ("json:dumps", "'dumps' is not a rabbitq.App (got function)"),
        ("json:missing", "'missing' is not a rabbitq.App (got NoneType)"),
    ],
)
def test_consume_with_a_bad_app_prints_one_error_line(
    topology_dir: Path, app_spec: str, message: str
) -> None:
    """`consume --app` that does not point at an App exits 1 with one `error: ` line."""
    result = _invoke("consume", "emails", "--topology", str(topology_dir), "--app", app_spec)
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: --app {app_spec!r}")
    assert message in lines[0]


@pytest.mark.usefixtures("quiet_consume")
def test_consume_unknown_workload_prints_one_error_line(topology_dir: Path) -> None:
    """`consume` of a workload the topology does not declare exits 1 naming what exists."""
    result = _invoke("consume", "sms", "--topology", str(topology_dir), "--app", "json:dumps")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: topology: workload = 'sms': no such workload (declared: emails)"
    ]
