"""The `rabbitq` command without a broker: topology show, and errors as one line on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import rabbitq._cli
from rabbitq._cli import cli
from tests.helpers import free_port

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
        # the ladder, summed up: its 113 objects are in --json
        "  shop.delay.00 .. shop.delay.27: 28 quorum queues, level i holds a task 2^i s "
        "(1s .. 4y93d), then dead-letters it one level down (at-least-once)",
        "    shop.delay.due --#.emails--> shop.emails.work",
    ]:
        assert line in lines
    assert [h for h in lines if h.endswith(":") and not h.startswith(" ")] == [
        "exchanges:",
        "queues:",
        "bindings:",
        "delays (publish with delay= or at=, up to 8y186d; shared by every workload):",
        "flow:",
    ]
    assert not [line for line in lines if "shop.delay.0" in line and "[delay]" in line]


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
    assert set(data) == {"namespace", "exchanges", "queues", "bindings", "delays", "workloads"}
    assert data["namespace"] == "shop"
    assert [q["name"] for q in data["queues"] if q["role"] != "delay"] == [
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


@pytest.fixture
def broken_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two importable modules that fail while being imported."""
    (tmp_path / "rabbitq_test_syntax.py").write_text("app = (\n", encoding="utf-8")
    (tmp_path / "rabbitq_test_raises.py").write_text("raise RuntimeError('boom')\n", "utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.usefixtures("quiet_consume", "broken_modules")
@pytest.mark.parametrize(
    ("app_spec", "exit_code", "message"),
    [
        (
            "no_such_module_for_rabbitq_tests:app",
            1,
            "cannot import 'no_such_module_for_rabbitq_tests': ModuleNotFoundError: ",
        ),
        (
            "rabbitq_test_syntax:app",
            1,
            "cannot import 'rabbitq_test_syntax': SyntaxError: '(' was never closed",
        ),
        ("rabbitq_test_raises:app", 1, "cannot import 'rabbitq_test_raises': RuntimeError: boom"),
        ("tests.unit.test_cli", 2, "must look like 'package.module:app'"),
        (":app", 2, "must look like 'package.module:app'"),
        ("json:dumps", 1, "'dumps' is not a rabbitq.App (got function)"),
        ("json:missing", 1, "module 'json' has no attribute 'missing'"),
    ],
)
def test_consume_with_a_bad_app_prints_one_error_line(
    topology_dir: Path, app_spec: str, exit_code: int, message: str
) -> None:
    """An --app that is not an App gives one `error: ` line; a malformed one exits 2."""
    result = _invoke("consume", "emails", "--topology", str(topology_dir), "--app", app_spec)
    assert result.exit_code == exit_code
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: --app {app_spec!r}")
    assert message in lines[0]


@pytest.mark.usefixtures("quiet_consume", "broken_modules")
def test_consume_with_debug_shows_the_import_traceback(topology_dir: Path) -> None:
    """With --debug, an --app whose import fails shows the traceback, then the `error: ` line."""
    result = _invoke(
        "consume",
        "emails",
        "--topology",
        str(topology_dir),
        "--app",
        "rabbitq_test_raises:app",
        "--debug",
    )
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "rabbitq_test_raises.py" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: --app 'rabbitq_test_raises:app'")


@pytest.mark.usefixtures("quiet_consume")
def test_consume_unknown_workload_prints_one_error_line(topology_dir: Path) -> None:
    """`consume` of a workload the topology does not declare is a usage error naming what exists."""
    result = _invoke("consume", "sms", "--topology", str(topology_dir), "--app", "json:dumps")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: topology: workload = 'sms': no such workload (declared: emails)"
    ]


@pytest.mark.parametrize("option", ["--log-level", "--log-format"])
def test_consume_with_a_bad_log_option_is_a_usage_error(topology_dir: Path, option: str) -> None:
    """A --log-level or --log-format value that does not exist gives one `error: ` line, exit 2."""
    result = _invoke(
        "consume", "emails", "--topology", str(topology_dir), "--app", "json:dumps", option, "loud"
    )
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {option} 'loud' must be one of "
        + ("debug, info, warning, error" if option == "--log-level" else "text, json")
    ]


@pytest.mark.parametrize("command", [["consume"], ["topology", "plan"], ["topology", "apply"]])
def test_url_help_shows_the_env_var_and_the_default(command: list[str]) -> None:
    """`--help` names RABBITQ_URL and the default URL, but never the URL the env var holds."""
    result = CliRunner(
        env={**CLEAN_ENV, "RABBITQ_URL": "amqp://app:s3cret@mq/", "COLUMNS": "200"}
    ).invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if "--url" in line)
    assert "[env var: RABBITQ_URL]" in line
    assert "[default: amqp://guest:guest@localhost:5672/]" in line
    assert "s3cret" not in result.stdout


def test_topology_dir_that_does_not_exist_names_the_option(tmp_path: Path) -> None:
    """A --topology path that does not exist says so and names --topology and RABBITQ_TOPOLOGY."""
    missing = tmp_path / "nowhere"
    result = _invoke("topology", "show", "--topology", str(missing))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {missing}: no such directory; point --topology (or RABBITQ_TOPOLOGY) at the "
        "directory of the *.toml files"
    ]


def test_every_topology_problem_is_on_the_one_error_line(tmp_path: Path) -> None:
    """A file with several problems lists each on its `error: ` line, in our words; --json too."""
    path = tmp_path / "bad.toml"
    path.write_text("[workloads.emails]\ncapcity = 8\n[workloads.Sms]\n", encoding="utf-8")
    result = _invoke("topology", "show", "--topology", str(tmp_path))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {path}: workloads.emails.capcity = 8: unknown key (did you mean 'capacity'?); "
        "workloads = 'Sms': a workload name must be lower-case letters, digits, '_' and '-', "
        "starting with a letter or digit (at most 63 characters)"
    ]
    error = json.loads(_invoke("topology", "show", "--topology", str(tmp_path), "--json").stderr)
    assert len(error["problems"]) == 2


def test_a_failed_connect_prints_only_the_error_line(tmp_path: Path) -> None:
    """`consume` against a closed port prints one `error: ` line, user kept, password masked."""
    (tmp_path / "shop.toml").write_text(TOPOLOGY, encoding="utf-8")
    (tmp_path / "myapp.py").write_text("import rabbitq\napp = rabbitq.App()\n", "utf-8")
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV} | {"RABBITQ_URL": url}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rabbitq",
            "consume",
            "emails",
            "--app",
            "myapp:app",
            "--topology",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot connect to {url.replace(':guest@', ':***@')}: ")
    assert "Connection refused" in lines[0]


@pytest.mark.parametrize(
    ("args", "vhost"),
    [
        (["--vhost", "prod"], "prod"),
        (["--url", "amqp://u:secret@h/stage%2F1"], "stage/1"),
        ([], "/"),
    ],
)
def test_topology_export_is_a_definitions_document_for_the_vhost(
    topology_dir: Path, args: list[str], vhost: str
) -> None:
    result = _invoke("topology", "export", "--topology", str(topology_dir), *args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {"exchanges", "queues", "bindings"} <= doc.keys()
    assert {q["vhost"] for q in doc["queues"]} == {vhost}
    assert "shop.emails.work" in {q["name"] for q in doc["queues"]}
    assert "secret" not in result.output
