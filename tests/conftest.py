"""Shared fixtures. Broker fixtures live in tests/broker/conftest.py."""

from __future__ import annotations

import os

# the users' test kit, on its own suite: tests/broker/test_examples_kit.py
pytest_plugins = ["rabbitq.testing"]

DEFAULT_TEST_URL = "amqp://guest:guest@127.0.0.1:5672/"


def broker_url() -> str:
    return os.environ.get("RABBITQ_TEST_URL", DEFAULT_TEST_URL)
