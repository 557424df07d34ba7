"""Opening connections to RabbitMQ, and keeping credentials out of every message.

Publishing and consuming never share a connection: when a resource alarm fires, the broker
stops reading from every connection that publishes, and acks travel on the same socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractConnection

from rabbitq._errors import ConnectionFailed

logger = logging.getLogger("rabbitq.connection")

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
CONNECT_TIMEOUT_SECONDS = 10.0


def mask_url(url: str) -> str:
    """The URL with its password replaced by `***`, safe to log or print."""
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
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    text = text.replace(url, mask_url(url))
    if password:
        # as written in the URL and as decoded by a library that quotes it back
        for form in {password, unquote(password)}:
            text = text.replace(form, "***")
    return text


def is_open(connection: AbstractConnection) -> bool:
    """False once the connection is closed from either side.

    aio-pika's `is_closed` only turns true after a local `close()`; a close by the broker
    (or a dropped socket) clears `connected` instead.
    """
    return not connection.is_closed and connection.connected.is_set()


async def connect(url: str, name: str) -> AbstractConnection:
    """A plain (not robust) connection; rabbitq runs its own reconnect loop.

    Raises:
        ConnectionFailed: with the masked URL and the reason.
    """
    client_name = f"rabbitq {name} on {socket.gethostname()}"
    try:
        return await aio_pika.connect(
            url, timeout=CONNECT_TIMEOUT_SECONDS, client_properties={"connection_name": client_name}
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # aio-pika raises many types here; all mean "cannot connect"
        reason = scrub(f"{type(exc).__name__}: {exc}", url)
        raise ConnectionFailed(mask_url(url), reason) from None
