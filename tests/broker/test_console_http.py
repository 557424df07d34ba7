"""The console's guard over HTTP, against a real `rabbitq console` and the broker: the token on
every page and action beyond loopback, read-only, forged and cross-site POSTs refused, and no
password on any page. (The pages themselves are tested in a browser: test_console_browser.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from rabbitq import _parking as parking
from rabbitq._topology import Workload
from tests.broker.test_declare import ROOT
from tests.helpers import wait_until

JOBS = {"retry": {"tiers": ["1s"], "max_attempts": 1}}
TOKEN = "tok-" + "x" * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def console(url: str, directory: Path, namespace: str, *args: str) -> AsyncIterator[str]:
    """`rabbitq console ARGS` in a subprocess; yields its base URL once it answers."""
    port = free_port()
    env = {**os.environ, "RABBITQ_URL": url, "RABBITQ_TOPOLOGY": str(directory)}
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "rabbitq", "console", "--port", str(port), *args),
        cwd=ROOT,
        env=env | {"RABBITQ_NAMESPACE": namespace},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"

    async def answers() -> bool:
        if process.returncode is not None:
            assert process.stderr is not None
            raise AssertionError(f"the console exited: {(await process.stderr.read()).decode()}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        return False

    try:
        await wait_until(answers, timeout=15, what="the console to listen", interval=0.05)
        yield base
    finally:
        if process.returncode is None:
            process.terminate()
        await process.communicate()


def request(
    base: str,
    path: str,
    form: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    data = None if form is None else urlencode(form).encode()
    req = urllib.request.Request(base + path, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def call(base: str, path: str, **kw: Any) -> tuple[int, str]:
    return await asyncio.to_thread(request, base, path, **kw)


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert match, "no CSRF token on the page"
    return match[1]


async def park_some(connection: AbstractConnection, workload: Workload, n: int) -> list[str]:
    """Parked copies straight into the parking lot, as a consumer would leave them."""
    channel = await connection.channel()
    ids = [f"m{i}" for i in range(n)]
    for i in ids:
        await channel.default_exchange.publish(
            aio_pika.Message(
                b'{"n": 1}',
                message_id=i,
                type="jobs.send",
                headers={"rabbitq-park-reason": "retries_exhausted", "rabbitq-error-type": "E"},
            ),
            routing_key=workload.parking_queue,
        )
    await channel.close()
    return ids


async def parked_ids(url: str, workload: Workload) -> list[str]:
    return [t.message_id for t in await parking.browse(url, workload)]


@pytest.fixture
async def jobs(
    make_topology: Any, topology_dir: Callable[..., Path], connection: AbstractConnection
) -> tuple[Workload, Path, list[str]]:
    workload = (await make_topology(jobs=JOBS)).workload("jobs")
    return workload, topology_dir(jobs=JOBS), await park_some(connection, workload, 3)


ROUTES = ["/", "/workloads/jobs", "/workloads/jobs/tasks/m0", "/metrics"]
ACTIONS = ["/workloads/jobs/confirm", "/workloads/jobs/replay", "/workloads/jobs/purge"]


async def test_beyond_loopback_every_page_and_action_needs_the_token(jobs, url, namespace):
    workload, directory, ids = jobs
    async with console(url, directory, namespace, "--host", "0.0.0.0", "--token", TOKEN) as base:
        for path in ROUTES:
            code, body = await call(base, path)
            assert code == 401, path
            assert "m0" not in body and 'name="csrf"' not in body, path
        for path in ACTIONS:
            code, _ = await call(base, path, form={"ids": " ".join(ids), "do": "purge-matching"})
            assert code == 401, path
        # the login page's stylesheet and script come without it: they hold no data
        for path in ("/static/console.css", "/static/console.js"):
            assert (await call(base, path))[0] == 200, path
        assert (await call(base, "/static/../app.py"))[0] in (401, 404)
        wrong = {"Authorization": "Bearer " + TOKEN[:-1]}
        assert (await call(base, "/", headers=wrong))[0] == 401
        assert (await call(base, "/login", form={"token": "nope"}))[0] == 401

        bearer = {"Authorization": "Bearer " + TOKEN}
        for path in ROUTES:
            assert (await call(base, path, headers=bearer))[0] == 200, path
        code, page = await call(base, "/workloads/jobs", headers=bearer)
        assert "m2" in page
        # the login form sets the token as a strict, HTTP-only cookie
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        login = urllib.request.Request(base + "/login", data=urlencode({"token": TOKEN}).encode())
        with await asyncio.to_thread(opener.open, login, None, 15) as r:
            assert r.status == 200 and 'id="overview"' in r.read().decode()
    assert await parked_ids(url, workload) == ids


async def test_the_console_will_not_listen_beyond_loopback_without_a_token(jobs, url, namespace):
    _, directory, _ = jobs
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "rabbitq", "console", "--host", "0.0.0.0", "--port", "1"],
        cwd=ROOT,
        env={**os.environ, "RABBITQ_URL": url, "RABBITQ_TOPOLOGY": str(directory)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: --host 0.0.0.0")


async def test_read_only_has_no_action_and_refuses_a_forged_one(jobs, url, namespace):
    workload, directory, ids = jobs
    async with console(url, directory, namespace, "--read-only") as base:
        for path in ("/workloads/jobs", "/workloads/jobs/tasks/m0"):
            code, page = await call(base, path)
            assert code == 200 and 'id="read-only"' in page
            assert 'name="do"' not in page and "<button" not in page.split("</form>", 1)[-1]
        _, listing = await call(base, "/workloads/jobs")  # its token, as a forger might get it
        for path in ACTIONS:
            form = {"ids": " ".join(ids), "do": "purge-matching", "csrf": csrf_of(listing)}
            code, body = await call(base, path, form=form)
            assert code == 403 and "read-only" in body, path
    assert await parked_ids(url, workload) == ids


async def test_posts_need_the_pages_csrf_token_and_their_own_origin(jobs, url, namespace):
    workload, directory, ids = jobs
    async with console(url, directory, namespace) as base:
        _, page = await call(base, "/workloads/jobs")
        csrf = csrf_of(page)
        purge = {"ids": ids[0]}
        assert (await call(base, "/workloads/jobs/purge", form=purge))[0] == 403
        assert (await call(base, "/workloads/jobs/purge", form=purge | {"csrf": "0" * 64}))[
            0
        ] == 403
        evil = {"Origin": "http://evil.example"}
        code, _ = await call(
            base, "/workloads/jobs/purge", form=purge | {"csrf": csrf}, headers=evil
        )
        assert code == 403
        assert await parked_ids(url, workload) == ids

        # the console's own form, from its own page: the dry run, then exactly that task
        own = {"Origin": base}
        form = {"csrf": csrf, "do": "purge-selected", "id": ids[1]}
        code, plan = await call(base, "/workloads/jobs/confirm", form=form, headers=own)
        assert code == 200 and 'id="plan-count">1<' in plan
        assert await parked_ids(url, workload) == ids  # a dry run moves nothing
        code, done = await call(base, "/workloads/jobs/purge", form={"csrf": csrf, "ids": ids[1]})
        assert code == 200 and 'id="moved-count">1<' in done
        _, metrics = await call(base, "/metrics")
        assert 'rabbitq_console_tasks_moved_total{action="purge",workload="jobs"} 1.0' in metrics
    assert await parked_ids(url, workload) == [ids[0], ids[2]]


async def test_no_page_shows_the_broker_password(jobs, url, namespace):
    _, directory, _ = jobs
    parts = urlsplit(url)
    wrong = urlunsplit(parts._replace(netloc=f"{parts.username}:n0t-th3-pass@{parts.hostname}"))
    async with console(wrong, directory, namespace) as base:
        code, page = await call(base, "/")
        assert code == 502 and "error: " in page
        assert "n0t-th3-pass" not in page and "***" in page
        code, page = await call(base, "/workloads/nope")
        assert code == 400 and "no workload" in page
