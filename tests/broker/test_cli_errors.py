"""CLI errors that need the broker to answer: one `error:` line that says what to do."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import pytest

from rabbitq._connection import connect, mask_url
from rabbitq._errors import ConnectionFailed
from tests.background import free_port
from tests.broker.test_declare import WORKLOAD, rabbitq_cli


def _vhost_url(url: str, vhost: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{vhost}"))


def _vhost_reason(vhost: str) -> str:
    return (
        f"vhost {vhost!r} does not exist or the URL's user may not use it; create it with "
        f"'rabbitmqctl add_vhost {vhost}' and grant it with 'rabbitmqctl set_permissions'"
    )


@pytest.mark.usefixtures("connection")  # checks the broker is there
async def test_connect_to_an_unknown_vhost_names_it(url, namespace):
    """connect() to a vhost that does not exist raises ConnectionFailed naming the vhost."""
    bad = _vhost_url(url, f"{namespace}-nosuchvhost")

    with pytest.raises(ConnectionFailed) as caught:
        await connect(bad, "test")

    assert caught.value.reason == _vhost_reason(f"{namespace}-nosuchvhost")
    assert caught.value.url == mask_url(bad)


@pytest.mark.usefixtures("connection")
@pytest.mark.parametrize(
    "command",
    [["topology", "plan"], ["consume", "w", "--app", "tests.broker.apps:app", "--burst"]],
    ids=["plan", "consume"],
)
async def test_cli_on_an_unknown_vhost_prints_one_error_line(url, namespace, topology_dir, command):
    """`plan` and `consume` on an unknown vhost print only an `error:` line with the fix; exit 1."""
    vhost = f"{namespace}-nosuchvhost"
    bad = _vhost_url(url, vhost)
    directory = topology_dir(w=WORKLOAD)

    result = await rabbitq_cli(bad, *command, "--topology", directory, "--namespace", namespace)

    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"error: cannot connect to {mask_url(bad)}: {_vhost_reason(vhost)}"
    ]
    assert result.stdout == ""


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["parking", "list", "w"],
        ["topology", "plan"],
        ["consume", "w", "--app", "tests.broker.apps:app", "--burst"],
    ],
    ids=["status", "parking-list", "plan", "consume"],
)
async def test_a_refused_connection_is_one_error_line(namespace, topology_dir, command):
    """Nothing listens at the URL: each command says so once, in its `error:` line (aiormq's own
    "error when creating transport" line is not printed beside it); exit 1."""
    closed = f"amqp://guest:secret@127.0.0.1:{free_port()}/"
    directory = topology_dir(w=WORKLOAD)

    result = await rabbitq_cli(closed, *command, "--topology", directory, "--namespace", namespace)

    assert result.returncode == 1, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: cannot connect to {mask_url(closed)}: "), line
    assert "secret" not in result.stderr + result.stdout
