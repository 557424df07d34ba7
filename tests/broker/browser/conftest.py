"""Fixtures for the console's browser tests: a headless Chromium driven by Selenium, and
`rabbitq console` in a subprocess against the test's own topology and namespace.

Chromium and its driver are Debian's (`chromium`, `chromium-driver`; .ci/run installs them):
missing, the tests skip locally and fail under CI. Selenium is handed both paths, so its
selenium-manager never runs (it would try to download a browser and a driver).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

from tests.background import free_port, process, require, stderr_of
from tests.broker.test_declare import ROOT

CONSOLE_START_SECONDS = 15
PAGE_WAIT_SECONDS = 10  # what a test waits for the next page after a click


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """A fresh headless Chromium (no cookies, no history), quit after the test."""
    chromium = require("chromium", "chromium")
    chromedriver = require("chromedriver", "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-dev-shm-usage",  # a container's /dev/shm is small
        "--disable-background-networking",
        "--window-size=1280,1024",
    ):
        options.add_argument(argument)
    # Leave a dialog open rather than dismissing it, so a test can see that one was opened.
    options.unhandled_prompt_behavior = "ignore"
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


StartConsole = Callable[..., str]


@pytest.fixture
def console(tmp_path: Path, url: str, namespace: str) -> Iterator[StartConsole]:
    """`console(topology_dir, *options, host=...)` runs `rabbitq console` on a free port
    against the test's namespace, waits until it answers and returns its base URL; every
    console started is stopped after the test."""
    with contextlib.ExitStack() as running:

        def start(topology: Path, *options: str, host: str = "127.0.0.1") -> str:
            port = free_port()
            name = f"console-{port}"
            args = [sys.executable, "-m", "rabbitq", "console", "--port", str(port)]
            args += ["--host", host, "--topology", str(topology), "--namespace", namespace]
            proc = running.enter_context(
                process(
                    [*args, *options],
                    tmp_path,
                    name,
                    cwd=ROOT,
                    env={**os.environ, "RABBITQ_URL": url},  # the password stays off argv
                )
            )
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + CONSOLE_START_SECONDS
            while not _answers(base + "/static/console.css"):
                if proc.poll() is not None:
                    raise AssertionError(f"the console exited: {stderr_of(tmp_path, name)}")
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"the console did not answer within {CONSOLE_START_SECONDS}s: "
                        f"{stderr_of(tmp_path, name)}"
                    )
                time.sleep(0.05)  # polling interval; the deadline above bounds the wait
            return base

        yield start


def _answers(address: str) -> bool:
    """Whether an HTTP server answers at `address`, whatever its status (a 401 is an answer)."""
    try:
        with urllib.request.urlopen(address, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
