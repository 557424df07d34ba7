"""The private network of a test cluster: one network namespace per node, and links to cut.

For a run with id `ab12` on the subnet 10.213.N.0/24 (N chosen so that nothing else uses it):

    root namespace (this process and its subprocesses: the client, 10.213.N.254)
    ├── bridge rqcab12br (no address): the nodes' own network
    │   ├── veth rqcab12v1 ── namespace rqcab12n1: eth0 10.213.N.1/24  (node 0; lo, own epmd)
    │   ├── veth rqcab12v2 ── namespace rqcab12n2: eth0 10.213.N.2/24  (node 1)
    │   └── veth rqcab12v3 ── namespace rqcab12n3: eth0 10.213.N.3/24  (node 2)
    └── veth rqcab12c1 ── rqcab12n1: eth1, a point-to-point link from the client to node 0
        (and c2, c3: a route 10.213.N.i/32 via ci here, 10.213.N.254/32 via eth1 there)

So node-to-node traffic (Erlang distribution, Raft) crosses only the bridge, and the client's
(AMQP, management, Prometheus, the dist port) only its own link to the node.

Each cut is one link set down, a silent drop on the wire as a dead switch port would be, so each
side notices only by its timeouts (net_ticktime, AMQP heartbeats); each heal is one link set up,
so a node gets all its peers back at the same instant, never a partial view for a moment.
Neither iptables nor tc filters are needed (this kernel has no tc classifiers or netem).

Nothing here touches an interface, route or namespace it did not create: the host's network and
the default broker on 127.0.0.1 stay as they are. A run writes its owner (pid and start time)
under /tmp/rqcluster-<id>/; `clean_stale` removes what a crashed run left behind and leaves a
live run (another session's) alone.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PREFIX = "rqc"
SUBNET = "10.213"  # 10.213.N.0/24 per run
_NAME = re.compile(rf"^{PREFIX}([0-9a-f]{{4}})(?:br|n\d+|[vcpq]\d+)$")
# Every run on a host must share this: stale cleanup judges a name by the directory here.
BASE = Path("/tmp")
_LOCK = BASE / "rqcluster.lock"


class NetworkError(RuntimeError):
    """An `ip` command failed."""


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run `ip ARGS` (in `netns` if given); its stdout."""
    command = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise NetworkError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout


def run_dir(run_id: str) -> Path:
    return BASE / f"rqcluster-{run_id}"


class Network:
    """The bridge, namespaces and links of one run; node indexes start at 0."""

    def __init__(self, run_id: str, octet: int, size: int) -> None:
        self.run_id = run_id
        self.octet = octet
        self.size = size
        self.bridge = f"{PREFIX}{run_id}br"
        self._peers_cut: set[int] = set()
        self._client_cut: set[int] = set()

    @property
    def client_address(self) -> str:
        return f"{SUBNET}.{self.octet}.254"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{self.octet}.{i + 1}"

    def namespace(self, i: int) -> str:
        return f"{PREFIX}{self.run_id}n{i + 1}"

    def peer_link(self, i: int) -> str:
        """The root end of node i's veth on the bridge: its link to the other nodes."""
        return f"{PREFIX}{self.run_id}v{i + 1}"

    def client_link(self, i: int) -> str:
        """The root end of node i's point-to-point veth: this process's link to it."""
        return f"{PREFIX}{self.run_id}c{i + 1}"

    def create(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("link", "set", self.bridge, "up")
        client = self.client_address
        for i in range(self.size):
            ns, address = self.namespace(i), self.address(i)
            ip("netns", "add", ns)
            ip("link", "set", "lo", "up", netns=ns)  # epmd and the CLI talk over it
            peers, client_link = self.peer_link(i), self.client_link(i)
            self._veth(peers, f"{PREFIX}{self.run_id}p{i + 1}", ns, "eth0")
            ip("addr", "add", f"{address}/24", "dev", "eth0", netns=ns)
            ip("link", "set", "eth0", "up", netns=ns)
            ip("link", "set", peers, "master", self.bridge, "up")
            self._veth(client_link, f"{PREFIX}{self.run_id}q{i + 1}", ns, "eth1")
            ip("link", "set", "eth1", "up", netns=ns)
            ip("route", "add", f"{client}/32", "dev", "eth1", netns=ns)
            ip("addr", "add", f"{client}/32", "dev", client_link)
            ip("link", "set", client_link, "up")
            ip("route", "add", f"{address}/32", "dev", client_link, "src", client)

    def _veth(self, root_end: str, temporary: str, netns: str, name: str) -> None:
        ip("link", "add", root_end, "type", "veth", "peer", "name", temporary)
        ip("link", "set", temporary, "netns", netns)
        ip("link", "set", temporary, "name", name, netns=netns)

    def destroy(self) -> None:
        """End what still runs in the namespaces, delete them, the veths and the bridge."""
        destroy(self.run_id)

    # Cuts: one link each, so a cut and a heal are atomic --------------------------------------
    #
    # A link is set down at the end whose routes do not matter: setting a device down flushes
    # its routes, while its peer only loses carrier and keeps them (packets are then dropped
    # at the veth). The client's route to node i is in this namespace, so the client link goes
    # down at the node's end (eth1), whose one route is put back on the way up.

    def cut_peers(self, i: int) -> None:
        """Drop everything between node i and the other nodes (its bridge port goes down)."""
        ip("link", "set", self.peer_link(i), "down")
        self._peers_cut.add(i)

    def restore_peers(self, i: int) -> None:
        ip("link", "set", self.peer_link(i), "up")
        self._peers_cut.discard(i)

    def cut_client(self, i: int) -> None:
        """Drop everything between this process and node i (the node's end of its link)."""
        ip("link", "set", "eth1", "down", netns=self.namespace(i))
        self._client_cut.add(i)

    def restore_client(self, i: int) -> None:
        ns = self.namespace(i)
        ip("link", "set", "eth1", "up", netns=ns)
        ip("route", "replace", f"{self.client_address}/32", "dev", "eth1", netns=ns)
        self._client_cut.discard(i)

    def peers_cut(self, i: int) -> bool:
        return i in self._peers_cut

    def client_cut(self, i: int) -> bool:
        return i in self._client_cut


# Allocation and cleanup -------------------------------------------------------------------------


@contextmanager
def host_lock() -> Iterator[None]:
    """Serialise allocation and stale cleanup between runs on this host (other sessions too)."""
    with _LOCK.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def owner_stamp() -> str:
    return f"{os.getpid()} {_start_time(os.getpid())}"


def _owner_alive(directory: Path) -> bool:
    try:
        pid, started = (directory / "owner").read_text().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid)) == started


