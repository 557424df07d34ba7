"""README.md, followed as a new user follows it on a fresh clone: every fenced block works.

The blocks run in the README's order, in a copy of the checkout (symlinks, but its own
`topology/`) where toml and python blocks are saved under the path their first line names, as
in one terminal: each sh block starts from the environment the one before left, so the quick
start's `. .venv/bin/activate` is what puts `rabbitq` on PATH. All of it runs in the test's
own namespace (RABBITQ_NAMESPACE, and the examples' `namespace="demo"` rewritten), deleted
after. A block whose fence this test does not know fails it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from rabbitq._topology import Topology, load_topology
from tests.background import free_port, process, stderr_of
from tests.broker.conftest import delete_namespace
from tests.helpers import queue_depth, wait_until
from tests.observability import ROOT

FENCE = re.compile(r"^```(\S*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
CAPTION = re.compile(r"# (\S+?)[:,]?(?:\s|$)")
EXAMPLE_URL = "amqp://guest:guest@localhost:5672/"
EXAMPLE_NAMESPACE = 'namespace="demo"'


def blocks() -> list[tuple[str, str]]:
    """Every fenced block of README.md: (info string, text)."""
    return FENCE.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def is_synopsis(text: str) -> bool:
    return text.startswith("rabbitq ")


def test_every_readme_block_is_of_a_kind_the_readme_test_runs():
    """Code is sh, toml or python; a text block is the topology diagram or the CLI synopsis."""
    kinds = [info for info, _ in blocks()]
    assert set(kinds) <= {"sh", "toml", "python", "text"}, kinds
    assert {"sh", "toml", "python"} <= set(kinds)
    assert any(info == "text" and is_synopsis(text) for info, text in blocks())


class Reader:
    """A new user's terminal in a fresh clone: one working directory, one environment."""

    def __init__(self, clone: Path, env: dict[str, str], connection: AbstractConnection) -> None:
        self.clone = clone
        self.env = env
        self.connection = connection  # to look at the queues

    async def sh(self, script: str) -> subprocess.CompletedProcess[str]:
        """Run `script` with bash -e and keep the environment it leaves."""
        env_file = self.clone / ".readme-env"
        result = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-ec", f"{script}\nenv -0 > {shlex.quote(str(env_file))}"],
            cwd=self.clone,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=40,
        )
        assert result.returncode == 0, f"{script!r} failed:\n{result.stdout}\n{result.stderr}"
        pairs = env_file.read_text().split("\0")
        self.env = dict(p.partition("=")[::2] for p in pairs if "=" in p)
        return result

    async def sh_block(self, text: str) -> None:
        """Each line as written, except `make test` (this suite itself: only checked to exist)
        and a consumer that runs until stopped (see `consume_until_stopped`)."""
        pending: list[str] = []
        for line in text.splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["make", "test"]:
                line = "make -n test >/dev/null"
            if words[:2] == ["rabbitq", "consume"] and "--burst" not in words:
                if pending:
                    await self.sh("\n".join(pending))
                    pending = []
                await self.consume_until_stopped(line, words[2])
            else:
                pending.append(line)
        if pending:
            await self.sh("\n".join(pending))

    async def consume_until_stopped(self, line: str, workload: str) -> None:
        """Start it (on a free metrics port), wait until it consumes and has taken every task
        the examples queued, SIGTERM it: it exits 0, and its handlers failed only on purpose
        (`Retry`, `Park`), as its JSON log lines say."""
        line = re.sub(r"--metrics-port \d+", f"--metrics-port {free_port()}", line)
        log = self.clone / "consume.err"
        topology = load_topology(self.clone / "topology", self.env["RABBITQ_NAMESPACE"])
        work_queue = topology.workload(workload).work_queue
        with process(
            ["bash", "-c", f"exec {line}"], self.clone, "consume", cwd=self.clone, env=self.env
        ) as proc:

            async def consumed() -> bool:
                assert proc.poll() is None, stderr_of(self.clone, "consume")
                return "consuming" in log.read_text() and not await queue_depth(
                    self.connection, work_queue
                )

            await wait_until(consumed, timeout=20, what=f"{line!r} to take every task")
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0, stderr_of(self.clone, "consume")
        records = [json.loads(r) for r in log.read_text().splitlines() if r.startswith("{")]
        errors = [r["error"] for r in records if "error" in r]
        summaries = [r["message"] for r in records if "stopped: " in r["message"]]
        assert re.search(r"succeeded [1-9]", "".join(summaries)), summaries or log.read_text()
        assert all(e.startswith(("Retry:", "Park:")) for e in errors), errors

    def save(self, text: str) -> Path:
        """Save a block where its first line (`# path...`) says."""
        caption = CAPTION.match(text.splitlines()[0])
        assert caption, f"the block does not name its file on its first line: {text[:80]!r}"
        path = self.clone / caption.group(1)
        path.write_text(text)
        return path

    async def check_synopsis(self, text: str) -> None:
        """Every command of the synopsis exists and takes the options shown."""
        for command in re.split(r"\n(?=rabbitq )", text.strip()):
            words = []  # the command's name: `topology show`, `consume` (WORKLOAD is not)
            for word in command.split()[1:]:
                if not word.isalpha() or not word.islower():
                    break
                words.append(word)
            name = " ".join(words)
            help_text = (await self.sh(f"COLUMNS=200 rabbitq {name} --help")).stdout
            for option in sorted(set(re.findall(r"--[a-z][a-z-]*", command))):
                assert option in help_text, f"`rabbitq {name}` has no {option}"


