"""What every RabbitMQ node of a test's own shares (the cluster's in tests/cluster/node.py, the
TLS tests' in tests/tls_node.py): its directory, environment, command lines and log.

Such a node runs `/usr/lib/rabbitmq/bin/rabbitmq-server` from the Debian package as the
`rabbitmq` user, so it and `rabbitmqctl` share `/var/lib/rabbitmq/.erlang.cookie`, with only
the environment given here: `/etc/rabbitmq/rabbitmq-env.conf` belongs to the default node (it
pins the node name and the addresses to `rabbit@localhost`), so an empty env file stands in for
it. Everything the node writes stays under its directory. The node on 5672 is never touched.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable
from pathlib import Path

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_HOME = Path("/var/lib/rabbitmq")  # its .erlang.cookie is every node's


def package_unavailable() -> str | None:
    """Why the Debian package cannot run a node of our own here, or None."""
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        return f"no RabbitMQ server at {RABBITMQ_BIN} (apt-get install rabbitmq-server)"
    try:
        pwd.getpwnam("rabbitmq")
    except KeyError:
        return "no 'rabbitmq' user (the Debian package creates it)"
    if not (RABBITMQ_HOME / ".erlang.cookie").exists():
        return f"no Erlang cookie at {RABBITMQ_HOME / '.erlang.cookie'}"
    return None


def own_by_rabbitmq(*paths: Path) -> None:
    account = pwd.getpwnam("rabbitmq")
    for path in paths:
        os.chown(path, account.pw_uid, account.pw_gid)


def write_directory(directory: Path, *, plugins: str, config: str) -> None:
    """Data and log dirs, the empty env file, plugins and rabbitmq.conf; owned by rabbitmq and
    closed to others (rabbitmq.conf holds the password). Other files the caller put in
    `directory` before are handed over too."""
    (directory / "mnesia").mkdir(parents=True)
    (directory / "log").mkdir()
    (directory / "rabbitmq-env.conf").write_text("")
    (directory / "enabled_plugins").write_text(plugins)
    (directory / "rabbitmq.conf").write_text(config)
    own_by_rabbitmq(directory, *directory.rglob("*"))
    directory.chmod(0o700)


def environment(directory: Path, name: str, **more: str) -> dict[str, str]:
    """The whole environment of a node named `name` living in `directory` (and its CLI's)."""
    d = directory
    return {
        "HOME": str(RABBITMQ_HOME),
        "PATH": "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
        "RABBITMQ_LOG_BASE": str(d / "log"),
        "RABBITMQ_PID_FILE": str(d / "pid"),
        "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
        **more,
    }


def as_rabbitmq(variables: dict[str, str], *argv: str) -> list[str]:
    """argv run as the rabbitmq user with exactly `variables` as its environment."""
    return [
        *("setpriv", "--reuid=rabbitmq", "--regid=rabbitmq", "--init-groups"),
        *("env", "-i", *(f"{k}={v}" for k, v in variables.items())),
        *argv,
    ]


def log_tail(paths: Iterable[Path], lines: int = 30) -> str:
    """The last lines of each file that exists, under its name: for error messages."""
    text = ""
    for path in paths:
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            text += f"--- {path}\n" + "\n".join(tail) + "\n"
    return text
