"""Each role's RabbitMQ permissions, derived from the topology: exactly the names its work needs.

The broker searches a pattern in a name (Erlang's `re:run`), it does not match it whole, so the
tables check with `re.search`, as the broker does, over every name of the namespace and names
that come close (another namespace, a dot that is not a dot, a level past the ladder).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from rabbitq import _permissions as permissions
from rabbitq._cli import cli
from rabbitq._errors import AccessRefused, PublishRefused, UsageError
from rabbitq._topology import Topology, parse_topology

TOML = """
namespace = "a.b"

[workloads.emails]
[workloads.emails.retry]
tiers = ["1s", "10s"]
max_attempts = 3

[workloads.img-x]
[workloads.img-x.retry]
tiers = []
max_attempts = 1
"""


def topology(delays: bool = True, namespace: str | None = None) -> Topology:
    text = TOML if delays else "delays = false\n" + TOML
    return parse_topology({"t.toml": text}, namespace)


TOPO = topology()
LEVELS = {f"a.b.delay.{i:02d}" for i in range(28)}
LADDER = LEVELS | {"a.b.delay.due"}
EXCHANGES = {"a.b.tasks", "a.b.retry", "a.b.parking"}
EMAILS = {"a.b.emails.work", "a.b.emails.parking", "a.b.emails.retry.1s", "a.b.emails.retry.10s"}
IMG = {"a.b.img-x.work", "a.b.img-x.parking"}
EVERYTHING = EXCHANGES | LADDER | EMAILS | IMG
NEAR = {
    "aXb.tasks",  # the namespace's dot is a dot
    "a.bc.tasks",
    "a.b.tasks.x",
    "xa.b.tasks",
    "a.tasks",
    "a.b.delay.28",
    "a.b.delay.99",
    "a.b.delay.0",
    "a.b.emails.retry.2s",
    "a.b.emails.work2",
    "a.b.other.work",
    "a.b.img-x.retry.1s",
    "a.b.imgXx.work",
    "amq.default",
    "amq.rabbitmq.reply-to",
    "amq.direct",
}  # never "": the broker checks the default exchange as amq.default, and `^$` matches ""
UNIVERSE = EVERYTHING | NEAR


def matching(pattern: str) -> set[str]:
    return {name for name in UNIVERSE if re.search(pattern, name)}


def test_the_universe_holds_every_name_the_topology_derives():
    """The table below sees every exchange and queue of the namespace."""
    names = {e.name for e in TOPO.exchanges()} | {q.name for q in TOPO.queues()}
    assert names == EVERYTHING


@pytest.mark.parametrize(
    ("role", "workloads", "configure", "write", "read"),
    [
        ("deployer", (), EVERYTHING, EVERYTHING, EVERYTHING),
        (
            "worker",
            (),
            set(),
            EXCHANGES | {"amq.default"},
            {"a.b.emails.work", "a.b.img-x.work"},
        ),
        ("worker", ("emails",), set(), EXCHANGES | {"amq.default"}, {"a.b.emails.work"}),
        # no tiers: it never retries, so no write on the retry exchange
        (
            "worker",
            ("img-x",),
            set(),
            {"a.b.tasks", "a.b.parking", "amq.default"},
            {"a.b.img-x.work"},
        ),
        ("publisher", (), set(), {"a.b.tasks"} | LEVELS, set()),
        (
            "operator",
            (),
            set(),
            {"a.b.tasks"},
            {"a.b.emails.parking", "a.b.img-x.parking"},
        ),
        ("operator", ("img-x",), set(), {"a.b.tasks"}, {"a.b.img-x.parking"}),
    ],
)
def test_each_role_matches_exactly_the_names_it_needs(role, workloads, configure, write, read):
    """Searched as the broker does, each pattern matches the role's names and no other."""
    patterns = permissions.grant(TOPO, role, workloads).patterns
    assert [matching(p) for p in patterns] == [configure, write, read]


@pytest.mark.parametrize("role", permissions.ROLES)
def test_every_pattern_is_anchored_or_nothing(role):
    """`^$` grants nothing; anything else is `^(...)$`."""
    for pattern in permissions.grant(TOPO, role).patterns:
        assert pattern == "^$" or (pattern.startswith("^(") and pattern.endswith(")$"))
        re.compile(pattern)


def test_without_the_ladder_the_publisher_writes_only_the_tasks_exchange():
    """`delays = false`: no level exchange to publish to."""
    patterns = permissions.grant(topology(delays=False), "publisher").patterns
    assert patterns == ("^$", r"^(a\.b\.tasks)$", "^$")
    deployer = permissions.grant(topology(delays=False), "deployer").patterns
    assert not matching(deployer[0]) & LADDER


def test_a_namespace_override_is_the_namespace_granted():
    """`--namespace` moves every name, and the patterns with them."""
    patterns = permissions.grant(topology(namespace="t-1.x"), "worker").patterns
    assert re.search(patterns[2], "t-1.x.emails.work")
    assert not re.search(patterns[2], "a.b.emails.work")
    assert not re.search(patterns[2], "t-1Xx.emails.work")


def test_an_empty_topology_grants_the_deployer_nothing():
    """No workloads, nothing to declare."""
    empty = parse_topology({"t.toml": 'namespace = "a"\n'})
    assert permissions.grant(empty, "deployer").patterns == ("^$", "^$", "^$")


@pytest.mark.parametrize(
    ("alternatives", "pattern"),
    [
        ((), "^$"),
        ((r"a\.b\.tasks",), r"^(a\.b\.tasks)$"),
        ((r"a\.b\.tasks", r"a\.b\.retry", r"a\.b\.tasks"), r"^(a\.b\.(?:tasks|retry))$"),
        ((r"a\.b\.tasks", r"amq\.default"), r"^(a\.b\.tasks|amq\.default)$"),
        ((r"amq\.default",), r"^(amq\.default)$"),
    ],
)
def test_anchored_shares_the_namespace_prefix_and_drops_repeats(alternatives, pattern):
    assert permissions.anchored(alternatives, "a.b") == pattern


