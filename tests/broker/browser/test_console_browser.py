"""The console in a real headless Chromium against the real broker (issue #12's acceptance):
park tasks of three kinds, read the overview, filter, open a group, replay it and see it run,
purge one task, checking the broker's queues after every step; HTML from a message is text;
read-only has no action; the token's login form.

Selenium's calls block the event loop while they wait for the console (a separate process);
nothing else runs on the loop meanwhile, and the consumer runs only between browser steps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection
from selenium.common.exceptions import (
    NoAlertPresentException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.wait import WebDriverWait

from rabbitq import App
from rabbitq import _parking as parking
from rabbitq import _wire as wire
from rabbitq._topology import Workload
from tests.broker.browser.conftest import PAGE_WAIT_SECONDS, StartConsole
from tests.broker.test_parking import Item, check_name, check_size
from tests.helpers import queue_depth, running_consumer, wait_until

SPEC: dict[str, Any] = {"capacity": 8, "retry": {"tiers": ["50ms"], "max_attempts": 1}}
PER_SITE = 5
# A cold Chromium on two busy cores takes a while to open its first session.
pytestmark = pytest.mark.timeout(120)

TOKEN = "console-" + "t" * 24
SCRIPT = "<script>alert(1)</script>"
IMAGE = "<img src=x onerror=alert(2)>"


class Jobs:
    """The `jobs` workload's two tasks: while `failing`, they fail at three places (a
    ValueError in check_name, one in check_size, a KeyError); after, they succeed, each
    noting what it ran in `ran`."""

    def __init__(self, namespace: str, url: str) -> None:
        self.failing = True
        self.ran: list[tuple[str, int]] = []
        self.url = url
        self.app = App(namespace=namespace, url=url)

        @self.app.task("jobs.name", workload="jobs")
        async def name(item: Item) -> None:
            if self.failing:
                check_name(item.n)
            self.ran.append(("jobs.name", item.n))

        @self.app.task("jobs.size", workload="jobs")
        async def size(item: Item) -> None:
            if self.failing:
                if item.n % 2:
                    check_size(item.n)
                raise KeyError(f"missing {item.n}")
            self.ran.append(("jobs.size", item.n))

        self.messages = [name.message(Item(n=n)) for n in range(PER_SITE)]
        self.messages += [size.message(Item(n=n)) for n in range(2 * PER_SITE)]

    async def park_all(self, workload: Workload, connection: AbstractConnection) -> None:
        async with running_consumer(self.app, workload, self.url):
            await self.app.publish_many(self.messages)
            await wait_until(
                lambda: _depth_is(connection, workload.parking_queue, 3 * PER_SITE),
                timeout=15,
                what="every task to be parked",
            )


async def _depth_is(connection: AbstractConnection, queue: str, depth: int) -> bool:
    return await queue_depth(connection, queue) == depth


async def park_directly(
    connection: AbstractConnection,
    workload: Workload,
    message_id: str,
    body: bytes,
    error: str,
    **headers: str,
) -> None:
    """A parked copy put straight into the parking lot, with what a consumer would write."""
    now_ms = wire.epoch_ms(time.time())
    park: dict[str, Any] = {
        wire.HEADER_PARK_REASON: "retries_exhausted",
        wire.HEADER_PARK_ERROR_TYPE: "ValueError",
        wire.HEADER_PARK_ERROR: error,
        wire.HEADER_PARK_TRACEBACK: f"Traceback (most recent call last):\nValueError: {error}",
        wire.HEADER_PARK_ATTEMPTS: 1,
        wire.HEADER_FIRST_FAILURE: now_ms,
        wire.HEADER_LAST_FAILURE: now_ms,
        wire.HEADER_PARKED_AT: now_ms,
    }
    channel = await connection.channel()
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                type="jobs.name",
                content_type="application/json",
                headers=park | headers,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=workload.parking_queue,
        )
    finally:
        await channel.close()


async def parked_ids(url: str, workload: Workload) -> list[str]:
    return [t.message_id for t in await parking.browse(url, workload)]


# The browser's side: each step waits, with a deadline, for the element the next page has.


def wait_for(driver: WebDriver, css: str) -> WebElement:
    element: WebElement = WebDriverWait(driver, PAGE_WAIT_SECONDS).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, css)),
        f"no {css!r} on {driver.current_url}",
    )
    return element


def open_page(driver: WebDriver, address: str, ready: str) -> None:
    driver.get(address)
    wait_for(driver, ready)


def click_through(driver: WebDriver, css: str, ready: str) -> None:
    """Click `css` and wait until the page it leads to, holding `ready`, has loaded."""
    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, css).click()
    WebDriverWait(driver, PAGE_WAIT_SECONDS).until(gone(page), f"clicking {css!r} led nowhere")
    wait_for(driver, ready)


def gone(page: WebElement) -> Callable[[WebDriver], bool]:
    """Whether `page` (an element of the page before) has been replaced by the next page."""

    def replaced(_: WebDriver) -> bool:
        try:
            page.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            # Mid-navigation Chromium may answer this instead of "stale" for the old page.
            if "does not belong to the document" not in str(exc):
                raise
            return True
        return False

    return replaced


def text(driver: WebDriver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text.strip()


def attributes(driver: WebDriver, css: str, name: str) -> list[str]:
    return [e.get_attribute(name) or "" for e in driver.find_elements(By.CSS_SELECTOR, css)]


def elements(driver: WebDriver, css: str) -> list[str]:
    """The elements matching `css`, as the start of their HTML (to say what was found)."""
    return [
        (e.get_attribute("outerHTML") or "")[:100]
        for e in driver.find_elements(By.CSS_SELECTOR, css)
    ]


def status_code(driver: WebDriver) -> int:
    """The HTTP status of the page shown (Chromium's navigation timing has it)."""
    code = driver.execute_script(
        "return performance.getEntriesByType('navigation')[0].responseStatus"
    )
    assert isinstance(code, int)
    return code


def assert_no_dialog(driver: WebDriver) -> None:
    try:
        alert = driver.switch_to.alert
    except NoAlertPresentException:
        return
    raise AssertionError(f"the page opened a dialog: {alert.text!r}")


async def test_park_filter_open_a_group_replay_it_and_purge_one(
    browser: WebDriver,
    console: StartConsole,
    make_topology: Any,
    topology_dir: Any,
    connection: AbstractConnection,
    url: str,
    namespace: str,
) -> None:
    """Each page shows what the broker holds, and each action moves exactly what it showed."""
    workload = (await make_topology(jobs=SPEC)).workload("jobs")
    jobs = Jobs(namespace, url)
    await jobs.park_all(workload, connection)
    parked = await parking.browse(url, workload)
    everything = [t.message_id for t in parked]
    base = console(topology_dir(jobs=SPEC))

    # The overview counts what the broker holds.
    open_page(browser, base + "/", "#overview tr[data-workload=jobs]")
    row = "#overview tr[data-workload=jobs]"
    assert text(browser, f"{row} td.parked") == str(3 * PER_SITE)
    assert text(browser, f"{row} td.ready") == "0"
    assert await queue_depth(connection, workload.parking_queue) == 3 * PER_SITE

    # Filtered by error type: exactly the ValueErrors, in the parking lot's order.
    click_through(browser, f"{row} a.workload", "form#filter")
    browser.find_element(By.CSS_SELECTOR, "form#filter input[name=error]").send_keys("ValueError")
    click_through(browser, "#apply-filter", "#tasks")
    value_errors = [t for t in parked if t.error_type == "ValueError"]
    assert len(value_errors) == 2 * PER_SITE
    assert attributes(browser, "#tasks tr.task", "data-id") == [t.message_id for t in value_errors]
    assert set(attributes(browser, "#groups tr.group", "data-fingerprint")) == {
        g.fingerprint for g in parking.groups(value_errors)
    }
    assert await parked_ids(url, workload) == everything  # reading moved nothing

    # One group: the tasks that failed in check_size.
    [group] = [g for g in parking.groups(parked) if g.where.endswith(":check_size")]
    members = [t for t in parked if t.fingerprint == group.fingerprint]
    chosen = f'#groups tr.group[data-fingerprint="{group.fingerprint}"]'
    assert text(browser, f"{chosen} td.count") == str(len(members)) == str(PER_SITE)
    click_through(browser, f"{chosen} a.group-link", "#tasks")
    assert attributes(browser, "#tasks tr.task", "data-id") == [t.message_id for t in members]

    # Replaying it shows the dry run first, which moves nothing.
    click_through(browser, "#replay-matching", "#plan-count")
    assert text(browser, "#plan-count") == str(len(members))
    assert attributes(browser, "li.planned", "data-id") == [t.message_id for t in members]
    assert await parked_ids(url, workload) == everything
    assert await queue_depth(connection, workload.work_queue) == 0

    # Confirmed, exactly the group goes back to the work queue; the rest stay, in order.
    click_through(browser, "#confirm", "#moved-count")
    assert text(browser, "#moved-count") == str(len(members))
    assert attributes(browser, "li.moved", "data-id") == [t.message_id for t in members]
    rest = [t for t in parked if t.fingerprint != group.fingerprint]
    assert await parked_ids(url, workload) == [t.message_id for t in rest]
    assert await queue_depth(connection, workload.work_queue) == len(members)

    # With the bug fixed, the replayed tasks run and succeed: none is parked again.
    jobs.failing = False
    async with running_consumer(jobs.app, workload, url):
        await wait_until(
            lambda: len(jobs.ran) >= len(members), timeout=10, what="the replayed group to run"
        )
    assert sorted(jobs.ran) == sorted((t.task, t.payload()["n"]) for t in members)
    assert await queue_depth(connection, workload.work_queue) == 0
    assert await parked_ids(url, workload) == [t.message_id for t in rest]
    open_page(browser, base + "/", row)
    assert text(browser, f"{row} td.parked") == str(len(rest))

    # One task purged from its own page: exactly that one leaves, the others keep their order.
    victim = rest[len(rest) // 2]
    open_page(browser, f"{base}/workloads/jobs", "#tasks")
    link = f'#tasks tr.task[data-id="{victim.message_id}"] a.task-link'
    click_through(browser, link, "#purge-one")
    assert text(browser, "#message-id") == victim.message_id
    assert text(browser, "#reason") == victim.reason == "retries_exhausted"
    assert text(browser, "#error") == f"{victim.error_type} {victim.error}"
    assert victim.error_type in text(browser, "#traceback")
    assert json.loads(text(browser, "#payload")) == victim.payload()
    click_through(browser, "#purge-one", "#plan-count")
    assert text(browser, "#plan-count") == "1"
    assert attributes(browser, "li.planned", "data-id") == [victim.message_id]
    assert await parked_ids(url, workload) == [t.message_id for t in rest]
    click_through(browser, "#confirm", "#moved-count")
    assert text(browser, "#moved-count") == "1"
    assert attributes(browser, "li.moved", "data-id") == [victim.message_id]
    assert await parked_ids(url, workload) == [t.message_id for t in rest if t is not victim]
    assert await queue_depth(connection, workload.work_queue) == 0


async def test_html_in_a_parked_payload_and_headers_renders_as_text(
    browser: WebDriver,
    console: StartConsole,
    make_topology: Any,
    topology_dir: Any,
    connection: AbstractConnection,
) -> None:
    """A `<script>` payload and error, and an `<img onerror>` header: no dialog, the literal
    text on the task page and in the workload's list, and no element made of them."""
    workload = (await make_topology(jobs=SPEC)).workload("jobs")
    body = json.dumps({"n": 1, "note": SCRIPT}).encode()
    await park_directly(connection, workload, "xss-1", body, SCRIPT, note=IMAGE)
    base = console(topology_dir(jobs=SPEC))

    # An <img onerror> would fire only once its load failed, maybe after any check for a dialog:
    # that no such element exists is what shows it can never run.
    open_page(browser, f"{base}/workloads/jobs", "#tasks tr.task")
    assert_no_dialog(browser)
    assert SCRIPT in text(browser, '#tasks tr.task[data-id="xss-1"]')
    assert SCRIPT in text(browser, "#groups tr.group td.example")
    assert elements(browser, "main script, main img") == []

    open_page(browser, f"{base}/workloads/jobs/tasks/xss-1", "#payload")
    assert_no_dialog(browser)
    assert SCRIPT in text(browser, "#payload")
    assert SCRIPT in text(browser, "#error")
    assert IMAGE in text(browser, "#headers")
    assert elements(browser, "main script, main img") == []
    assert await queue_depth(connection, workload.parking_queue) == 1


async def test_a_read_only_console_has_no_action(
    browser: WebDriver,
    console: StartConsole,
    make_topology: Any,
    topology_dir: Any,
    connection: AbstractConnection,
) -> None:
    """With --read-only the badge shows, and no page has a button but the filter's."""
    workload = (await make_topology(jobs=SPEC)).workload("jobs")
    await park_directly(connection, workload, "m1", b'{"n": 1}', "bad")
    base = console(topology_dir(jobs=SPEC), "--read-only")

    open_page(browser, f"{base}/workloads/jobs", '#tasks tr.task[data-id="m1"]')
    assert browser.find_element(By.ID, "read-only").is_displayed()
    assert attributes(browser, "main button", "id") == ["apply-filter"]
    assert elements(browser, "input[type=checkbox], [name=do]") == []

    open_page(browser, f"{base}/workloads/jobs/tasks/m1", "#payload")
    assert browser.find_element(By.ID, "read-only").is_displayed()
    assert elements(browser, "main button, main form") == []
    assert await queue_depth(connection, workload.parking_queue) == 1


async def test_beyond_loopback_the_browser_signs_in_with_the_token(
    browser: WebDriver,
    console: StartConsole,
    make_topology: Any,
    topology_dir: Any,
    connection: AbstractConnection,
) -> None:
    """A console on 0.0.0.0 answers the login form (401) until its token is typed in."""
    workload = (await make_topology(jobs=SPEC)).workload("jobs")
    await park_directly(connection, workload, "m1", b'{"n": 1}', "bad")
    base = console(topology_dir(jobs=SPEC), "--token", TOKEN, host="0.0.0.0")

    for path in ("/", "/workloads/jobs", "/workloads/jobs/tasks/m1"):
        open_page(browser, base + path, "form#login")
        assert status_code(browser) == 401, path
        assert elements(browser, "#overview, #tasks, #payload") == []

    browser.find_element(By.CSS_SELECTOR, "form#login input[name=token]").send_keys("wrong")
    click_through(browser, "form#login button", "form#login")
    assert status_code(browser) == 401
    assert "not this console's" in text(browser, "main p.error")

    browser.find_element(By.CSS_SELECTOR, "form#login input[name=token]").send_keys(TOKEN)
    click_through(browser, "form#login button", "#overview tr[data-workload=jobs]")
    assert status_code(browser) == 200
    assert text(browser, "#overview tr[data-workload=jobs] td.parked") == "1"
    assert TOKEN not in browser.page_source
    open_page(browser, f"{base}/workloads/jobs/tasks/m1", "#payload")  # the cookie holds
    assert status_code(browser) == 200
