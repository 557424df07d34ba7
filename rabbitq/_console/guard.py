"""Who may use the console, and which requests are its own forms: pure checks.

A console on a loopback address is for whoever can reach the machine's loopback, as a local
`rabbitq` command is; anywhere else it needs a token on every request. Actions are POSTs that
carry a token only the console's own pages hold (it cannot be read across origins), and whose
Origin, when the browser sends one, is the console's own.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from urllib.parse import urlsplit

from rabbitq._errors import UsageError

COOKIE = "rabbitq_console_token"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token."""
    if not is_loopback(host) and not token:
        raise UsageError(
            f"--host {host} is reachable from other machines: give --token (or "
            "RABBITQ_CONSOLE_TOKEN), or listen on 127.0.0.1"
        )


def presented_token(authorization: str | None, cookie: str | None) -> str | None:
    """The token a request carries: `Authorization: Bearer T`, else the login cookie."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return cookie


def token_ok(expected: str | None, presented: str | None) -> bool:
    if expected is None:
        return True
    return presented is not None and hmac.compare_digest(
        presented.encode("utf-8", "surrogateescape"), expected.encode()
    )


def csrf_token(secret: bytes) -> str:
    return hmac.new(secret, b"rabbitq-console-actions", hashlib.sha256).hexdigest()


def csrf_ok(secret: bytes, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(
        presented.encode(), csrf_token(secret).encode()
    )


def same_origin(origin: str | None, host: str | None) -> bool:
    """An Origin header, when there is one, names the console itself."""
    if origin is None:
        return True
    if origin == "null" or host is None:
        return False
    return urlsplit(origin).netloc == host
