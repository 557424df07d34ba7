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
    """A plain (not robust) connection; rabbitq runs its own reconnect loop.

    Raises:
        ConnectionFailed: with the masked URL and the reason.
    """
    try:
        return await aio_pika.connect(
            url,
            timeout=CONNECT_TIMEOUT_SECONDS,
            client_properties={"connection_name": client_name(name)},
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # aio-pika raises many types here; all mean "cannot connect"
        reason = scrub(f"{type(exc).__name__}: {exc}", url)
        if "['Connection.OpenOk'], got <Connection.Close" in reason:
            # The login worked but Connection.Open was refused; aiormq drops the reply text.
            # The user is named by the URL only: scrub() would mask a user named like its password.
            vhost = unquote(urlsplit(url).path[1:]) or "/"
            reason = (
                f"vhost {vhost!r} does not exist or the URL's user may not use it; create it with "
                f"'rabbitmqctl add_vhost {vhost}' and grant it with 'rabbitmqctl set_permissions'"
            )
        raise ConnectionFailed(mask_url(url), reason) from None