def _used_octets() -> set[int]:
    pattern = re.compile(rf"\b{re.escape(SUBNET)}\.(\d+)\.\d+")
    text = ip("-4", "addr", "show") + ip("-4", "route", "show", "table", "all")
    return {int(octet) for octet in pattern.findall(text)}


def allocate() -> tuple[str, int]:
    """A fresh run id and a 10.213.N.0/24 no interface or route here uses; call under the lock."""
    used = _used_octets()
    free = [n for n in range(1, 250) if n not in used]
    if not free:
        raise NetworkError(f"every {SUBNET}.N.0/24 is in use")
    while True:
        run_id = secrets.token_hex(2)
        if not run_dir(run_id).exists() and not any(
            _NAME.match(name) and name[len(PREFIX) : len(PREFIX) + 4] == run_id
            for name in _our_names()
        ):
            return run_id, random.choice(free)


def _netns_names() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _link_names() -> list[str]:
    names = []
    for line in ip("-o", "link", "show").splitlines():
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        names.append(name)
    return names


def _our_names() -> list[str]:
    return [n for n in _netns_names() + _link_names() if _NAME.match(n)]


def _pids_in(namespaces: list[str]) -> list[int]:
    return [int(p) for ns in namespaces for p in ip("netns", "pids", ns, check=False).split()]


def kill_namespace_processes(namespaces: list[str], grace_seconds: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, every process in our namespaces (nodes, epmd, CLIs)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_in(namespaces)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and _pids_in(namespaces):
            time.sleep(0.1)


def destroy(run_id: str, *, remove_dir: bool = False) -> None:
    """Remove everything of run `run_id`: processes in its namespaces, namespaces, links, dir."""
    ours = [n for n in _our_names() if n[len(PREFIX) : len(PREFIX) + 4] == run_id]
    namespaces = [n for n in _netns_names() if n in ours]
    kill_namespace_processes(namespaces)
    for netns in namespaces:
        ip("netns", "del", netns, check=False)
    links = [n for n in _link_names() if n in ours]
    # veths first (deleting one end deletes its peer), then the bridge
    for name in sorted(links, key=lambda n: n.endswith("br")):
        ip("link", "del", name, check=False)
    # A deleted namespace's devices go away asynchronously
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(n in ours for n in _link_names()):
        time.sleep(0.1)
    if remove_dir:
        shutil.rmtree(run_dir(run_id), ignore_errors=True)


def clean_stale() -> list[str]:
    """Remove the runs whose owner is gone (crashed, killed); the ids removed. Under the lock."""
    ids = {n[len(PREFIX) : len(PREFIX) + 4] for n in _our_names()}
    ids |= {
        p.name.removeprefix("rqcluster-")
        for p in BASE.glob("rqcluster-*")
        if p.is_dir() and re.fullmatch(r"rqcluster-[0-9a-f]{4}", p.name)
    }
    stale = sorted(i for i in ids if not _owner_alive(run_dir(i)))
    for run_id in stale:
        destroy(run_id, remove_dir=True)
    return stale
