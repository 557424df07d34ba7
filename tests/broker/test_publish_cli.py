"""`rabbitq publish` against the real broker (issue #11, point 8): what the command prints is
what the work queue holds, and a file with one bad line sends nothing.

The tasks are those of `tests.broker.apps` (an App without a namespace, workload `proc`).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractConnection
from typer.testing import CliRunner, Result

from rabbitq import _ladder as ladder
from rabbitq._cli import cli
from rabbitq._wire import HEADER_DEADLINE
from tests.broker.apps import WORKLOAD
from tests.broker.test_declare import rabbitq_cli
from tests.helpers import drain_queue, queue_depth

APP = "tests.broker.apps:app"
SPEC = {"max_priority": 5, "capacity": 2, "retry": {"tiers": ["50ms"]}}


def payload(n: int) -> dict[str, Any]:
    return {"seconds": n / 1000, "marker": f"/nonexistent/{n}"}


async def invoke(*args: str | Path, stdin: str | None = None) -> Result:
    """`rabbitq ARGS` through typer's runner, in a thread: the command runs its own loop."""
    runner = CliRunner(env={"RABBITQ_APP": None, "RABBITQ_NAMESPACE": None})
    return await asyncio.to_thread(runner.invoke, cli, [str(a) for a in args], input=stdin)


async def test_a_json_payload_is_queued_with_its_task_name_priority_and_deadline(
    make_topology: Any, connection: AbstractConnection, url: str, namespace: str
) -> None:
    """`--json` sends one task; its printed id, `type`, priority and deadline header are queued."""
    topology = await make_topology(proc=SPEC)
    before = time.time()

    result = await invoke(
        "publish", "slow", "--json", json.dumps(payload(7)), "--priority", "3",
        "--deadline", "5m", "--app", APP, "--namespace", namespace, "--url", url,
    )  # fmt: skip

    after = time.time()
    assert result.exit_code == 0, result.output
    [message_id] = result.stdout.splitlines()
    [queued] = await drain_queue(connection, topology.workload(WORKLOAD).work_queue)
    assert queued.message_id == message_id
    assert queued.type == "slow"
    assert queued.priority == 3
    assert json.loads(queued.body) == payload(7)
    deadline_ms = queued.headers[HEADER_DEADLINE]
    assert isinstance(deadline_ms, int)
    assert int((before + 300) * 1000) <= deadline_ms <= int((after + 300) * 1000) + 1


async def test_an_idempotency_key_is_the_tasks_message_id_each_time_it_is_sent(
    make_topology: Any, connection: AbstractConnection, url: str, namespace: str
) -> None:
    """A script that sends again (it lost the first answer) sends the same task id twice."""
    topology = await make_topology(proc=SPEC)
    args = ["publish", "slow", "--json", json.dumps(payload(1)), "--idempotency-key", "order-42"]
    for _ in range(2):
        result = await invoke(*args, "--app", APP, "--namespace", namespace, "--url", url)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines() == ["order-42"]
    queued = await drain_queue(connection, topology.workload(WORKLOAD).work_queue)
    assert [m.message_id for m in queued] == ["order-42", "order-42"]


