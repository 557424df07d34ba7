"""Reading the broker through its management plugin's HTTP API, for status, check and plan.

AMQP cannot list a vhost's queues, read a queue's arguments, policy or unacked count, or see the
alarms; the management plugin can. Everything here only reads. Every caller copes with
`ManagementUnavailable` by saying what it could not see, since some brokers run without the
plugin. The counts it reports lag by up to the broker's statistics interval (5 s by default).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit

from rabbitq._connection import current_node
from rabbitq._errors import RabbitqError
from rabbitq._tls import (
    ENV_CACERTFILE,
    ENV_CERTFILE,
    ENV_KEYFILE,
    TlsProblem,
    TlsSettings,
    describe_failure,
    tls_context,
    tls_settings,
)

TIMEOUT_SECONDS = 5.0
ENABLE_HINT = "enable it with 'rabbitmq-plugins enable rabbitmq_management'"


class ManagementUnavailable(RabbitqError):
    """The management API did not answer, or refused the user."""


@dataclass(frozen=True, slots=True)
class Management:
    """Where the management API is and who asks it; `base` never holds a password."""

    base: str
    vhost: str
    user: str
    password: str
    tls: TlsSettings | None = None  # for https: the AMQP URL's CA and client certificate
    tls_problem: str | None = None  # why the AMQP URL's TLS options cannot be used

    @classmethod
    def from_urls(cls, amqp_url: str, management_url: str | None = None) -> Management:
        """The API beside the AMQP URL's broker (port 15672, or 15671 over TLS), with its user;
        for a list of nodes, beside the one this process connects to first.

        A `management_url` overrides the host, port and scheme; its own user, if it names one.
        Over https the API is verified as the AMQP URL's TLS options (and RABBITQ_TLS_*) say.

        Raises:
            ManagementUnavailable: a bad `management_url`.
        """
        node = current_node(amqp_url)  # a cluster's: the node this process uses
        amqp = urlsplit(node)
        tls: TlsSettings | None = None
        problem = None  # said when the API is read: the AMQP connection says it first
        try:
            tls = tls_settings(node, os.environ)[1]
        except TlsProblem as exc:
            problem = str(exc)
        vhost = unquote(amqp.path[1:]) if amqp.path not in ("", "/") else "/"
        user, password = unquote(amqp.username or "guest"), unquote(amqp.password or "guest")
        if management_url:
            mgmt = urlsplit(management_url)
            if mgmt.scheme not in ("http", "https") or not mgmt.hostname:
                raise ManagementUnavailable(
                    f"--management-url must look like http://host:15672 (got scheme "
                    f"{mgmt.scheme!r})"
                )
            if mgmt.username:
                user, password = unquote(mgmt.username), unquote(mgmt.password or "")
            host = mgmt.hostname
            port = mgmt.port
            scheme = mgmt.scheme
            prefix = mgmt.path.rstrip("/")
        else:
            host = amqp.hostname or "localhost"
            scheme = "https" if amqp.scheme == "amqps" else "http"
            port = 15671 if scheme == "https" else 15672
            prefix = ""
        netloc = f"[{host}]" if ":" in host else host
        if port:
            netloc += f":{port}"
        if scheme == "https" and tls is None:  # an https API beside an amqp:// URL
            env = os.environ
            tls = TlsSettings(env.get(ENV_CACERTFILE), env.get(ENV_CERTFILE), env.get(ENV_KEYFILE))
        elif management_url and tls is not None:  # the SNI name is the AMQP host's
            tls = dataclasses.replace(tls, server_name=None)
        return cls(f"{scheme}://{netloc}{prefix}", vhost, user, password, tls, problem)

    def _fetch(self, path: str) -> Any:
        request = urllib.request.Request(self.base + path)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        https = self.base.startswith("https")
        try:
            if self.tls_problem:
                raise TlsProblem(self.tls_problem)
            context = tls_context(self.tls or TlsSettings()) if https else None
        except TlsProblem as exc:
            raise ManagementUnavailable(f"the management API at {self.base}: {exc}") from None
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS, context=context) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise ManagementUnavailable(
                    f"the management API at {self.base} refused user {self.user!r} "
                    f"(HTTP {exc.code}): a wrong password, or a user without the 'monitoring' tag"
                ) from None
            if exc.code == 404:
                return None
            raise ManagementUnavailable(
                f"the management API at {self.base} answered HTTP {exc.code}"
            ) from None
        except (OSError, ValueError) as exc:  # refused, timed out, not JSON
            reason = getattr(exc, "reason", exc)
            name = (self.tls and self.tls.server_name) or urlsplit(self.base).hostname or ""
            client_cert = bool(self.tls and self.tls.certfile)
            tls = (
                describe_failure(reason, name, client_cert)
                if isinstance(reason, BaseException)
                else None
            )
            if tls:
                raise ManagementUnavailable(f"the management API at {self.base}: {tls}") from None
            raise ManagementUnavailable(
                f"no management API at {self.base} ({reason}); {ENABLE_HINT}"
            ) from None

    async def get(self, path: str, **query: str) -> Any:
        """The decoded JSON at `path` (None on 404), off the event loop."""
        suffix = f"?{urlencode(query)}" if query else ""
        return await asyncio.to_thread(self._fetch, path + suffix)

    @property
    def _vhost(self) -> str:
        return quote(self.vhost, safe="")

    async def queues(self, prefix: str, columns: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """The vhost's queues whose names start with `prefix`."""
        query = {"name": f"^{_regex(prefix)}", "use_regex": "true"}
        if columns:
            query["columns"] = ",".join(("name", *columns))
        found = await self.get(f"/api/queues/{self._vhost}", **query)
        return [q for q in found or () if q["name"].startswith(prefix)]

    async def exchanges(self, prefix: str) -> list[dict[str, Any]]:
        found = await self.get(f"/api/exchanges/{self._vhost}")
        return [e for e in found or () if e["name"].startswith(prefix)]

    async def bindings(self) -> list[dict[str, Any]]:
        return list(await self.get(f"/api/bindings/{self._vhost}") or ())

    async def overview(self) -> dict[str, Any]:
        return dict(await self.get("/api/overview") or {})

    async def nodes(self) -> list[dict[str, Any]]:
        return list(
            await self.get("/api/nodes", columns="name,running,mem_alarm,disk_free_alarm") or ()
        )


def _regex(text: str) -> str:
    """`text` as a literal in the broker's regular expression (Erlang re, PCRE-like)."""
    return "".join(f"\\{c}" if not c.isalnum() and c != "_" else c for c in text)
