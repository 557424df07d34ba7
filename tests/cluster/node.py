"""One node of the test cluster: its directory, configuration, environment and command lines.

A node runs `/usr/lib/rabbitmq/bin/rabbitmq-server` from the Debian package inside its network
namespace, as the `rabbitmq` user (so it and its CLI share `/var/lib/rabbitmq/.erlang.cookie`),
with an environment of its own: `/etc/rabbitmq/rabbitmq-env.conf` belongs to the default node
(it pins the node name and the addresses to `rabbit@localhost` on 127.0.0.1), so no process here
reads it. Everything the node writes stays under its directory, /tmp/rqcluster-<id>/nI/.

Settings that matter to the tests: long node names with IP addresses (`rabbit@10.213.N.1`: no
DNS or /etc/hosts edits; each namespace runs its own epmd), `cluster_partition_handling =
pause_minority` (the strategy rabbitq expects: a node that loses the majority stops its app,
closes its clients' connections and stops listening until it sees the majority again), and
`net_ticktime` lowered from 60 s so a partition is noticed in seconds. Guest only logs in from
loopback, so the node creates an administrator `rabbitq` with the cluster's random password.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests import private_node
from tests.private_node import (
    RABBITMQ_BIN,
    as_rabbitmq,
    log_tail,
    package_unavailable,
    write_directory,
)

USER = "rabbitq"
AMQP_PORT = 5672
MANAGEMENT_PORT = 15672
PROMETHEUS_PORT = 15692
PLUGINS = "[rabbitmq_management,rabbitmq_prometheus].\n"


class ClusterError(RuntimeError):
    """A node did not start, join or answer, or a CLI call failed."""


def unavailable() -> str | None:
    """Why a cluster cannot start here (not root, no `ip netns`, no RabbitMQ), or None."""
    if os.geteuid() != 0:
        return "the cluster tests need root (network namespaces, the rabbitmq user)"
    for tool in ("ip", "setpriv"):
        if shutil.which(tool) is None:
            return f"the cluster tests need {tool!r}"
    try:
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"'ip netns list' failed: {exc}"
    if listing.returncode != 0:
        return f"'ip netns list' failed: {listing.stderr.decode(errors='replace').strip()}"
    return package_unavailable()


def port_open(address: str, port: int, timeout: float = 1.0) -> bool:
    """True if a TCP connection to address:port opens now."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.25
) -> float:
    """Poll `predicate` until true; the seconds it took. Raises ClusterError after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise ClusterError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(interval)
    return time.monotonic() - start


@dataclass(frozen=True, slots=True)
class Node:
    index: int
    name: str  # rabbit@<address>
    address: str
    namespace: str
    directory: Path

    def prepare(self, *, password: str, net_ticktime_seconds: int) -> None:
        """Write the node's directory: data and log dirs, config, plugins; owned by rabbitmq."""
        write_directory(
            self.directory, plugins=PLUGINS, config=config(password, net_ticktime_seconds)
        )

    def environment(self) -> dict[str, str]:
        d = self.directory
        return private_node.environment(
            d,
            self.name,
            RABBITMQ_USE_LONGNAME="true",
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
        )

    @property
    def pid_file(self) -> Path:
        return self.directory / "pid"

    def command(self, *argv: str) -> list[str]:
        """argv run inside the node's namespace, as rabbitmq, with only the node's environment."""
        return ["ip", "netns", "exec", self.namespace, *as_rabbitmq(self.environment(), *argv)]

    def server_command(self) -> list[str]:
        return self.command(str(RABBITMQ_BIN / "rabbitmq-server"))

    def cli_command(self, tool: str, *args: str) -> list[str]:
        """A CLI tool (`rabbitmqctl`, `rabbitmq-queues`, ...) aimed at this node by name."""
        return self.command(str(RABBITMQ_BIN / tool), "-n", self.name, *args)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the node's server output and log, for error messages."""
        log = self.directory / "log" / f"{self.name}.log"
        return log_tail((self.directory / "server.out", log), lines)


def config(password: str, net_ticktime_seconds: int) -> str:
    """The node's rabbitmq.conf; every node of a cluster gets the same."""
    return "\n".join(
        [
            f"listeners.tcp.default = {AMQP_PORT}",
            f"management.tcp.port = {MANAGEMENT_PORT}",
            f"prometheus.tcp.port = {PROMETHEUS_PORT}",
            "cluster_partition_handling = pause_minority",
            f"net_ticktime = {net_ticktime_seconds}",
            # created on node 0's first boot; the others get it when they join
            f"default_user = {USER}",
            f"default_pass = {password}",
            "default_user_tags.administrator = true",
            "default_permissions.configure = .*",
            "default_permissions.read = .*",
            "default_permissions.write = .*",
            "log.file.level = info",
            "",
        ]
    )
