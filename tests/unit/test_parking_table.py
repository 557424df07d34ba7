"""The parking lot's pure decisions: fingerprints, filters and groups, as tables."""

from __future__ import annotations

from typing import Any

import pytest

from rabbitq._cli_parking import _report
from rabbitq._parking import (
    Filter,
    Parked,
    broker_death,
    fingerprint,
    frames,
    groups,
    reason_of,
)


def tb(*sites: tuple[str, int, str]) -> str:
    lines = ["Traceback (most recent call last):"]
    lines += [f'  File "{path}", line {line}, in {func}\n    code()' for path, line, func in sites]
    return "\n".join(lines) + "\nValueError: something\n"


def task(n: int, **kw: object) -> Parked:
    facts: dict[str, object] = {
        "message_id": f"m{n}",
        "task": "jobs.send",
        "reason": "retries_exhausted",
        "error_type": "ValueError",
        "error": f"bad {n}",
        "traceback": tb(("/srv/app/jobs.py", 10, "send")),
        "attempts": 3,
        "first_failure": 100.0,
        "last_failure": 200.0,
        "parked_at": 1000.0 + n,
        "headers": {},
        "body": b"{}",
    }
    return Parked(**(facts | kw))  # type: ignore[arg-type]


def test_frames_drop_line_numbers_and_directories() -> None:
    text = tb(("/srv/app/jobs.py", 10, "send"), ("/usr/lib/x/check.py", 99, "validate"))
    assert frames(text) == ["jobs.py:send", "check.py:validate"]


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        # the same site, another line (an edit above it), another host's install path
        (tb(("/srv/a/jobs.py", 10, "send")), tb(("/opt/b/jobs.py", 14, "send")), True),
        # two call sites of the same error type
        (tb(("/srv/a/jobs.py", 10, "send")), tb(("/srv/a/jobs.py", 10, "resend")), False),
        (tb(("/srv/a/jobs.py", 10, "send")), "", False),
    ],
)
def test_fingerprints(a: str, b: str, same: bool) -> None:
    assert (fingerprint("t", "ValueError", a) == fingerprint("t", "ValueError", b)) is same


@pytest.mark.parametrize(
    ("chosen", "selected"),
    [
        (Filter(), {0, 1, 2}),
        (Filter(task="jobs.other"), {2}),
        (Filter(reason="poison"), {1}),
        (Filter(error_type="KeyError"), {2}),
        (Filter(parked_within=1.5), {1, 2}),  # now = 1002.5: parked at 1000, 1001, 1002
        (Filter(ids=frozenset({"m0", "m2"})), {0, 2}),
        (Filter(task="jobs.send", reason="poison"), {1}),
    ],
)
def test_filters(chosen: Filter, selected: set[int]) -> None:
    tasks = [
        task(0),
        task(1, reason="poison"),
        task(2, task="jobs.other", error_type="KeyError"),
    ]
    assert {n for n, t in enumerate(tasks) if chosen.matches(t, now=1002.5)} == selected


def test_one_bug_is_one_group_and_a_group_is_a_filter() -> None:
    tasks = [task(n) for n in range(5)] + [task(9, traceback=tb(("/srv/app/jobs.py", 3, "load")))]
    [big, small] = groups(tasks)
    assert (big.count, big.where, big.first_seen, big.last_seen) == (5, "jobs.py:send", 1000, 1004)
    assert (small.count, small.where) == (1, "jobs.py:load")
    assert [t.message_id for t in tasks if Filter(group=small.fingerprint).matches(t, 0)] == ["m9"]


def test_what_a_message_carries_reaches_the_terminal_escaped() -> None:
    from rabbitq._cli_parking import _safe

    assert _safe("\x1b[2Jgone\x07") == "\\x1b[2Jgone\\x07"
    assert _safe("line one\nline two", keep_newlines=True) == "line one\nline two"
    assert _safe("line one\nline two") == "line one\\nline two"


