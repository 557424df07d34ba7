"""rabbitq's test kit: run tasks as the consumer runs them, with or without a broker.

Without a broker, `run_task` (and `run_task_sync`) runs one attempt of a task through the
consumer's own validation, handler call and retry decision, and says what the consumer would
do: ack it (with the result), retry it in which tier, or park it with which reason.

With a broker, this module is a pytest plugin, loaded on request::

    pytest -p rabbitq.testing              # or, in the top conftest.py:
    pytest_plugins = ["rabbitq.testing"]

It is not registered as a `pytest11` entry point on purpose: installing rabbitq must not
add fixtures, options or broker connections to every pytest run in that environment (a
project that only publishes tasks, a monorepo's other packages). Its fixtures:

* `rabbitq_url`: the broker, from `RABBITQ_TEST_URL`, else `RABBITQ_URL`, else
  `amqp://guest:guest@127.0.0.1:5672/`;
* `rabbitq_namespace`: a namespace of the test's own;
* `rabbitq_harness`: a `Harness` in that namespace; `await rabbitq_harness.start(app)` applies
  the topology (the ini option `rabbitq_topology`, default `topology` under the rootdir, with
  the retry tiers' TTLs at 50 ms and no delay ladder) and runs the app's consumers in the
  test's event loop; `await rabbitq_harness.settle(*messages)` publishes and returns each
  task's `TaskReport`. Everything it declared is deleted after the test.

The async fixtures need pytest-asyncio (the `testing` extra installs it).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from rabbitq.testing._harness import Harness, TaskReport, for_test
from rabbitq.testing._run import TaskRun, run_task, run_task_sync

__all__ = [
    "Harness",
    "TaskReport",
    "TaskRun",
    "for_test",
    "run_task",
    "run_task_sync",
]

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
TOPOLOGY_INI = "rabbitq_topology"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        TOPOLOGY_INI,
        "the directory of the app's topology/*.toml files, relative to the rootdir "
        "(default: topology)",
        default="topology",
    )


@pytest.fixture
def rabbitq_url() -> str:
    """The broker the harness uses: RABBITQ_TEST_URL, else RABBITQ_URL, else guest on
    127.0.0.1."""
    return os.environ.get("RABBITQ_TEST_URL") or os.environ.get("RABBITQ_URL") or DEFAULT_URL


@pytest.fixture
def rabbitq_namespace(request: pytest.FixtureRequest) -> str:
    """A namespace of this test's own: `rqt-`, the test's name, and random digits."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:32].strip("-")
    return f"rqt-{slug}-{uuid.uuid4().hex[:8]}" if slug else f"rqt-{uuid.uuid4().hex[:8]}"


@pytest_asyncio.fixture
async def rabbitq_harness(
    request: pytest.FixtureRequest, rabbitq_url: str, rabbitq_namespace: str
) -> AsyncIterator[Harness]:
    """A `Harness` in the test's namespace; closed (consumers stopped, queues and exchanges
    deleted, the app's namespace given back) after the test."""
    directory = Path(str(request.config.getini(TOPOLOGY_INI)))
    harness = Harness(rabbitq_url, rabbitq_namespace, request.config.rootpath / directory)
    try:
        yield harness
    finally:
        await harness.close()
