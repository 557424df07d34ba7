"""The HTTP port: /metrics, /healthz, /readyz, and nothing else."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from prometheus_client import CollectorRegistry, Counter

from rabbitq import _serve as serve
from rabbitq._errors import ConfigError


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("rabbitq_probe", "a probe", registry=registry).inc(3)
    return registry


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(
    ("healthy", "ready", "path", "status", "body"),
    [
        (True, True, "/healthz", 200, {"status": "ok", "connected": True}),
        (False, False, "/healthz", 503, {"status": "unavailable", "connected": False}),
        (True, True, "/readyz", 200, {"status": "ok", "consuming": True}),
        (True, False, "/readyz", 503, {"status": "unavailable", "consuming": False}),
        (True, True, "/readyz?verbose=1", 200, {"status": "ok", "consuming": True}),
    ],
)
async def test_probes_answer_with_state(
    healthy: bool, ready: bool, path: str, status: int, body: dict[str, object]
) -> None:
    server = await serve.start(
        0,
        _registry(),
        lambda: (healthy, {"connected": healthy}),
        lambda: (ready, {"consuming": ready}),
        host="127.0.0.1",
    )
    port = server.sockets[0].getsockname()[1]
    try:
        got_status, headers, got_body = await _get(port, path)
    finally:
        server.close()
    assert got_status == status
    assert headers["Content-Type"] == "application/json"
    assert json.loads(got_body) == body


async def test_metrics_serves_the_registry_and_nothing_else_is_served() -> None:
    server = await serve.start(
        0, _registry(), lambda: (True, {}), lambda: (True, {}), host="127.0.0.1"
    )
    port = server.sockets[0].getsockname()[1]
    try:
        status, headers, body = await _get(port, "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert b"rabbitq_probe_total 3.0" in body
        assert (await _get(port, "/"))[0] == 404
        assert (await _get(port, "/metrics", "POST"))[0] == 405
        status, headers, body = await _get(port, "/metrics", "HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    finally:
        server.close()


async def test_a_port_in_use_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--metrics-port {port}: cannot listen"):
            await serve.start(
                port, _registry(), lambda: (True, {}), lambda: (True, {}), host="127.0.0.1"
            )