def clone_of_checkout(where: Path) -> Path:
    """The checkout as symlinks, except `topology/`: a copy the README's files can go into."""
    clone = where / "clone"
    clone.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {"topology", ".git"}:
            (clone / entry.name).symlink_to(entry)
    (clone / "topology").mkdir()
    for file in (ROOT / "topology").glob("*.toml"):
        (clone / "topology" / file.name).write_text(file.read_text())
    return clone


def fresh_shell(url: str, namespace: str) -> dict[str, str]:
    """This environment as a new terminal has it: no virtualenv on PATH, no rabbitq settings
    but the test broker and namespace."""
    venvs = {str(ROOT / ".venv" / "bin"), str(Path(sys.prefix) / "bin")}
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RABBITQ_") and k not in {"VIRTUAL_ENV", "PYTHONHOME"}
    }
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p not in venvs)
    return {**env, "RABBITQ_URL": url, "RABBITQ_NAMESPACE": namespace}


@pytest.mark.timeout(90)
async def test_a_new_user_following_the_readme_succeeds_at_every_step(
    tmp_path: Path, connection: AbstractConnection, url: str, namespace: str
) -> None:
    """Quick start, the topology file, the handler module, the CLI and the consumer, in order."""
    clone = clone_of_checkout(tmp_path)
    installed = await asyncio.to_thread(subprocess.run, ["make", "-q", "install"], cwd=clone)
    if installed.returncode:
        text = "the checkout's .venv is missing or older than pyproject.toml; run `make install`"
        if os.environ.get("CI"):
            pytest.fail(text)
        pytest.skip(text)
    reader = Reader(clone, fresh_shell(url, namespace), connection)
    applied: list[Topology] = [load_topology(ROOT / "topology", namespace)]
    try:
        for info, text in blocks():
            if info == "sh":
                await reader.sh_block(text)
            elif info == "toml":
                reader.save(text)
                topology = load_topology(clone / "topology", namespace)
                applied.append(topology)
                await reader.sh("rabbitq topology apply >/dev/null")
            elif info == "python":
                if "rabbitq.App(" in text:  # (a test of an example imports its app)
                    assert EXAMPLE_NAMESPACE in text, "the example must use the demo's namespace"
                code = text.replace(EXAMPLE_NAMESPACE, f'namespace="{namespace}"')
                path = reader.save(code.replace(EXAMPLE_URL, url))
                result = await reader.sh(f"python {shlex.quote(path.name)}")
                assert result.stderr == "", result.stderr
            elif info == "text" and is_synopsis(text):
                await reader.check_synopsis(text)
            else:
                assert info == "text", f"README has a ```{info} block this test cannot run"
    finally:
        # a fresh connection: the broker may have closed the fixture's meanwhile
        cleanup = await aio_pika.connect(url)
        try:
            await delete_namespace(cleanup, applied)
        finally:
            await cleanup.close()
