"""`rabbitq status` without a broker: merging AMQP and management counts, ages, the rows, the
table, the JSON document and the redraw, as tables; and its usage errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rabbitq._cli import cli
from rabbitq._cli_status import (
    CLEAR_BELOW,
    CLEAR_LINE,
    CLEAR_SCREEN,
    HOME,
    UNKNOWN,
    format_age,
    redraw,
    rows,
    table,
    text,
)
from rabbitq._status import (
    QueueCounts,
    Rates,
    Status,
    WorkloadStatus,
    age_seconds,
    combine,
)
from rabbitq._topology import parse_topology

TOPOLOGY = """
[workloads.emails]
[workloads.emails.retry]
tiers = ["1s", "10s"]
max_attempts = 3

[workloads.bills]
queue_type = "quorum"
[workloads.bills.retry]
tiers = ["5s"]
max_attempts = 2
"""
TOPO = parse_topology({"t.toml": TOPOLOGY}, "shop")
EMAILS = TOPO.workload("emails")
COUNTS = {
    "shop.emails.work": QueueCounts(ready=12, consumers=2),
    "shop.emails.retry.1s": QueueCounts(3, 0),
    "shop.emails.retry.10s": QueueCounts(0, 0),
    "shop.emails.parking": QueueCounts(7, 0),
}


def counted(unacked: int = 4, **stats: Any) -> dict[str, Any]:
    """A queue as the management API lists it once it has counted it."""
    return {"messages_ready": 1, "messages_unacknowledged": unacked, "consumers": 2} | stats


def rated(publish: float = 0.0, deliver: float = 0.0, ack: float = 0.0) -> dict[str, Any]:
    return {
        "publish_details": {"rate": publish},
        "deliver_get_details": {"rate": deliver},
        "ack_details": {"rate": ack},
    }


@pytest.mark.parametrize(
    ("stats", "running", "rates"),
    [
        # no management API: unknown, never 0
        (None, None, None),
        (
            {
                "shop.emails.work": counted(4, message_stats=rated(10.5, 9.0, 8.25)),
                "shop.emails.parking": counted(0, message_stats={"publish_details": {"rate": 0.5}}),
            },
            4,
            Rates(10.5, 9.0, 8.25, 0.5),
        ),
        # counted, but never published to: the API leaves message_stats out
        ({"shop.emails.work": counted(0), "shop.emails.parking": counted(0)}, 0, Rates(0, 0, 0, 0)),
        # published to, never acked: that detail is left out
        (
            {
                "shop.emails.work": counted(3, message_stats={"publish_details": {"rate": 2.0}}),
                "shop.emails.parking": counted(0),
            },
            3,
            Rates(2.0, 0.0, 0.0, 0.0),
        ),
        # listed but not counted yet (a new queue), or not listed at all: unknown
        (
            {"shop.emails.work": {"name": "shop.emails.work"}},
            None,
            Rates(None, None, None, None),
        ),
        ({}, None, Rates(None, None, None, None)),
        # what is not a number is not a count
        (
            {"shop.emails.work": counted(True, message_stats=rated("fast"))},  # type: ignore[arg-type]
            None,
            Rates(None, 0.0, 0.0, None),
        ),
    ],
)
def test_combine_takes_ready_and_consumers_from_amqp_and_the_rest_from_the_api(
    stats: dict[str, Any] | None, running: int | None, rates: Rates | None
) -> None:
    """Ready, consumers and depths are AMQP's; running and rates the API's, None if unsaid."""
    status = combine(EMAILS, COUNTS, stats, 1000.0)
    assert status == WorkloadStatus(
        name="emails",
        work_queue="shop.emails.work",
        ready=12,
        running=running,
        consumers=2,
        tiers=(("1s", 3), ("10s", 0)),
        parked=7,
        oldest_parked_at=1000.0,
        rates=rates,
    )


@pytest.mark.parametrize(
    ("since", "now", "age"),
    [
        (None, 100.0, None),
        (100.0, 130.5, 30.5),
        (100.0, 99.0, 0.0),  # another host's clock a little ahead
        (100.0, 100.12345, 0.123),
    ],
)
def test_age_seconds(since: float | None, now: float, age: float | None) -> None:
    assert age_seconds(since, now) == age


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (59.9, "59s"),
        (60, "1m00s"),
        (125, "2m05s"),
        (3600, "1h00m"),
        (3 * 3600 + 10 * 60 + 59, "3h10m"),
        (86400 * 2 + 3600 * 4 + 1, "2d4h"),
    ],
)
def test_format_age(seconds: float, shown: str) -> None:
    assert format_age(seconds) == shown


def status_of(**kw: Any) -> Status:
    facts: dict[str, Any] = {
        "name": "emails",
        "work_queue": "shop.emails.work",
        "ready": 12,
        "running": 4,
        "consumers": 2,
        "tiers": (("1s", 3), ("10s", 0)),
        "parked": 7,
        "oldest_parked_at": 1000.0,
        "rates": Rates(10.25, 9.0, 8.0, 0.5),
    }
    return Status("shop", (WorkloadStatus(**(facts | kw)),), management=True)


R = ("", "", "", "", "", "")  # a tier row's blank cells


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (
            status_of(),
            [
                ("emails", "work", "12", "4", "2", "", "10.2", "9.0", "8.0"),
                ("emails", "retry 1s", "3", *R),
                ("emails", "retry 10s", "0", *R),
                ("emails", "parking", "7", "", "", "2m05s", "0.5", "", ""),
            ],
        ),
        # without the management API: running and rates unknown, the rest still there
        (
            status_of(running=None, rates=None),
            [
                ("emails", "work", "12", "?", "2", "", "?", "?", "?"),
                ("emails", "retry 1s", "3", *R),
                ("emails", "retry 10s", "0", *R),
                ("emails", "parking", "7", "", "", "2m05s", "?", "", ""),
            ],
        ),
        # nothing parked: no age to show; parked but unread (taken by a browse): unknown
        (
            status_of(parked=0, oldest_parked_at=None, tiers=()),
            [
                ("emails", "work", "12", "4", "2", "", "10.2", "9.0", "8.0"),
                ("emails", "parking", "0", "", "", "", "0.5", "", ""),
            ],
        ),
        (
            status_of(oldest_parked_at=None, tiers=(), rates=Rates(None, 1.0, None, None)),
            [
                ("emails", "work", "12", "4", "2", "", "?", "1.0", "?"),
                ("emails", "parking", "7", "", "", UNKNOWN, "?", "", ""),
            ],
        ),
    ],
)
def test_rows_one_per_queue(status: Status, expected: list[tuple[str, ...]]) -> None:
    """Work queue, each tier, parking lot; blank where it does not apply, ? where unsaid."""
    assert rows(status, now=1125.0) == expected


def test_table_aligns_names_left_and_numbers_right() -> None:
    lines = table([("emails", "work", "12"), ("b", "retry 10s", "3")], header=("W", "Q", "READY"))
    assert lines == [
        "W       Q          READY",
        "emails  work          12",
        "b       retry 10s      3",
    ]


def test_text_has_the_title_the_table_and_the_notes() -> None:
    status = Status("shop", status_of().workloads, management=False, notes=("a", "b"))
    lines = text(status, now=1125.0, title="12:00:00 UTC")
    assert lines[0] == "namespace shop  12:00:00 UTC"
    assert lines[1].split() == [
        "WORKLOAD",
        "QUEUE",
        "READY",
        "RUNNING",
        "CONSUMERS",
        "OLDEST",
        "PUBLISHED/s",
        "DELIVERED/s",
        "ACKED/s",
    ]
    assert lines[-2:] == ["note: a", "note: b"]
    assert len(lines) == 1 + 1 + 4 + 2


@pytest.mark.parametrize(
    ("delayed", "line"),
    [
        (0, "delayed: 0 tasks wait in the delay ladder (every workload)"),
        (1, "delayed: 1 task waits in the delay ladder (every workload)"),
        (4, "delayed: 4 tasks wait in the delay ladder (every workload)"),
    ],
)
def test_text_says_how_many_tasks_wait_in_the_ladder(delayed: int, line: str) -> None:
    status = Status("shop", status_of().workloads, management=False, delayed=delayed)
    assert text(status, now=1125.0)[-1] == line


def test_the_json_document_has_stable_keys() -> None:
    """One document: namespace, management, note, workloads by name with tiers by label."""
    status = Status("shop", status_of().workloads, management=True, notes=("x", "y"))
    assert status.document(now=1125.0) == {
        "namespace": "shop",
        "management": True,
        "note": "x; y",
        "delayed": None,
        "workloads": {
            "emails": {
                "work_queue": "shop.emails.work",
                "ready": 12,
                "running": 4,
                "consumers": 2,
                "tiers": {"1s": 3, "10s": 0},
                "parked": 7,
                "oldest_parked_at": 1000.0,
                "oldest_parked_age_seconds": 125.0,
                "rates": {
                    "published_per_second": 10.25,
                    "delivered_per_second": 9.0,
                    "acked_per_second": 8.0,
                    "parked_per_second": 0.5,
                },
            }
        },
    }
    unknown = status_of(running=None, rates=None, oldest_parked_at=None)
    facts = unknown.document(now=1125.0)
    assert facts["note"] is None
    emails = facts["workloads"]["emails"]
    assert emails["running"] is None and emails["rates"] is None
    assert emails["oldest_parked_age_seconds"] is None


@pytest.mark.parametrize("first", [True, False])
def test_redraw_overwrites_the_last_frame_in_place(first: bool) -> None:
    frame = redraw(["one", "two"], first)
    start = CLEAR_SCREEN + HOME if first else HOME
    assert frame == f"{start}one{CLEAR_LINE}\ntwo{CLEAR_LINE}\n{CLEAR_BELOW}"


@pytest.fixture
def topology_dir(tmp_path: Path) -> Path:
    (tmp_path / "shop.toml").write_text(TOPOLOGY, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["nope"], "no such workload (declared: bills, emails)"),
        (["--management-url", "ftp://x"], "--management-url must look like"),
    ],
)
def test_usage_errors_exit_2_before_connecting(
    topology_dir: Path, args: list[str], error: str
) -> None:
    """An unknown WORKLOAD or a malformed --management-url: one line, exit 2, no broker."""
    env = {"RABBITQ_URL": "amqp://guest:secret@127.0.0.1:1/", "RABBITQ_MANAGEMENT_URL": None}
    result = CliRunner(env=env).invoke(cli, ["status", *args, "--topology", str(topology_dir)])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and error in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "secret" not in result.stderr
