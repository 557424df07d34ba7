"""The screenshots of docs/console.md, taken from a real console over a real broker.

Run from the repository root, against the RabbitMQ at RABBITQ_URL (default
amqp://guest:guest@localhost:5672/; the management plugin fills in running counts and rates):

    .venv/bin/python scripts/console_screenshots.py

It declares a shop of four workloads in a namespace of its own (`shots-<random>`), parks tasks
of several kinds through a real consumer (scripts/console_demo_app.py), leaves webhooks waiting
in a retry tier and ready, keeps a consumer on thumbnails busy, starts `rabbitq console` on a
free port and drives Debian's headless Chromium (selenium, /usr/bin/chromedriver) through the
overview, a parking lot, one parked task, a replay's confirmation and its result, saving each
as docs/console/NAME.png at 1280x860. docs/console/screenshots.json records, for each PNG, the
templates and stylesheet it shows with their sha256: tests/unit/test_console_screenshots.py
fails once one of them changes, until this script is run again. On the way out, always: the
browser, the console and the consumer are stopped and every queue and exchange of the
namespace is deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aio_pika
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python scripts/console_screenshots.py`
    sys.path.insert(0, str(ROOT))

from rabbitq import App, Consumer, Outgoing, Task  # noqa: E402 - after the path above
from rabbitq import _declare as declare  # noqa: E402
from rabbitq._connection import DEFAULT_URL  # noqa: E402
from rabbitq._topology import Topology, Workload, parse_topology  # noqa: E402
from scripts import console_demo_app as shop  # noqa: E402

OUT = ROOT / "docs" / "console"
MANIFEST = OUT / "screenshots.json"
CONSOLE = ROOT / "rabbitq" / "_console"
WINDOW = (1280, 860)
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOPOLOGY = """\
[workloads.emails]
capacity = 8
[workloads.emails.retry]
tiers = ["50ms"]
max_attempts = 2

[workloads.invoices]
capacity = 4
[workloads.invoices.retry]
tiers = ["50ms", "100ms"]
max_attempts = 3

[workloads.thumbnails]
capacity = 4
[workloads.thumbnails.retry]
tiers = ["30s"]

[workloads.webhooks]
capacity = 8
[workloads.webhooks.retry]
tiers = ["15m", "1h"]
max_attempts = 4
"""
RUNNING = 4  # thumbnails' capacity: the tasks its consumer holds while the pictures are taken


def page_sources(template: str) -> list[Path]:
    """The files a page's look comes from: its template, the base it extends, the stylesheet."""
    return [
        CONSOLE / "templates" / "base.html",
        CONSOLE / "templates" / template,
        CONSOLE / "static" / "console.css",
    ]


