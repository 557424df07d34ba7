"""The consumer's HTTP port: `/metrics` for Prometheus, `/healthz` and `/readyz` for probes.

It runs on the consumer's own event loop, on purpose: a loop blocked by a handler cannot
answer, so a liveness probe sees what the broker sees (no heartbeats) instead of a happy
thread beside a stuck consumer.

* `/metrics`: the registry in Prometheus' text format.
* `/healthz`: 200 while the process runs and its broker connection is open, else 503.
* `/readyz`: 200 while consuming, else 503 (starting, reconnecting, draining).

Bodies of the probes are one line of JSON. Nothing else is served; the server reads only the
request head and closes each connection after answering.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from rabbitq._errors import ConfigError

logger = logging.getLogger("rabbitq.serve")

HEAD_LIMIT_BYTES = 8192
READ_TIMEOUT_SECONDS = 5.0
Probe = Callable[[], tuple[bool, dict[str, Any]]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
# what a probe that hangs up, stalls or sends garbage causes
_CUT_OFF = (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError)


async def start(
    port: int, registry: CollectorRegistry, healthy: Probe, ready: Probe, host: str = "0.0.0.0"
) -> asyncio.Server:
    """Listen on `host:port` (all interfaces by default, for containers).

    Raises:
        ConfigError: the port cannot be bound (in use, or not allowed).
    """

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_SECONDS)
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            status, content_type, body = _route(method, path, registry, healthy, ready)
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
                + (b"" if method == "HEAD" else body)
            )
            await writer.drain()
        except _CUT_OFF:
            pass  # a probe that hung up or sent garbage gets nothing
        finally:
            writer.close()

    try:
        return await asyncio.start_server(answer, host, port, limit=HEAD_LIMIT_BYTES)
    except OSError as exc:
        raise ConfigError(f"--metrics-port {port}: cannot listen: {exc.strerror or exc}") from None


def _route(
    method: str, path: str, registry: CollectorRegistry, healthy: Probe, ready: Probe
) -> tuple[int, str, bytes]:
    if method not in ("GET", "HEAD"):
        return 405, "text/plain", b"GET only\n"
    if path == "/metrics":
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)
    if path in ("/healthz", "/readyz"):
        ok, facts = (healthy if path == "/healthz" else ready)()
        body = json.dumps({"status": "ok" if ok else "unavailable", **facts}) + "\n"
        return (200 if ok else 503), "application/json", body.encode()
    return 404, "text/plain", b"try /metrics, /healthz or /readyz\n"