def test_a_replayed_copy_has_a_fresh_budget_and_a_bounded_history() -> None:
    from rabbitq import _wire as wire
    from rabbitq._parking import HEADER_HISTORY, MAX_HISTORY, replay_copy
    from rabbitq._topology import parse_topology

    workload = parse_topology({"t.toml": 'namespace = "ns"\n[workloads.jobs]\n'}).workload("jobs")
    old = [{"reason": "poison", "n": n} for n in range(MAX_HISTORY + 2)]
    headers = {
        wire.HEADER_ATTEMPT: 3,
        wire.HEADER_PARK_REASON: "retries_exhausted",
        wire.HEADER_PARK_TRACEBACK: "...",
        wire.HEADER_FIRST_FAILURE: 1,
        wire.HEADER_DEADLINE: 5_000_000,
        "x-death": [{"count": 1}],
        "tenant": "acme",
        HEADER_HISTORY: old,
    }
    copy = replay_copy(task(1, headers=headers, parked_at=2000.0), workload, now=3000.0)
    assert (copy.exchange, copy.routing_key, copy.message_id) == ("ns.tasks", "jobs", "m1")
    assert copy.headers[wire.HEADER_ATTEMPT] == 1
    assert copy.headers[wire.HEADER_PUBLISHED_AT] == 3_000_000
    assert copy.headers["tenant"] == "acme" and copy.headers[wire.HEADER_DEADLINE] == 5_000_000
    assert not any(k.startswith(("rabbitq-park", "x-")) for k in copy.headers)
    assert wire.HEADER_FIRST_FAILURE not in copy.headers
    history = copy.headers[HEADER_HISTORY]
    assert len(history) == MAX_HISTORY and history[:-1] == old[-(MAX_HISTORY - 1) :]
    assert history[-1]["reason"] == "retries_exhausted" and history[-1]["parked_at"] == 2_000_000


def _death(reason: str, **more: object) -> dict[str, object]:
    return {"queue": "shop.emails.work", "reason": reason, "count": 1, **more}


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # parked by rabbitq: its own header says why, whatever else is there
        ({"rabbitq-park-reason": "invalid_payload"}, None),
        ({"rabbitq-park-reason": "too_large", "x-death": [_death("expired")]}, None),
        # dead-lettered by the broker out of the work queue
        (
            {"x-death": [_death("expired", **{"original-expiration": "60000"})]},
            ("expired", "its expiration of 60000 ms ran out in shop.emails.work before a "
             "consumer took it"),
        ),
        (
            {"x-death": [_death("expired")]},
            ("expired", "its expiration ran out in shop.emails.work before a consumer took it"),
        ),
        (
            {"x-death": [_death("delivery_limit"), _death("expired")]},
            ("crash_loop", "handed out by shop.emails.work up to its delivery limit"),
        ),
        # bytes, as a header decoder may leave them
        ({"x-death": [{"queue": b"q", "reason": b"expired"}]},
         ("expired", "its expiration ran out in q before a consumer took it")),
        # nothing to go by
        ({}, None),
        ({"x-death": []}, None),
        ({"x-death": "expired"}, None),
        ({"x-death": ["expired"]}, None),
        ({"x-death": [_death("rejected")]}, None),
        ({"x-death": [_death("maxlen")]}, None),
    ],
)  # fmt: skip
def test_a_death_the_broker_caused_names_its_reason(
    headers: dict[str, Any], expected: tuple[str, str] | None
) -> None:
    assert broker_death(headers) == expected
    reason = expected[0] if expected else str(headers.get("rabbitq-park-reason", ""))
    assert reason_of(headers) == reason


@pytest.mark.parametrize(("count", "total"), [(0, "replayed 0 tasks"), (1, "replayed 1 task"),
                                              (2, "replayed 2 tasks")])  # fmt: skip
def test_a_replay_or_purge_ends_with_how_many_on_stderr(
    count: int, total: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = [
        Parked(f"m{n}", "jobs.send", "expired", "", "", "", 1, None, None, None, {}, b"")
        for n in range(count)
    ]
    _report("replayed", tasks, as_json=False)
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"replayed m{n}  jobs.send  expired" for n in range(count)]
    assert err == f"{total}\n"
