"""A RabbitMQ cluster of real nodes on this machine, each in its own network namespace.

`Cluster(3)` starts three nodes from the Debian package at once, joins the others to node 0
(`pause_minority`, `net_ticktime` 10 s) and waits until every node sees all of them running.
Each node lives in a namespace of `tests/cluster/network.py`, on a private bridge this process
is on, so the test reaches each node's AMQP (5672), management (15672), Prometheus (15692) and
distribution (25672) ports at the node's own address, and can cut and heal links.

What it must not do: touch the default broker (`rabbit@<host>` on 127.0.0.1:5672) or end any
process outside its own namespaces. Every CLI call names its node (`-n`) and runs inside that
node's namespace (`tests/cluster/node.py` has how a node is configured and run).

Node indexes start at 0, as in `urls`. The methods block (each CLI call costs ~0.5 s); from
async code, run the slow ones (`stop`, `start`, `heal`, waits) with `asyncio.to_thread` when
the event loop has other work to do meanwhile.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

from tests.cluster.network import (
    Network,
    allocate,
    clean_stale,
    host_lock,
    kill_namespace_processes,
    owner_stamp,
    run_dir,
)
from tests.cluster.node import (
    AMQP_PORT,
    MANAGEMENT_PORT,
    PROMETHEUS_PORT,
    USER,
    ClusterError,
    Node,
    port_open,
    wait_for,
)

T = TypeVar("T")


def _parallel(function: Callable[[int], T], indexes: Iterable[int]) -> list[T]:
    items = list(indexes)
    if len(items) <= 1:
        return [function(i) for i in items]
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(function, items))


@dataclass(frozen=True, slots=True)
class Replicas:
    """A quorum queue's replicas by node index, as the queried node sees them."""

    leader: int | None
    members: tuple[int, ...]
    online: tuple[int, ...]


