"""The harness cleans up after itself and after crashed runs, and leaves the default broker be."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager

from tests.cluster.conftest import (
    check_default_broker_untouched,
    default_broker_vm,
    skip_or_fail,
)
from tests.cluster.harness import Cluster
from tests.cluster.network import PREFIX, clean_stale, host_lock, ip, run_dir
from tests.cluster.node import AMQP_PORT, port_open, unavailable

Timed = Callable[[str], AbstractContextManager[list[str]]]


def _names_of(run_id: str) -> list[str]:
    namespaces = [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
    links = [line.split(":", 2)[1].strip().split("@")[0] for line in ip("-o", "link").splitlines()]
    return [n for n in namespaces + links if n.startswith(f"{PREFIX}{run_id}")]


def test_down_removes_its_node_and_network_and_spares_the_default_broker(timed: Timed) -> None:
    """After down(): no namespace, link or directory of the run; the default broker answers."""
    reason = unavailable()
    if reason:
        skip_or_fail(reason)
    default_vm = default_broker_vm()
    cluster = Cluster(1)
    with timed("a 1-node cluster up"):
        cluster.up()
    run_id, address = cluster.run_id, cluster.nodes[0].address
    try:
        assert port_open(address, AMQP_PORT)
        assert _names_of(run_id)
        assert run_dir(run_id).is_dir()
    finally:
        with timed("its down"):
            cluster.down()
    assert _names_of(run_id) == []
    assert not run_dir(run_id).exists()
    assert address not in ip("-4", "addr") + ip("-4", "route", "show", "table", "all")
    assert ".".join(address.split(".")[:3]) + "." not in ip("-4", "route")
    cluster.down()  # twice is harmless
    check_default_broker_untouched(default_vm)


def test_a_crashed_runs_leftovers_are_cleaned_and_live_runs_kept(cluster: Cluster) -> None:
    """clean_stale removes a dead owner's namespace, processes, bridge and dir, not a live run."""
    run_id = secrets.token_hex(2)
    while _names_of(run_id) or run_dir(run_id).exists():
        run_id = secrets.token_hex(2)
    netns, bridge = f"{PREFIX}{run_id}n1", f"{PREFIX}{run_id}br"
    ip("netns", "add", netns)
    ip("link", "add", bridge, "type", "bridge")
    run_dir(run_id).mkdir()
    (run_dir(run_id) / "owner").write_text("1 0")  # pid 1 did not start at tick 0: a dead owner
    leftover = subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "300"])
    try:
        with host_lock():
            removed = clean_stale()
        assert run_id in removed
        assert cluster.run_id not in removed
        assert leftover.wait(timeout=10) != 0  # ended by the cleanup
        assert _names_of(run_id) == []
        assert not run_dir(run_id).exists()
        assert all(cluster.running_nodes(i) == [0, 1, 2] for i in range(3))
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
