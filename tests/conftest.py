"""Fixtures for tests against a real cluster: fake hosts (sshd + tmux each) and the real `fab` CLI."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.slurm_cluster import SlurmCluster, missing_binaries

REPO = Path(__file__).resolve().parents[1]
PAYLOADS = Path(__file__).resolve().parent / "payloads"
JOBS = Path.home() / ".fablaunch" / "jobs"
FAB = shutil.which("fab") or "fab"
# Separate ports let two test runs (or a test run and a benchmark) share this machine.
SSH_PORT = int(os.environ.get("FABLAUNCH_TEST_SSH_PORT", "2222"))
# Every `fab` of the suite connects directly: its faults stop a host's sshd listener, which a kept
# connection would outlive, and its leak checks count every process on a fake host. tests/test_keeper.py
# turns the keeper on for its own tests.
os.environ["FABLAUNCH_KEEPER"] = "0"
_master_ports = itertools.count(int(os.environ.get("FABLAUNCH_TEST_MASTER_PORT", "29400")))


def master_port() -> int:
    """A fresh MASTER_PORT per job, so a slow-to-close port never couples two tests."""
    return next(_master_ports)


def tagged_pids(job: str) -> list[int]:
    """Processes of a job on any fake host, found through /proc by the test itself."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            data = environ.read_bytes()
        except OSError:
            continue
        if any(v.startswith(f"FABLAUNCH_TAG={job}@".encode()) for v in data.split(b"\0")):
            pids.append(int(environ.parent.name))
    return pids


def environ_of(pid: int) -> list[bytes]:
    """A process's environment as `KEY=VALUE` byte strings (empty once it is gone)."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie waiting for its reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def live_pids(job: str) -> list[int]:
    """Tagged processes that are still running (zombies waiting for a slow reaper do not count)."""
    return [p for p in tagged_pids(job) if alive(p)]


def outputs(workdir: Path, count: int, timeout: float = 150, name: str = "{rank}.json") -> list[dict[str, Any]]:
    """Wait for every rank's out/<name> (probe.py, dump.py: <rank>.json) and return them in rank order."""
    paths = [workdir / "out" / name.format(rank=r) for r in range(count)]
    wait_until(lambda: all(p.exists() for p in paths), timeout)
    return [json.loads(p.read_text()) for p in paths]


def wait_until(predicate: Callable[[], object], timeout: float = 60, interval: float = 0.2) -> object:
    """Poll until predicate is truthy; fail the test with a clear message otherwise."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three fake hosts, node1..node3 on 127.0.0.11-13, with this test run's PATH."""
    root = tmp_path_factory.mktemp("cl")
    with Cluster(root, 3, port=SSH_PORT, env={"PATH": os.environ["PATH"]}) as c:
        yield c


class Fab:
    """Runs the real `fab` CLI of this repo against the cluster, from a working directory."""

    def __init__(self, cluster: Cluster, cwd: Path, ssh_config: Path | None = None) -> None:
        self.cluster = cluster
        self.cwd = cwd
        self.ssh_config = ssh_config or cluster.ssh_config
        self.env = {**os.environ, "TMUX_TMPDIR": str(cwd / ".tmux-local"), "COLUMNS": "200"}
        (cwd / ".tmux-local").mkdir(exist_ok=True)

    def __call__(self, *args: str, timeout: float = 180, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [FAB, "-r", str(REPO), "-S", str(self.ssh_config), *args]
        return subprocess.run(cmd, cwd=cwd or self.cwd, env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def write(self, name: str, *lines: str) -> Path:
        path = self.cwd / name
        path.write_text("".join(f"{line}\n" for line in lines))
        return path


@pytest.fixture
def fab(cluster: Cluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fab]:
    """A `fab` runner in a fresh working directory holding copies of the test payloads.

    Afterwards every process a test's jobs left behind is killed, so one failing test cannot leak
    processes or sessions into the next.
    """
    prefix = fresh_workdir(request, tmp_path)
    runner = Fab(cluster, tmp_path)
    yield runner
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            tagged = f"FABLAUNCH_TAG={prefix}".encode() in environ.read_bytes()
        except OSError:
            continue
        if tagged:
            with contextlib.suppress(OSError):
                os.kill(int(environ.parent.name), 9)
    for name in cluster.names:
        for line in cluster.tmux(name, "ls", "-F", "#{session_name}").stdout.split():
            if line.startswith(prefix):
                cluster.tmux(name, "kill-session", "-t", f"={line}:")


def fresh_workdir(request: pytest.FixtureRequest, path: Path) -> str:
    """Fill a test's working directory with the payloads and forget an earlier run's job files.

    Job files outlive jobs by design; a rerun on the same machine must not see the last run's files.
    Returns the prefix of the test's job names.
    """
    prefix = job_name(request, "")
    for old in JOBS.glob(f"{prefix}*"):
        shutil.rmtree(old, ignore_errors=True)
    for payload in PAYLOADS.glob("*.py"):
        shutil.copy(payload, path)
    return prefix


def slow_path(root: Path, command: str, seconds: float) -> str:
    """A PATH on which `command` sleeps `seconds` before running: a host that is slow at one step."""
    slow = root / "slowbin"
    slow.mkdir(exist_ok=True)
    (slow / command).write_text(f"#!/bin/sh\nsleep {seconds:g}\nexec /usr/bin/{command} \"$@\"\n")
    (slow / command).chmod(0o755)
    return f"{slow}:{os.environ['PATH']}"


@pytest.fixture
def server() -> Iterator[dict[str, str]]:
    """The environment of a private tmux server (a short TMUX_TMPDIR: socket paths are limited to 107 bytes)."""
    tmpdir = tempfile.mkdtemp(prefix="fl-tmux-", dir="/tmp")
    env = {**os.environ, "TMUX_TMPDIR": tmpdir}
    env.pop("TMUX", None)
    try:
        yield env
    finally:
        subprocess.run(["tmux", "kill-server"], env=env, capture_output=True)
        shutil.rmtree(tmpdir, ignore_errors=True)


def job_name(request: pytest.FixtureRequest, suffix: str = "") -> str:
    """A job name unique to the running test (so concurrent jobs never share a name)."""
    base = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40].strip("-")
    return f"t-{base}{suffix}"


@pytest.fixture
def job(request: pytest.FixtureRequest) -> str:
    return job_name(request)


def sessions(cluster: Cluster, prefix: str) -> dict[str, list[str]]:
    """The tmux sessions whose names start with prefix, per fake host."""
    found = {}
    for name in cluster.names:
        out = cluster.tmux(name, "ls", "-F", "#{session_name}").stdout.split()
        found[name] = [s for s in out if s.startswith(prefix)]
    return found


def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A real Slurm cluster: slurmctld and slurmd node1..node3 on 127.0.0.1, all nodes idle.

    Ports start at FABLAUNCH_TEST_SLURM_PORT (default 16817). Run clients with `env=slurm.env`
    (it sets SLURM_CONF). Missing Slurm fails the test instead of skipping it, so CI never
    passes without having run these tests.
    """
    missing = missing_binaries()
    if missing:
        pytest.fail(f"Slurm is not installed (missing {', '.join(missing)}): run .ci/run to install it", pytrace=False)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