class Cluster:
    """`size` RabbitMQ nodes in their own namespaces; `with Cluster() as c:` or `up()`/`down()`.

    Args:
        size: how many nodes (3 tolerates the loss of one).
        net_ticktime_seconds: Erlang's failure detection between nodes (RabbitMQ's default 60).
        boot_timeout_seconds: how long a node may take to start (10-20 s on 2 cores).
    """

    def __init__(
        self,
        size: int = 3,
        *,
        net_ticktime_seconds: int = 10,
        boot_timeout_seconds: float = 180.0,
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one node, not {size}")
        self.size = size
        self.net_ticktime_seconds = net_ticktime_seconds
        self.boot_timeout_seconds = boot_timeout_seconds
        self.password = secrets.token_urlsafe(18)
        self.timings: dict[str, float] = {}  # up's and down's steps, in seconds
        self.stale_removed: list[str] = []  # ids of crashed runs that up() cleaned first
        self._network: Network | None = None
        self._nodes: list[Node] = []
        self._index: dict[str, int] = {}
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: dict[int, IO[bytes]] = {}
        self._stopped: set[int] = set()
        self._isolated: set[int] = set()  # cut off from the other nodes
        self._cut_log_marks: dict[int, int] = {}  # node -> its log's size when it was cut off

    # What a test connects to ------------------------------------------------------------------

    @property
    def nodes(self) -> list[Node]:
        if not self._nodes:
            raise ClusterError("the cluster is not up")
        return list(self._nodes)

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.nodes]

    @property
    def urls(self) -> list[str]:
        """One AMQP URL per node, with the administrator's credentials, vhost `/`."""
        return [f"amqp://{USER}:{self.password}@{n.address}:{AMQP_PORT}/" for n in self.nodes]

    @property
    def management_urls(self) -> list[str]:
        """The management API of each node (log in as `USER` / `password`)."""
        return [f"http://{node.address}:{MANAGEMENT_PORT}" for node in self.nodes]

    @property
    def prometheus_urls(self) -> list[str]:
        return [f"http://{node.address}:{PROMETHEUS_PORT}/metrics" for node in self.nodes]

    @property
    def run_id(self) -> str:
        return self._net.run_id

    @property
    def directory(self) -> Path:
        return run_dir(self.run_id)

    @property
    def _net(self) -> Network:
        if self._network is None:
            raise ClusterError("the cluster is not up")
        return self._network

    # Life cycle -------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def up(self) -> None:
        """Create the network, start every node at once, join them to node 0, wait for all.

        On any failure, everything already created is removed before the error propagates.
        """
        if self._network is not None:
            raise ClusterError("the cluster is already up")
        start = time.monotonic()
        try:
            with host_lock():
                self.stale_removed = clean_stale()
                run_id, octet = allocate()
                run_dir(run_id).mkdir(mode=0o755)
                (run_dir(run_id) / "owner").write_text(owner_stamp())
                self._network = Network(run_id, octet, self.size)
                self._network.create()
            self._nodes = [self._node(i) for i in range(self.size)]
            for node in self._nodes:
                node.prepare(password=self.password, net_ticktime_seconds=self.net_ticktime_seconds)
            self._index = {node.name: node.index for node in self._nodes}
            lap = self._lap("network", start)
            for i in range(self.size):
                self._spawn(i)
            _parallel(self._await_boot, range(self.size))
            lap = self._lap("boot", lap)
            self._join()
            lap = self._lap("join", lap)
            everyone = list(range(self.size))
            self.wait_running(everyone, timeout=60)
            for i in everyone:
                self._await_ports(i)
            self.timings["up"] = time.monotonic() - start
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Stop this cluster's nodes and remove its namespaces, bridge and directory.

        Safe to call twice or after a failed `up`; never touches another run or the default
        broker.
        """
        if self._network is None:
            return
        start = time.monotonic()
        network, self._network = self._network, None
        try:
            # The server script turns SIGTERM into a clean stop of its node.
            running = [p for p in self._processes.values() if p.poll() is None]
            for process in running:
                process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            for process in running:
                try:
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass  # killed with the rest of its namespace below
        finally:
            try:
                network.destroy()
            finally:
                for log in self._logs.values():
                    log.close()
                shutil.rmtree(run_dir(network.run_id), ignore_errors=True)
                self._processes.clear()
                self._logs.clear()
                self._nodes = []
                self._stopped.clear()
                self._isolated.clear()
                self._cut_log_marks.clear()
                self.timings["down"] = time.monotonic() - start

    def _lap(self, step: str, since: float) -> float:
        """Record the seconds `step` took since `since`; now, for the next step."""
        now = time.monotonic()
        self.timings[step] = now - since
        return now

    def _node(self, i: int) -> Node:
        network = self._net
        return Node(
            index=i,
            name=f"rabbit@{network.address(i)}",
            address=network.address(i),
            namespace=network.namespace(i),
            directory=run_dir(network.run_id) / f"n{i + 1}",
        )

    def _spawn(self, i: int) -> None:
        node = self._nodes[i]
        node.pid_file.unlink(missing_ok=True)
        if i not in self._logs:
            self._logs[i] = (node.directory / "server.out").open("ab")
        self._processes[i] = subprocess.Popen(
            node.server_command(),
            stdin=subprocess.DEVNULL,
            stdout=self._logs[i],
            stderr=subprocess.STDOUT,
            cwd=node.directory,
            start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not the nodes
        )

    def _await_boot(self, i: int) -> None:
        """Until node i's app has started (`rabbitmqctl wait` on its pid file)."""
        timeout = int(self.boot_timeout_seconds)
        pid_file = str(self._nodes[i].pid_file)
        args = ("wait", pid_file, "--timeout", str(timeout))
        done = self.cli(i, "rabbitmqctl", *args, timeout=timeout + 30, check=False)
        if done.returncode != 0:
            raise ClusterError(
                f"node {i} ({self._nodes[i].name}) did not start: {done.stderr.strip()}\n"
                f"{self._nodes[i].log_tail()}"
            )

    def _await_ports(self, i: int, timeout: float = 60) -> None:
        address = self._nodes[i].address
        for port in (AMQP_PORT, MANAGEMENT_PORT):
            wait_for(partial(port_open, address, port), timeout, f"node {i} to listen on {port}")

    def _join(self) -> None:
        """Join nodes 1.. to node 0: stop their apps together, join one by one, start together."""
        others = range(1, self.size)
        _parallel(lambda i: self.rabbitmqctl(i, "stop_app"), others)
        for i in others:
            self.rabbitmqctl(i, "join_cluster", self._nodes[0].name)
        timeout = self.boot_timeout_seconds
        _parallel(lambda i: self.rabbitmqctl(i, "start_app", timeout=timeout), others)
        _parallel(lambda i: self.rabbitmqctl(i, "await_startup", timeout=timeout), others)

    @contextmanager
    def _telling_log(self, i: int) -> Iterator[None]:
        """A ClusterError raised inside carries the end of node i's log."""
        try:
            yield
        except ClusterError as exc:
            raise ClusterError(f"{exc}\n{self._nodes[i].log_tail(60)}") from exc

    # CLI --------------------------------------------------------------------------------------

    def cli(
        self, i: int, tool: str, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a RabbitMQ CLI tool (`rabbitmqctl`, `rabbitmq-queues`, ...) against node i.

        It runs in node i's namespace, so it reaches the node whatever the cuts.
        """
        command = self._nodes[i].cli_command(tool, *args)
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(
                f"{tool} {' '.join(args)} on node {i}: no answer in {timeout}s"
            ) from exc
        if check and done.returncode != 0:
            raise ClusterError(
                f"{tool} {' '.join(args)} on node {i} failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()}"
            )
        return done

    def rabbitmqctl(self, i: int, *args: str, timeout: float = 60) -> str:
        """`rabbitmqctl -n <node i> ARGS`; its stdout. Raises ClusterError if it fails."""
        return self.cli(i, "rabbitmqctl", *args, timeout=timeout).stdout

    # Node state -------------------------------------------------------------------------------

    def running_nodes(self, seen_from: int = 0) -> list[int]:
        """The nodes `seen_from` sees running, by index; [] if its app is not running (paused).

        As Mnesia sees them: a node whose app is still starting counts (its listeners are the
        last thing to open; `heal` and `start` wait for those too).

        Reads the node's own view (`rabbit_nodes:all_running()`), which answers at once;
        `cluster_status` asks every node and blocks for up to ~30 s while a cut has not been
        noticed yet. Raises ClusterError if `seen_from` is stopped.
        """
        if seen_from in self._stopped:
            raise ClusterError(f"node {seen_from} is stopped; ask another node")
        out = self.rabbitmqctl(seen_from, "-q", "eval", "rabbit_nodes:all_running().")
        return sorted(self._index[name] for name in re.findall(r"'([^']+)'", out))

    def wait_running(
        self,
        expected: Iterable[int],
        *,
        seen_from: Iterable[int] | None = None,
        timeout: float = 60,
    ) -> float:
        """Until every node of `seen_from` (default: `expected`) sees exactly `expected` running.

        `wait_running([], seen_from=[2])` waits until node 2 has paused. Returns the seconds.
        """
        want = sorted(expected)
        viewers = sorted(want if seen_from is None else seen_from)
        return wait_for(
            lambda: all(self.running_nodes(j) == want for j in viewers),
            timeout,
            f"nodes {viewers} to see {want} running",
            interval=0.2,
        )

    def serving(self) -> list[int]:
        """The nodes that are started and not isolated: those a test should ask."""
        return [i for i in range(self.size) if i not in self._stopped and i not in self._isolated]

    def _via(self, via: int | None) -> int:
        if via is not None:
            return via
        serving = self.serving()
        if not serving:
            raise ClusterError("no node is started and connected to ask")
        return serving[0]

    def stop(self, i: int, timeout: float = 60) -> None:
        """Stop node i cleanly (`rabbitmqctl stop`) and wait until its VM has exited."""
        if i in self._stopped:
            return
        self.rabbitmqctl(i, "stop", timeout=timeout)
        try:
            self._processes[i].wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"node {i} did not exit within {timeout}s of stop") from exc
        self._stopped.add(i)

    def start(self, i: int, timeout: float = 120) -> None:
        """Start a stopped node i and wait until it has rejoined: every serving node sees it."""
        if i not in self._stopped:
            return
        if i in self._isolated:
            raise ClusterError(f"node {i} is isolated; heal it before starting it")
        self._spawn(i)
        self._stopped.discard(i)
        self._await_boot(i)
        with self._telling_log(i):
            self.wait_running(self.serving(), timeout=timeout)
            self._await_ports(i)

    # Network cuts -----------------------------------------------------------------------------

    def isolate(self, i: int, *, keep_client: bool = True) -> None:
        """Cut node i off from every other node; returns at once (the nodes notice later).

        Args:
            keep_client: True cuts only node-to-node traffic: this process (and its
                subprocesses) still reach node i, and see what a client on the minority side
                sees. False cuts this process's link to it too: its clients' packets vanish,
                and they notice only by their heartbeats.
        """
        network = self._net
        log = self._log(i)
        self._cut_log_marks.setdefault(i, log.stat().st_size if log.exists() else 0)
        network.cut_peers(i)
        if not keep_client:
            network.cut_client(i)
        self._isolated.add(i)

    def cut_client(self, i: int) -> None:
        """Cut only the link between this process and node i; the nodes stay together."""
        self._net.cut_client(i)

    def heal(self, i: int, *, wait: bool = True, timeout: float = 90) -> str:
        """Undo every cut of node i; with `wait`, until every serving node sees it running.

        Returns how node i came back: "rejoined", "restarted" (below), or "" without `wait`.

        RabbitMQ 3.10 on Erlang/OTP 25.2: when a paused node gets its peers back, it and they
        reconnect at once, and now and then (a third of the heals here) Erlang's `global` loses
        that race: the node's restart hangs in `global:sync` for good, its log says "Global
        hang workaround", and RabbitMQ's workaround does not free it. An operator restarts
        such a node; so does `heal`, once the log shows it, and says so.
        """
        network = self._net
        log = self._log(i)
        log_mark = self._cut_log_marks.get(i, log.stat().st_size if log.exists() else 0)
        if network.peers_cut(i):
            network.restore_peers(i)
        if network.client_cut(i):
            network.restore_client(i)
        self._isolated.discard(i)
        if not wait or i in self._stopped:
            return ""  # a later heal(i) still looks for a hang since the cut
        self._cut_log_marks.pop(i, None)
        deadline = time.monotonic() + timeout
        with self._telling_log(i):
            while not self._rejoined(i):
                with log.open("rb") as f:
                    f.seek(log_mark)
                    hung = b"Global hang workaround" in f.read()
                if hung:
                    self._restart(i, timeout=max(10.0, deadline - time.monotonic()))
                    return "restarted"
                if time.monotonic() > deadline:
                    raise ClusterError(f"node {i} did not rejoin within {timeout:.0f}s of heal")
                time.sleep(0.2)
        return "rejoined"

    def _log(self, i: int) -> Path:
        return self._nodes[i].directory / "log" / f"{self._nodes[i].name}.log"

    def _rejoined(self, i: int) -> bool:
        """Every serving node sees all serving nodes, and node i listens (its app has started:
        Mnesia counts a node as running before that, and the listeners open last)."""
        serving = self.serving()
        address = self._nodes[i].address
        try:
            seen = all(self.running_nodes(j) == serving for j in serving)
        except ClusterError:
            # a paused node restarting its Mnesia answers `eval` with an error for a moment
            # ("corrupt_or_missing_cluster_files", enoent): not rejoined yet; `heal`'s deadline
            # still ends a node that never answers
            return False
        return seen and all(port_open(address, port) for port in (AMQP_PORT, MANAGEMENT_PORT))

    def _restart(self, i: int, timeout: float) -> None:
        """End node i's VM (whatever state it is stuck in), start it, wait until it rejoined."""
        process = self._processes[i]
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            kill_namespace_processes([self._nodes[i].namespace])
            process.wait(timeout=10)
        self._stopped.add(i)
        self.start(i, timeout=timeout)

    def reachable(self, i: int) -> bool:
        """Whether the network lets this process reach node i (a paused node still refuses)."""
        return not self._net.client_cut(i)

    def restore(self, timeout: float = 120) -> None:
        """Heal every cut and start every stopped node; until all nodes run and listen."""
        network = self._net
        cut = [i for i in range(self.size) if i in self._isolated or network.client_cut(i)]
        for i in cut:
            self.heal(i, wait=False)
        for i in sorted(self._stopped):
            self.start(i, timeout=timeout)
        for i in cut:
            self.heal(i, timeout=timeout)  # waits for it (and restarts it if it hung)
        self.wait_running(range(self.size), timeout=timeout)

    # Queues -----------------------------------------------------------------------------------

    def _list_queues(self, via: int | None, *columns: str) -> list[dict[str, Any]]:
        args = ("-q", "list_queues", "-p", "/", *columns, "--formatter", "json")
        out = self.rabbitmqctl(self._via(via), *args)
        rows: list[dict[str, Any]] = json.loads(out) if out.strip() else []
        return rows

    def replicas(self, queue: str, *, via: int | None = None) -> Replicas | None:
        """A quorum queue's leader, members and online members (None if there is no such queue).

        Asks `via`, or the first serving node: `rabbitmqctl list_queues name leader members
        online`, which read the queue's record (the leader it names may lag an election).
        """
        for row in self._list_queues(via, "name", "leader", "members", "online"):
            if row["name"] == queue:
                leader = self._index.get(str(row.get("leader") or ""))
                return Replicas(
                    leader=leader,
                    members=tuple(sorted(self._index[n] for n in _names(row.get("members")))),
                    online=tuple(sorted(self._index[n] for n in _names(row.get("online")))),
                )
        return None

    def leader_of(self, queue: str, *, via: int | None = None) -> int | None:
        """The index of the node holding the quorum queue's leader, or None."""
        replicas = self.replicas(queue, via=via)
        return None if replicas is None else replicas.leader

    def delete_queues(self, prefix: str, *, via: int | None = None) -> list[str]:
        """Delete every queue of vhost `/` whose name starts with `prefix`; their names."""
        names = [row["name"] for row in self._list_queues(via, "name")]
        doomed = [name for name in names if name.startswith(prefix)]
        for name in doomed:
            self.rabbitmqctl(self._via(via), "delete_queue", name)
        return doomed


def _names(value: Any) -> Sequence[str]:
    """A node list from `list_queues --formatter json` (a JSON list, or '' when unknown)."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return []
