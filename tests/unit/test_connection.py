"""Credentials never reach logs or output: mask_url and scrub."""

from __future__ import annotations

import pytest

from rabbitq._connection import mask_url, scrub


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:guest@localhost:5672/", "amqp://guest:***@localhost:5672/"),
        ("amqp://guest:s3cret@localhost/", "amqp://guest:***@localhost/"),
        ("amqps://app:s3cret@mq.example.com:5671/prod", "amqps://app:***@mq.example.com:5671/prod"),
        (
            "amqp://app:s3cret@mq.example.com/%2F?heartbeat=30",
            "amqp://app:***@mq.example.com/%2F?heartbeat=30",
        ),
        ("amqp://app:p%40ss%2Fw%3Ard@mq:5672/", "amqp://app:***@mq:5672/"),
        ("amqp://app:pa:ss@mq:5672/", "amqp://app:***@mq:5672/"),
        ("amqp://app:p@ss@mq/", "amqp://app:***@mq/"),
        ("amqp://app:@mq/", "amqp://app:***@mq/"),
        ("amqp://:s3cret@mq/", "amqp://:***@mq/"),
    ],
    ids=[
        "with-port",
        "without-port",
        "amqps-vhost",
        "query",
        "percent-encoded",
        "colon",
        "at-sign",
        "empty-password",
        "no-user",
    ],
)
def test_mask_url_hides_the_password(url: str, masked: str) -> None:
    """mask_url replaces the password with *** and keeps user, host, port, path and query."""
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    "url",
    [
        "amqp://localhost:5672/",
        "amqp://guest@localhost/",
        "amqp://localhost",
        "",
    ],
)
def test_mask_url_leaves_a_url_without_password_alone(url: str) -> None:
    """A URL without a password is returned unchanged."""
    assert mask_url(url) == url


def test_mask_url_of_an_unparseable_url_reveals_nothing() -> None:
    """A URL urlsplit cannot read is replaced by a placeholder, never echoed."""
    assert mask_url("amqp://guest:s3cret@[::1/") == "<unparseable url>"


@pytest.mark.parametrize(
    ("text", "url", "expected"),
    [
        (
            "cannot connect to amqp://app:s3cret@mq:5672/: refused",
            "amqp://app:s3cret@mq:5672/",
            "cannot connect to amqp://app:***@mq:5672/: refused",
        ),
        (
            "ACCESS_REFUSED - login was refused using password s3cret for user app",
            "amqp://app:s3cret@mq:5672/",
            "ACCESS_REFUSED - login was refused using password *** for user app",
        ),
        (
            "s3cret s3cret",
            "amqp://app:s3cret@mq/",
            "*** ***",
        ),
        (
            "url amqp://app:p%40ss@mq/ and p%40ss",
            "amqp://app:p%40ss@mq/",
            "url amqp://app:***@mq/ and ***",
        ),
        (
            "connection reset by peer",
            "amqp://app:s3cret@mq/",
            "connection reset by peer",
        ),
        (
            "guest connected to localhost",
            "amqp://guest@localhost/",
            "guest connected to localhost",
        ),
        ("anything at all", "", "anything at all"),
        (
            "cannot connect to amqp://guest:***@mq:5672/: refused guest",
            "amqp://guest:guest@mq:5672/",
            "cannot connect to amqp://guest:***@mq:5672/: refused ***",
        ),
        (
            "amqp://guest:guest@mq/ said guest",
            "amqp://guest:guest@mq/",
            "amqp://guest:***@mq/ said ***",
        ),
    ],
    ids=[
        "url-in-text",
        "bare-password",
        "repeated",
        "percent-encoded",
        "nothing-to-hide",
        "no-password-in-url",
        "empty-url",
        "user-equals-password-masked-url",
        "user-equals-password-raw-url",
    ],
)
def test_scrub_removes_the_password_from_text(text: str, url: str, expected: str) -> None:
    """scrub masks the URL and every occurrence of its password in arbitrary text."""
    assert scrub(text, url) == expected
