"""The console's guard and forms: who may ask, which POSTs are its own, what a form selects."""

from __future__ import annotations

import pytest

from rabbitq._console import forms, guard
from rabbitq._errors import UsageError
from rabbitq._parking import Filter


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("console.example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert guard.is_loopback(host) is loopback


def test_beyond_loopback_a_token_is_required() -> None:
    guard.check_binding("127.0.0.1", None)
    guard.check_binding("0.0.0.0", "t")
    with pytest.raises(UsageError, match="--token"):
        guard.check_binding("0.0.0.0", None)
    with pytest.raises(UsageError):
        guard.check_binding("0.0.0.0", "")


@pytest.mark.parametrize(
    ("authorization", "cookie", "presented"),
    [
        ("Bearer abc", None, "abc"),
        ("bearer  abc ", "zzz", "abc"),
        (None, "zzz", "zzz"),
        ("Basic Zm9vOmJhcg==", "zzz", "zzz"),
        (None, None, None),
    ],
)
def test_the_token_comes_from_the_header_or_the_cookie(
    authorization: str | None, cookie: str | None, presented: str | None
) -> None:
    assert guard.presented_token(authorization, cookie) == presented


@pytest.mark.parametrize(
    ("expected", "presented", "ok"),
    [
        (None, None, True),  # no token configured: loopback, open
        ("s3cret", "s3cret", True),
        ("s3cret", "s3cre", False),
        ("s3cret", None, False),
        ("s3cret", "\udcff", False),  # undecodable input is refused, not an error
    ],
)
def test_token_check(expected: str | None, presented: str | None, ok: bool) -> None:
    assert guard.token_ok(expected, presented) is ok


def test_csrf_token_is_the_consoles_own() -> None:
    secret, other = b"a" * 32, b"b" * 32
    assert guard.csrf_ok(secret, guard.csrf_token(secret))
    assert not guard.csrf_ok(secret, guard.csrf_token(other))
    assert not guard.csrf_ok(secret, None)
    assert not guard.csrf_ok(secret, "")


@pytest.mark.parametrize(
    ("origin", "host", "ok"),
    [
        (None, "localhost:8800", True),  # no Origin sent: the CSRF token decides
        ("http://localhost:8800", "localhost:8800", True),
        ("http://evil.example", "localhost:8800", False),
        ("http://localhost:8801", "localhost:8800", False),
        ("null", "localhost:8800", False),  # sandboxed frames, data: URLs
        ("http://localhost:8800", None, False),
    ],
)
def test_same_origin(origin: str | None, host: str | None, ok: bool) -> None:
    assert guard.same_origin(origin, host) is ok


@pytest.mark.parametrize(
    ("params", "ids", "expected"),
    [
        ({}, (), Filter()),
        ({"task": " jobs.send ", "reason": ""}, (), Filter(task="jobs.send")),
        ({"error": "KeyError", "group": "abc"}, (), Filter(error_type="KeyError", group="abc")),
        ({"since": "1h"}, (), Filter(parked_within=3600.0)),
        ({}, ("a", "", "b"), Filter(ids=frozenset({"a", "b"}))),
    ],
)
def test_selection_from_a_form(
    params: dict[str, str], ids: tuple[str, ...], expected: Filter
) -> None:
    assert forms.selection(params, ids) == expected


def test_a_bad_since_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="since"):
        forms.selection({"since": "soon"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [("replay-selected", ("replay", "selected")), ("purge-matching", ("purge", "matching"))],
)
def test_requested_action(value: str, expected: tuple[str, str]) -> None:
    assert forms.requested(value) == expected


@pytest.mark.parametrize("value", [None, "", "replay", "delete-matching", "purge-everything"])
def test_an_unknown_action_is_refused(value: str | None) -> None:
    with pytest.raises(UsageError):
        forms.requested(value)


@pytest.mark.parametrize(
    ("n", "number", "expected"),
    [
        (0, None, ([], 1, 1)),
        (120, None, (list(range(50)), 1, 3)),
        (120, "3", (list(range(100, 120)), 3, 3)),
        (120, "9", (list(range(100, 120)), 3, 3)),  # past the end: the last page
        (120, "-1", (list(range(50)), 1, 3)),
        (120, "x", (list(range(50)), 1, 3)),
    ],
)
def test_paging(n: int, number: str | None, expected: tuple[list[int], int, int]) -> None:
    got = forms.page(list(range(n)), number)
    assert (got.items, got.number, got.pages) == expected
    assert got.total == n
    assert got.has_previous is (got.number > 1) and got.has_next is (got.number < got.pages)


def test_filter_query_keeps_the_filter_and_applies_changes() -> None:
    params = {"task": "a b", "reason": "", "page": "2", "other": "x"}
    assert forms.filter_query(params, page=3) == "task=a+b&page=3"
    assert forms.filter_query(params, group="f00", page="") == "task=a+b&group=f00"
