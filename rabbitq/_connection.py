"""Opening connections to RabbitMQ, and keeping credentials out of every message.

Publishing and consuming never share a connection: when a resource alarm fires, the broker
stops reading from every connection that publishes, and acks travel on the same socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractConnection

from rabbitq._errors import ConnectionFailed
from rabbitq._tls import TlsProblem, describe_failure, tls_context, tls_settings

logger = logging.getLogger("rabbitq.connection")


def _not_the_failed_connect(record: logging.LogRecord) -> bool:
    return record.msg != "error when creating transport: %r"


# aiormq logs a connect that fails at ERROR, then raises it; every connect here turns that
# into ConnectionFailed, which says it once (a command's one `error:` line). On its logger, not
# a handler, so no command and no app that has not set up logging prints it twice.
logging.getLogger("aiormq.connection").addFilter(_not_the_failed_connect)
T = TypeVar("T")

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
CONNECT_TIMEOUT_SECONDS = 10.0
NODE_TIMEOUT_SECONDS = 4.0  # each node's share when RABBITQ_URL lists several


def nodes(url: str) -> list[str]:
    """Every node of a comma-separated RABBITQ_URL, each as a whole URL.

    The first entry is a full URL; a later one may be a bare `host[:port]` or leave out the
    credentials, the vhost or the query, which it then takes from the first (credentials are
    given once).
    """
    entries = [entry.strip() for entry in url.split(",") if entry.strip()]
    if len(entries) <= 1:
        return entries or [url]
    first = urlsplit(entries[0])
    userinfo = first.netloc.rpartition("@")[0]
    out = [entries[0]]
    for entry in entries[1:]:
        parts = urlsplit(entry if "://" in entry else f"{first.scheme}://{entry}")
        netloc = parts.netloc
        if "@" not in netloc and userinfo:
            netloc = f"{userinfo}@{netloc}"
        out.append(
            urlunsplit(
                (
                    parts.scheme,
                    netloc,
                    parts.path if parts.path not in ("", "/") else first.path,
                    parts.query or first.query,
                    "",
                )
            )
        )
    return out


def node_of(url: str) -> str:
    """`host:port` of one node's URL, for logs and metrics."""
    parts = urlsplit(url)
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    host = parts.hostname or "localhost"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NodeOrder:
    """The order this process tries a cluster's nodes in: shuffled once, so that replicas
    spread over the nodes, then starting from the node that last answered."""

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)
        self._orders: dict[str, list[str]] = {}
        self._start: dict[str, int] = {}

    def candidates(self, url: str) -> list[str]:
        order = self._orders.get(url)
        if order is None:
            order = nodes(url)
            self._random.shuffle(order)
            self._orders[url] = order
        start = self._start.get(url, 0)
        return order[start:] + order[:start]

    def answered(self, url: str, node: str) -> None:
        order = self._orders.get(url, [])
        if node in order:
            self._start[url] = order.index(node)


NODE_ORDER = NodeOrder()


def current_node(url: str) -> str:
    """The node this process connects to first now: the last that answered."""
    return NODE_ORDER.candidates(url)[0]


async def first_answering(
    url: str, attempt: Callable[[str, float], Awaitable[T]], what: str = "connect"
) -> tuple[T, str]:
    """`attempt(node_url, timeout)` on each node in this process's order, until one works.

    Returns what it returned and the node's URL. Raises ConnectionFailed (masked) with every
    node's reason when none answered.
    """
    candidates = NODE_ORDER.candidates(url)
    # one node gets the whole time; several share it, so a node that is cut off (its packets
    # dropped, no refusal) does not hold up the others for long
    timeout = CONNECT_TIMEOUT_SECONDS if len(candidates) == 1 else NODE_TIMEOUT_SECONDS
    reasons = []
    for node in candidates:
        try:
            result = await attempt(node, timeout)
        except asyncio.CancelledError:
            raise
        except ConnectionFailed as exc:
            reasons.append(exc.reason)
            continue
        NODE_ORDER.answered(url, node)
        if len(candidates) > 1:
            logger.info("%s: on node %s", what, node_of(node))
        return result, node
    if len(candidates) == 1:
        raise ConnectionFailed(mask_url(candidates[0]), reasons[0])
    tried = "; ".join(f"{node_of(n)}: {r}" for n, r in zip(candidates, reasons, strict=True))
    raise ConnectionFailed(mask_url(url), f"no node answered ({tried})")


