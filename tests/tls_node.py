"""A RabbitMQ node of the TLS tests' own, and the certificates it and its clients use.

A node of a test's own (tests/private_node.py) with its own node name, ports and directory
(`/tmp/rqtls-<id>/`), and no plain AMQP listener. It asks every client
for a certificate its CA signed (`fail_if_no_peer_cert = true`), and serves the management
API over https only. The node on 5672 is never touched.

The certificates come from `trustme` (a dev dependency): a CA, the broker's certificate for
`localhost` and 127.0.0.1, a client certificate, a second CA nobody trusts (with a broker
certificate and a client certificate of its own), and a broker certificate that expired.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trustme

from tests.background import free_port
from tests.private_node import (
    RABBITMQ_BIN,
    as_rabbitmq,
    environment,
    log_tail,
    own_by_rabbitmq,
    package_unavailable,
    write_directory,
)

USER = "rabbitq"
BOOT_TIMEOUT_SECONDS = 40.0


def unavailable() -> str | None:
    """Why a node of our own cannot start here, or None."""
    if os.geteuid() != 0:
        return "the TLS tests start a RabbitMQ node as the rabbitmq user: they need root"
    return package_unavailable()


@dataclass(frozen=True, slots=True)
class Certificates:
    """PEM files under `directory`: each a path as a string, as a URL query names it."""

    directory: Path

    def path(self, name: str) -> str:
        return str(self.directory / name)

    @property
    def ca(self) -> str:
        return self.path("ca.pem")

    @property
    def other_ca(self) -> str:
        return self.path("other-ca.pem")

    @property
    def client(self) -> str:
        return self.path("client.pem")

    @property
    def client_key(self) -> str:
        return self.path("client.key")

    @property
    def other_client(self) -> str:
        return self.path("other-client.pem")

    @property
    def other_client_key(self) -> str:
        return self.path("other-client.key")


def make_certificates(directory: Path) -> Certificates:
    """Write every certificate and key the tests use (keys are mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, other_ca = trustme.CA(), trustme.CA()
    now = datetime.now(UTC)
    leaves = {
        "server": ca.issue_cert("localhost", "127.0.0.1"),
        "client": ca.issue_cert("rabbitq-test-client"),
        "other-client": other_ca.issue_cert("rabbitq-test-client"),
        "expired-server": ca.issue_cert(
            "localhost",
            "127.0.0.1",
            not_before=now - timedelta(days=30),
            not_after=now - timedelta(days=1),
        ),
    }
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(directory / "other-ca.pem"))
    for name, leaf in leaves.items():
        # the leaf first, then its CA: a chain file as brokers are usually given
        with (directory / f"{name}.pem").open("wb") as f:
            for blob in leaf.cert_chain_pems:
                f.write(blob.bytes())
        key = directory / f"{name}.key"
        leaf.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
    return Certificates(directory)


@dataclass
class TlsNode:
    """One node with a TLS listener on `port` and the management API over https."""

    directory: Path
    certificates: Certificates
    port: int
    management_port: int
    password: str
    name: str
    dist_port: int
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls, base: Path) -> TlsNode:
        tag = secrets.token_hex(4)
        directory = base / f"rqtls-{tag}"
        node = cls(
            directory=directory,
            certificates=make_certificates(directory / "certs"),
            port=free_port(),
            management_port=free_port(),
            password=f"pw-{secrets.token_hex(8)}",
            name=f"rqtls{tag}@localhost",
            dist_port=free_port(),
        )
        node._prepare()
        return node

    def url(self, host: str = "localhost", query: str = "") -> str:
        return f"amqps://{USER}:{self.password}@{host}:{self.port}/{'?' + query if query else ''}"

    def _prepare(self) -> None:
        d, c = self.directory, self.certificates
        # the broker reads server.pem/server.key; `serve` swaps them
        shutil.copy(c.path("server.pem"), d / "server.pem")
        shutil.copy(c.path("server.key"), d / "server.key")
        ssl_files = [
            f"cacertfile = {c.ca}",
            f"certfile = {d / 'server.pem'}",
            f"keyfile = {d / 'server.key'}",
        ]
        lines = [
            "listeners.tcp = none",
            f"listeners.ssl.default = {self.port}",
            *(f"ssl_options.{line}" for line in ssl_files),
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            f"management.ssl.port = {self.management_port}",
            *(f"management.ssl.{line}" for line in ssl_files),
            f"default_user = {USER}",
            f"default_pass = {self.password}",
            "default_user_tags.administrator = true",
            "default_permissions.configure = .*",
            "default_permissions.read = .*",
            "default_permissions.write = .*",
            "log.file.level = info",
            "",
        ]
        write_directory(d, plugins="[rabbitmq_management].\n", config="\n".join(lines))

    def _command(self, *argv: str) -> list[str]:
        more = {"RABBITMQ_DIST_PORT": str(self.dist_port)}
        return as_rabbitmq(environment(self.directory, self.name, **more), *argv)

    def start(self) -> None:
        """Boot the node and wait until its TLS listener completes a handshake with a client
        certificate. Raises RuntimeError with the log's end if it does not."""
        with (self.directory / "server.out").open("wb") as out:  # the child keeps its copy
            self.process = subprocess.Popen(
                self._command(str(RABBITMQ_BIN / "rabbitmq-server")),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + BOOT_TIMEOUT_SECONDS
        while not self._handshakes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the TLS test node did not start:\n{self.log_tail()}")
            time.sleep(0.25)
        # the management listener comes up with its plugin, after the AMQP one
        while not self._handshakes(self.management_port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the TLS test node's management API:\n{self.log_tail()}")
            time.sleep(0.25)

    def _handshakes(self, port: int | None = None) -> bool:
        context = ssl.create_default_context(cafile=self.certificates.ca)
        context.load_cert_chain(self.certificates.client, self.certificates.client_key)
        try:
            with socket.create_connection(("127.0.0.1", port or self.port), timeout=1) as sock:
                with context.wrap_socket(sock, server_hostname="localhost"):
                    return True
        except OSError:
            return False

    def ctl(self, *args: str) -> str:
        """`rabbitmqctl -n NODE ARGS`; its output. Raises CalledProcessError when it fails."""
        result = subprocess.run(
            self._command(str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return result.stdout

    def serve(self, cert: str) -> None:
        """Serve `cert` (`server` or `expired-server`) from the next handshake on: the files are
        swapped and Erlang's PEM cache cleared, as RabbitMQ's docs rotate a certificate."""
        for suffix in ("pem", "key"):
            target = self.directory / f"server.{suffix}"
            shutil.copy(self.certificates.path(f"{cert}.{suffix}"), target)
            own_by_rabbitmq(target)
        self.ctl("eval", "ssl:clear_pem_cache().")

    def stop(self) -> None:
        """Stop the node (rabbitmqctl, then a kill of its process group) and remove its files."""
        try:
            if self.process is not None and self.process.poll() is None:
                try:
                    self.ctl("stop")
                except (subprocess.SubprocessError, OSError):
                    pass
                try:
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, 9)
                    self.process.wait(timeout=5)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        logs = (self.directory / "log").glob("*.log")
        return log_tail((self.directory / "server.out", *logs), lines)