SHOTS = {  # file -> the template of the page it shows
    "overview.png": "overview.html",
    "parking-lot.png": "workload.html",
    "task.png": "task.html",
    "confirm.png": "confirm.html",
    "result.png": "result.html",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest() -> dict[str, object]:
    """What each PNG shows: its page's source files (from the repository root) and their sha256."""
    return {
        "regenerate": "python scripts/console_screenshots.py",
        "screenshots": {
            name: {str(p.relative_to(ROOT)): sha256(p) for p in page_sources(template)}
            for name, template in SHOTS.items()
        },
    }


def smaller_png(data: bytes) -> bytes:
    """The same picture, a fifth to a quarter smaller: Chromium chooses a filter per row, which
    suits photographs, but a page of text on flat colours deflates best unfiltered, at level 9."""
    chunks, at = [], 8  # after the signature
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunks.append((data[at + 4 : at + 8], data[at + 8 : at + 8 + length]))
        at += 12 + length
    header = chunks[0][1]
    width, height, bits, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if bits != 8 or colour not in (2, 6) or interlace:
        return data  # not what Chromium writes: left as it is
    pixel = 3 if colour == 2 else 4
    filtered = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = unfiltered(filtered, width * pixel, height, pixel)
    pixels = zlib.compress(b"".join(b"\0" + row for row in rows), 9)
    first = next(i for i, (kind, _) in enumerate(chunks) if kind == b"IDAT")
    kept = [(kind, body) for kind, body in chunks if kind != b"IDAT"]
    kept.insert(first, (b"IDAT", pixels))
    out = [data[:8]]
    for kind, body in kept:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        out.append(struct.pack(">I", len(body)) + kind + body + crc)
    return b"".join(out)


def unfiltered(data: bytes, stride: int, height: int, pixel: int) -> list[bytes]:
    """PNG scanlines with their filters (none, sub, up, average, Paeth) undone."""
    rows: list[bytes] = []
    above = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = data[start], bytearray(data[start + 1 : start + 1 + stride])
        for i in range(stride) if kind else ():
            left = line[i - pixel] if i >= pixel else 0
            up, corner = above[i], above[i - pixel] if i >= pixel else 0
            if kind == 1:
                guess = left
            elif kind == 2:
                guess = up
            elif kind == 3:
                guess = (left + up) // 2
            else:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                guess = left if pa <= pb and pa <= pc else up if pb <= pc else corner
            line[i] = (line[i] + guess) & 0xFF
        rows.append(bytes(line))
        above = line
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_for(
    predicate: Callable[[], object], what: str, timeout_seconds: float = 30.0
) -> None:
    """Poll `predicate` (a function or a coroutine function) until true; fail saying what."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"error: {what} did not happen within {timeout_seconds:.0f}s")
        await asyncio.sleep(0.05)


async def depth(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await channel.close()


@contextlib.asynccontextmanager
async def consuming(app: App, workload: Workload, url: str) -> AsyncIterator[Consumer]:
    """A consumer of `workload` running in this loop until the block ends."""
    consumer = Consumer(app, workload, url, grace_seconds=5)
    running = asyncio.create_task(consumer.run())
    ready = asyncio.ensure_future(consumer.ready.wait())
    await asyncio.wait({running, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        running.cancel()
        raise SystemExit(f"error: the consumer of {workload.name} did not start")
    try:
        yield consumer
    finally:
        consumer.stop()
        await asyncio.wait_for(running, timeout=consumer.grace_seconds + 10)
        await app.close()


def fresh_app(topology: Topology, url: str, release: asyncio.Event | None = None) -> App:
    app = shop.build(release)
    app.namespace, app.url = topology.namespace, url
    return app


def message(app: App, task: str, payload: dict[str, object]) -> Outgoing:
    return Task(app, app.tasks[task]).message(payload)


def email(app: App, task: str, to: str, order: int) -> Outgoing:
    return message(app, task, {"to": to, "template": "order-confirmation", "order": order})


async def park(connection: aio_pika.abc.AbstractConnection, topology: Topology, url: str) -> None:
    """Emails and invoices parked for good, of several kinds; webhooks waiting to retry."""
    emails, invoices = topology.workload("emails"), topology.workload("invoices")
    webhooks = topology.workload("webhooks")

    async def holds(queue: str, n: int) -> bool:
        return await depth(connection, queue) == n

    app = fresh_app(topology, url)
    mails = [email(app, "emails.send", f"customer{n}@mail.example", 1000 + n) for n in range(36)]
    mails += [email(app, "emails.render", f"buyer{n}@mail.example", 2000 + n) for n in range(12)]
    mails += [email(app, "emails.send", f"old{n}@bounced.example", 3000 + n) for n in range(5)]
    async with consuming(app, emails, url):
        await app.publish_many(mails)
        await wait_for(lambda: holds(emails.parking_queue, len(mails)), "every email parked")

    app = fresh_app(topology, url)
    bills = [
        message(app, "invoices.charge", {"invoice": 5400 + n, "amount_cents": 1990 + 500 * n})
        for n in range(8)
    ]
    async with consuming(app, invoices, url):
        await app.publish_many(bills)
        await wait_for(lambda: holds(invoices.parking_queue, len(bills)), "every invoice parked")

    hook: dict[str, object] = {"url": "https://partner.example/hooks/orders", "event": "order.paid"}
    app = fresh_app(topology, url)
    async with consuming(app, webhooks, url):
        await app.publish_many([message(app, "webhooks.deliver", hook) for _ in range(7)])
        first_tier = webhooks.tiers[0].queue
        await wait_for(lambda: holds(first_tier, 7), "seven webhooks in their first retry tier")
    app = fresh_app(topology, url)  # and some waiting, with no consumer to take them
    await app.publish_many([message(app, "webhooks.deliver", hook) for _ in range(18)])
    await app.close()


@contextlib.asynccontextmanager
async def busy_thumbnails(
    connection: aio_pika.abc.AbstractConnection, topology: Topology, url: str
) -> AsyncIterator[None]:
    """A consumer of thumbnails holding RUNNING tasks, with more ready, until the block ends."""
    thumbnails = topology.workload("thumbnails")
    release = asyncio.Event()
    app = fresh_app(topology, url, release)
    pictures = [
        message(app, "thumbnails.resize", {"image": f"products/{n}.jpg", "width": 320})
        for n in range(40)
    ]
    async with consuming(app, thumbnails, url):
        await app.publish_many(pictures)
        ready = len(pictures) - RUNNING

        async def started() -> bool:
            return await depth(connection, thumbnails.work_queue) == ready

        await wait_for(started, f"{RUNNING} thumbnails running")
        try:
            yield
        finally:
            release.set()


@contextlib.contextmanager
def console(topology_dir: Path, namespace: str, url: str, logs: Path) -> Iterator[str]:
    """`rabbitq console` on a free loopback port, stopped on exit; its base URL."""
    port = free_port()
    args = [sys.executable, "-m", "rabbitq", "console", "--port", str(port)]
    args += ["--topology", str(topology_dir), "--namespace", namespace]
    args += ["--app", "scripts.console_demo_app:app"]
    env = {k: v for k, v in os.environ.items() if k != "RABBITQ_CONSOLE_TOKEN"}
    env["RABBITQ_URL"] = url
    with (logs / "console.err").open("wb") as err:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=err, stderr=err)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def chromium() -> WebDriver:
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--hide-scrollbars"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    options.add_argument("--force-device-scale-factor=1")
    # a given driver path: selenium-manager never runs (it would download a driver)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    # --window-size is the window's: grow it by its frame so the page gets WINDOW
    frame = driver.execute_script(
        "return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight]"
    )
    driver.set_window_size(WINDOW[0] + frame[0], WINDOW[1] + frame[1])
    return driver


def shoot(base: str, out: Path) -> None:
    """Open each page as an operator would and save it; the replay moves the render errors."""
    driver = chromium()
    try:
        wait = WebDriverWait(driver, 30)

        def save(name: str) -> None:
            (out / name).write_bytes(smaller_png(driver.get_screenshot_as_png()))

        def group(error_type: str) -> None:
            """The emails' parking lot filtered to the failure group of `error_type`."""
            driver.get(f"{base}/workloads/emails")
            rows = driver.find_elements(By.CSS_SELECTOR, "#groups tr.group")
            (row,) = [r for r in rows if error_type in r.text]
            row.find_element(By.CSS_SELECTOR, "a.group-link").click()
            wait.until(lambda d: "group=" in d.current_url)

        def shows_running(_: WebDriver) -> bool:
            # the management API's counts are up to 5 s old: reload until they arrive
            driver.get(f"{base}/")
            cell = driver.find_element(By.CSS_SELECTOR, 'tr[data-workload="thumbnails"] .running')
            return cell.text.strip() == str(RUNNING)

        wait.until(shows_running)
        save("overview.png")

        driver.get(f"{base}/workloads/emails")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#groups tr.group"))
        save("parking-lot.png")

        group("ConnectionRefusedError")
        driver.find_element(By.CSS_SELECTOR, "#tasks a.task-link").click()
        wait.until(lambda d: d.find_elements(By.ID, "traceback"))
        save("task.png")

        group("KeyError")
        driver.find_element(By.ID, "replay-matching").click()
        wait.until(lambda d: d.find_elements(By.ID, "confirm"))
        save("confirm.png")

        driver.find_element(By.ID, "confirm").click()
        wait.until(lambda d: d.find_elements(By.ID, "moved-count"))
        save("result.png")
    finally:
        driver.quit()


async def delete(url: str, topology: Topology) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for queue in topology.queues():
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(queue.name)
            if channel.is_closed:
                channel = await connection.channel()
        for exchange in topology.exchanges():
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.exchange_delete(exchange.name)
            if channel.is_closed:
                channel = await connection.channel()
    finally:
        await connection.close()


async def take(url: str, scratch: Path, out: Path) -> None:
    """Fill the shop, start its console, take the pictures into `out`; delete the shop."""
    namespace = f"shots-{uuid.uuid4().hex[:8]}"
    topology = parse_topology({"shop.toml": TOPOLOGY}, namespace)
    connection = await aio_pika.connect(url)
    try:
        await declare.apply(connection, topology)
        await park(connection, topology, url)
        async with busy_thumbnails(connection, topology, url):
            with console(scratch, namespace, url, scratch) as base:
                await wait_for(lambda: asyncio.to_thread(answers, base), "the console answering")
                await asyncio.to_thread(shoot, base, out)
    finally:
        await connection.close()
        await delete(url, topology)


def main(args: argparse.Namespace) -> None:
    logging.getLogger("rabbitq.settle").setLevel(logging.CRITICAL)  # each park is on purpose
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="console-shots-") as name:
        scratch = Path(name)
        (scratch / "shop.toml").write_text(TOPOLOGY)
        try:
            asyncio.run(take(args.url, scratch, out))
        except BaseException:
            print((scratch / "console.err").read_text(errors="replace"), file=sys.stderr)
            raise
    if out == OUT:
        MANIFEST.write_text(json.dumps(manifest(), indent=2, sort_keys=True) + "\n")
    for shot in SHOTS:
        print(f"{out / shot}: {(out / shot).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python scripts/console_screenshots.py", description=__doc__)
    p.add_argument("--url", default=os.environ.get("RABBITQ_URL", DEFAULT_URL))
    p.add_argument("--out", default=str(OUT), help="where the PNGs go (the manifest only to docs)")
    main(p.parse_args())