def mask_url(url: str) -> str:
    """The URL (each of a comma-separated list) with its password replaced by `***`."""
    if "," in url:
        return ",".join(mask_url(entry) for entry in url.split(","))
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    # netloc text is kept as written: IPv6 brackets, host case and a bad port survive
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def scrub(text: str, url: str) -> str:
    """`text` with the URL's password removed, for errors that quote what a library said."""
    if "," in url:  # a cluster's nodes: the list as written, then each node's password
        text = text.replace(url, mask_url(url))
        for node in nodes(url):
            text = scrub(text, node)
        return text
    masked = mask_url(url)
    password = None if not url or masked == "<unparseable url>" else urlsplit(url).password
    # The URL is masked whole first, so that a user named like the password keeps its name.
    pieces = text.replace(url, masked).split(masked) if url else [text]
    for form in {password, unquote(password)} if password else ():
        # as written in the URL and as decoded by a library that quotes it back
        pieces = [piece.replace(form, "***") for piece in pieces]
    return masked.join(pieces)


def is_open(connection: AbstractConnection) -> bool:
    """False once the connection is closed from either side.

    aio-pika's `is_closed` only turns true after a local `close()`; a close by the broker
    (or a dropped socket) clears `connected` instead.
    """
    return not connection.is_closed and connection.connected.is_set()


def client_name(name: str) -> str:
    """What the broker lists a connection as (`rabbitmqctl list_connections`)."""
    return f"rabbitq {name} on {socket.gethostname()}"


async def connect(url: str, name: str) -> AbstractConnection:
    """A plain (not robust) connection, to the first node that answers (RABBITQ_URL may list
    a cluster's nodes); rabbitq runs its own reconnect loop, which calls this again.

    Raises:
        ConnectionFailed: with the masked URL and the reason (each node's, for a list).
    """
    connection, _node = await first_answering(
        url, lambda node, timeout: _connect_one(node, name, timeout), name
    )
    return connection


def tls_for(url: str) -> tuple[str, ssl.SSLContext | None]:
    """One node's URL as aio-pika may read it (rabbitq's TLS options taken out) and the TLS
    context its query and RABBITQ_TLS_* ask for (None for `amqp://`).

    Raises:
        ConnectionFailed: a TLS option is wrong or a certificate or key file cannot be used.
    """
    try:
        stripped, settings = tls_settings(url, os.environ)
        return stripped, tls_context(settings) if settings else None
    except TlsProblem as exc:
        raise ConnectionFailed(mask_url(url), str(exc)) from None


def tls_reason(exc: BaseException, url: str) -> str | None:
    """Why a connection to `url` failed its TLS handshake, in one line; None if it did not."""
    settings = None
    try:
        settings = tls_settings(url, os.environ)[1]
    except TlsProblem:
        pass
    if settings is None:
        return None
    name = settings.server_name or urlsplit(url).hostname or "localhost"
    return describe_failure(exc, name, client_cert=settings.certfile is not None)


async def _connect_one(url: str, name: str, seconds: float) -> AbstractConnection:
    stripped, context = tls_for(url)
    try:
        return await aio_pika.connect(
            stripped,
            timeout=seconds,
            ssl_context=context,
            client_properties={"connection_name": client_name(name)},
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # aio-pika raises many types here; all mean "cannot connect"
        reason = tls_reason(exc, url) or scrub(f"{type(exc).__name__}: {exc}", url)
        if "['Connection.OpenOk'], got <Connection.Close" in reason:
            # The login worked but Connection.Open was refused; aiormq drops the reply text.
            # The user is named by the URL only: scrub() would mask a user named like its password.
            vhost = unquote(urlsplit(url).path[1:]) or "/"
            reason = (
                f"vhost {vhost!r} does not exist or the URL's user may not use it; create it with "
                f"'rabbitmqctl add_vhost {vhost}' and grant it with 'rabbitmqctl set_permissions'"
            )
        raise ConnectionFailed(mask_url(url), reason) from None