async def test_every_line_of_a_file_is_one_task_and_the_printed_ids_are_theirs(
    make_topology: Any, connection: AbstractConnection, url: str, namespace: str, tmp_path: Path
) -> None:
    """An ndjson file of N lines (blank ones skipped) queues N tasks, in order, with those ids."""
    topology = await make_topology(proc=SPEC)
    lines = [json.dumps(payload(n)) for n in range(25)]
    tasks = tmp_path / "tasks.ndjson"
    tasks.write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")

    result = await rabbitq_cli(
        url, "publish", "slow", "--file", tasks, "--app", APP, "--namespace", namespace
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    ids = result.stdout.splitlines()
    queued = await drain_queue(connection, topology.workload(WORKLOAD).work_queue)
    assert [m.message_id for m in queued] == ids
    assert len(set(ids)) == 25
    assert [json.loads(m.body) for m in queued] == [payload(n) for n in range(25)]
    assert {m.type for m in queued} == {"slow"}
    assert all(HEADER_DEADLINE not in m.headers for m in queued)


async def test_a_file_with_a_bad_third_line_sends_nothing(
    make_topology: Any, connection: AbstractConnection, url: str, namespace: str, tmp_path: Path
) -> None:
    """Line 3 does not validate: exit 2, the error names line 3, and the work queue stays empty."""
    topology = await make_topology(proc=SPEC)
    tasks = tmp_path / "tasks.ndjson"
    good = json.dumps(payload(1))
    tasks.write_text(f'{good}\n{good}\n{{"seconds": "soon", "marker": "m"}}\n{good}\n')

    result = await rabbitq_cli(
        url, "publish", "slow", "--file", tasks, "--app", APP, "--namespace", namespace
    )

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {tasks} line 3: Slow: seconds: Input should be a valid number, unable to parse "
        "string as a number; nothing was published"
    ]
    assert await queue_depth(connection, topology.workload(WORKLOAD).work_queue) == 0


async def test_an_unknown_task_is_a_clear_error_and_sends_nothing(
    make_topology: Any, connection: AbstractConnection, url: str, namespace: str
) -> None:
    """A task name the App does not register: exit 2, the error suggests the right one."""
    topology = await make_topology(proc=SPEC)

    result = await rabbitq_cli(
        url, "publish", "slwo", "--json", json.dumps(payload(1)), "--app", APP,
        "--namespace", namespace,
    )  # fmt: skip

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: task 'slwo' is not registered on --app '{APP}'; did you mean 'slow'?"
    ]
    assert await queue_depth(connection, topology.workload(WORKLOAD).work_queue) == 0


async def test_stdin_publishes_into_the_namespace_the_topology_declares(
    make_topology: Any, connection: AbstractConnection, url: str, namespace: str, tmp_path: Path
) -> None:
    """An App without a namespace and no --namespace: the topology's; `--file -` reads stdin."""
    topology = await make_topology(proc=SPEC)
    (tmp_path / "proc.toml").write_text(f'namespace = "{namespace}"\n[workloads.proc]\n')
    lines = "".join(json.dumps(payload(n)) + "\n" for n in range(3))

    result = await invoke(
        "publish", "slow_sync", "--file", "-", "--app", APP, "-t", tmp_path, "--url", url,
        stdin=lines,
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    queued = await drain_queue(connection, topology.workload(WORKLOAD).work_queue)
    assert [m.message_id for m in queued] == result.stdout.splitlines()
    assert [m.type for m in queued] == ["slow_sync"] * 3


async def test_a_namespace_without_its_topology_is_unroutable_and_says_what_to_do(
    connection: AbstractConnection, url: str, namespace: str
) -> None:
    """Valid tasks to a namespace nobody declared: exit 1, one error naming `topology apply`."""
    result = await rabbitq_cli(
        url, "publish", "slow", "--json", json.dumps(payload(1)), "--app", APP,
        "--namespace", namespace,
    )  # fmt: skip

    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("error: message ") and line.endswith(
        f"to exchange '{namespace}.tasks' with routing key '{WORKLOAD}' was returned unroutable; "
        "run 'rabbitq topology apply' or check the workload name"
    )


async def test_delay_sends_the_task_into_the_namespaces_delay_ladder(
    make_topology: Any, connection: AbstractConnection, url: str, namespace: str
) -> None:
    """`--delay 2h` queues the task in the ladder's level of 2 h's highest bit, not the work
    queue; the printed id is the one held there."""
    topology = await make_topology(delays=True, proc=SPEC)

    result = await invoke(
        "publish", "slow", "--json", json.dumps(payload(1)), "--delay", "2h",
        "--app", APP, "--namespace", namespace, "--url", url,
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    [message_id] = result.stdout.splitlines()
    assert await queue_depth(connection, topology.workload(WORKLOAD).work_queue) == 0
    top = ladder.path(7200)[0]
    [held] = await drain_queue(connection, ladder.level_name(namespace, top))
    assert held.message_id == message_id
    assert held.routing_key == f"{ladder.digits(7200)}.{WORKLOAD}"