def test_a_user_with_two_roles_gets_their_union():
    """RabbitMQ keeps one set per user and vhost: worker + publisher in one line."""
    both = permissions.merge(
        [permissions.grant(TOPO, "worker", ("emails",)), permissions.grant(TOPO, "publisher")]
    )
    assert both.role == "worker+publisher"
    configure, write, read = (matching(p) for p in both.patterns)
    assert configure == set()
    assert write == EXCHANGES | LEVELS | {"amq.default"}
    assert read == {"a.b.emails.work"}


def test_the_command_line_quotes_what_the_shell_would_change():
    """Patterns, user and vhost come back unchanged through a shell's word splitting."""
    g = permissions.grant(TOPO, "worker")
    line = permissions.command(g, "it's me", "my vhost")
    assert shlex.split(line) == [
        "rabbitmqctl",
        "set_permissions",
        "-p",
        "my vhost",
        "it's me",
        *g.patterns,
    ]


@pytest.mark.parametrize(
    ("role", "workloads", "problem"),
    [
        ("admin", (), "--role 'admin' must be one of deployer, worker, publisher, operator"),
        ("worker", ("nope",), "--workload 'nope' is not in the topology"),
    ],
)
def test_an_unknown_role_or_workload_is_a_usage_error(role, workloads, problem):
    with pytest.raises(UsageError, match=re.escape(problem)):
        permissions.grant(TOPO, role, workloads)


REFUSED = "ACCESS_REFUSED - access to queue 'a.b.emails.work' in vhost 'prod' refused for user "
REFUSED += "'w1'"


@pytest.mark.parametrize(
    ("text", "facts"),
    [
        (REFUSED, ("w1", "queue", "a.b.emails.work", "prod")),
        (
            "the broker closed the channel: 403 " + REFUSED.replace("queue", "exchange"),
            ("w1", "exchange", "a.b.emails.work", "prod"),
        ),
        # another reader holds the parking lot: a 403 no permission would help
        ("403 ACCESS_REFUSED - queue 'a.b.emails.parking' in vhost '/' in exclusive use", None),
        ("404 NOT_FOUND - no queue 'x' in vhost '/'", None),
    ],
)
def test_a_refusal_names_the_user_and_the_object(text, facts):
    refused = permissions.refusal(text, "read", "consume from")
    if facts is None:
        assert refused is None
        return
    assert isinstance(refused, AccessRefused)
    assert (refused.user, refused.kind, refused.name, refused.vhost) == facts
    assert str(refused) == (
        f"user 'w1' may not consume from {facts[1]} 'a.b.emails.work' in vhost 'prod' "
        "(ACCESS_REFUSED, it needs read): grant it with 'rabbitq topology permissions'"
    )


def test_a_refused_publish_is_a_publish_error_too():
    """`except PublishError` catches it, as it catches every publish that sent nothing."""
    refused = permissions.refusal(REFUSED, "write", "publish to", publish=True)
    assert isinstance(refused, PublishRefused) and isinstance(refused, AccessRefused)


# the CLI ---------------------------------------------------------------------------------------


def _invoke(tmp_path: Path, *args: str) -> Result:
    (tmp_path / "t.toml").write_text(TOML)
    env = {"RABBITQ_TOPOLOGY": None, "RABBITQ_NAMESPACE": None, "RABBITQ_URL": None}
    return CliRunner(env=env).invoke(cli, ["topology", "permissions", "-t", str(tmp_path), *args])


def test_the_command_prints_one_line_per_role(tmp_path):
    """Each role's line, its user named after the namespace, the vhost from --url."""
    result = _invoke(tmp_path, "--url", "amqp://u:secret@h/prod")
    assert result.exit_code == 0, result.output
    lines = [shlex.split(line) for line in result.stdout.splitlines() if line[:1] != "#"]
    assert [words[:6] for words in lines] == [
        ["rabbitmqctl", "set_permissions", "-p", "prod", f"a.b-{role}"]
        + [permissions.grant(TOPO, role).patterns[0]]
        for role in permissions.ROLES
    ]
    assert [words[5:] for words in lines] == [
        list(permissions.grant(TOPO, role).patterns) for role in permissions.ROLES
    ]
    assert "secret" not in result.output


def test_one_user_with_several_roles_is_one_line(tmp_path):
    result = _invoke(
        tmp_path, "--role", "worker", "--role", "publisher", "--user", "app", "--workload", "emails"
    )
    assert result.exit_code == 0, result.output
    commands = [line for line in result.stdout.splitlines() if line.startswith("rabbitmqctl")]
    expected = permissions.merge(
        [permissions.grant(TOPO, "worker", ("emails",)), permissions.grant(TOPO, "publisher")]
    )
    assert commands == [permissions.command(expected, "app", "/")]


def test_json_lists_each_role_with_its_patterns(tmp_path):
    result = _invoke(tmp_path, "--role", "operator", "--vhost", "v", "--json")
    assert result.exit_code == 0, result.output
    [only] = json.loads(result.stdout)
    configure, write, read = permissions.grant(TOPO, "operator").patterns
    assert only == only | {"role": "operator", "user": "a.b-operator", "vhost": "v"}
    assert (only["configure"], only["write"], only["read"]) == (configure, write, read)


def test_an_unknown_role_exits_2_with_one_line(tmp_path):
    result = _invoke(tmp_path, "--role", "root")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: --role 'root' must be one of deployer, worker, publisher, operator"
    ]
