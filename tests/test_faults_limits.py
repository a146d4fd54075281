"""Limits on the real cluster (issue 8): many ranks on one host, a torchrun worker killed by a signal,
and a `~/.fablaunch` that cannot take a job's files.

Every outcome is checked through the fake hosts' own tmux and /proc, not only through fablaunch's report.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.conftest import PAYLOADS, SSH_PORT, Fab, live_pids, master_port, sessions, wait_until


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def output(result: subprocess.CompletedProcess[str]) -> str:
    """stdout and stderr, whitespace collapsed so table wrapping never matters."""
    return " ".join((result.stdout + "\n" + result.stderr).split())


def proc_text(pid: int, name: str) -> list[str]:
    """A process's NUL-separated /proc file (cmdline, environ) as strings; empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


# --- 64 ranks on one host -----------------------------------------------------------------------------------


def sleeping_ranks(job: str) -> set[int]:
    """The RANKs of the job's live sleeper.py processes."""
    ranks = set()
    for pid in live_pids(job):
        if any(arg.endswith("sleeper.py") for arg in proc_text(pid, "cmdline")):
            ranks |= {int(v.removeprefix("RANK=")) for v in proc_text(pid, "environ") if v.startswith("RANK=")}
    return ranks


def test_64_ranks_on_one_host_with_the_longest_job_name_and_a_long_workdir_start_and_stop(
        fab: Fab, job: str, tmp_path: Path) -> None:
    """One tmux call cannot carry this host's 64 sessions: they start over several, every one tagged."""
    long_job = f"{job}-{'x' * 64}"[:64]
    workdir = tmp_path / ("w" * (200 - len(str(tmp_path)) - 1))
    workdir.mkdir()
    assert len(long_job) == 64 and len(str(workdir)) == 200
    shutil.copy(PAYLOADS / "sleeper.py", workdir)
    fab.write("gpus", *["node1"] * 64)
    ok(fab("launch-gpus", "--job", long_job, "--workdir", str(workdir), "--port", str(master_port()), "--",
           "sleeper.py", timeout=300))
    try:
        fields = "#{session_name}|#{@fablaunch_job}|#{@fablaunch_host}|#{@fablaunch_rank}"
        listed = fab.cluster.tmux("node1", "list-sessions", "-F", fields).stdout.split()
        tagged = sorted(line.split("|") for line in listed if line.startswith(long_job))
        assert tagged == sorted([f"{long_job}-rank-{r}", long_job, "node1", str(r)] for r in range(64))
        assert not any("-launching-" in line for line in listed)  # the placeholder holding the server is gone
        wait_until(lambda: sleeping_ranks(long_job) == set(range(64)), timeout=180)
        states = json.loads(ok(fab("status", "--json", "--job", long_job)).stdout)
        assert sorted(s["rank"] for s in states) == list(range(64)) and {s["state"] for s in states} == {"running"}
    finally:
        stopped = fab("stop", "--job", long_job, timeout=300)
    ok(stopped)
    wait_until(lambda: not live_pids(long_job), timeout=60)
    assert sessions(fab.cluster, long_job) == {name: [] for name in fab.cluster.names}


def test_a_workdir_too_long_for_tmux_is_refused_before_any_host_is_touched(fab: Fab, job: str) -> None:
    """Refused when planning (needs launch.make_plan to call tmux.check_fits), not after preflight passed."""
    fab.write("gpus", "node1", "node2")
    workdir = "/" + "w" * 20000
    for flags in ((), ("--no-preflight",), ("--dry-run",)):
        result = fab("launch-gpus", "--job", job, "--workdir", workdir, *flags, "--", "sleeper.py")
        assert result.returncode == 2, output(result)[-600:]
        assert "--workdir: path too long for tmux" in result.stderr and "Traceback" not in result.stderr
    assert sessions(fab.cluster, job) == {name: [] for name in fab.cluster.names} and not live_pids(job)


# --- a torchrun worker killed by a signal -------------------------------------------------------------------


@pytest.mark.parametrize(("rank", "node", "host"), [(3, 1, "node2"), (1, 0, "node1")],
                         ids=["on the second node", "on the rendezvous host"])
def test_a_torchrun_worker_killed_by_sigkill_is_named_with_its_signal(fab: Fab, job: str, rank: int, node: int,
                                                                      host: str) -> None:
    """torchrun's agent writes no error file for it: errors and status read the agent's summary in its log."""
    fab.write("hosts", "node1", "node2")
    ok(fab("launch-torchrun", "--job", job, "--port", str(master_port()), "--nproc-per-node", "2", "--",
           "behave.py", f"{rank}=kill", "*=sleep", timeout=300))
    try:
        def agent_ended() -> bool:
            states = json.loads(fab("status", "--json", "--job", job).stdout or "[]")
            return any(s["node"] == node and s["state"] == "failed" for s in states)

        wait_until(agent_ended, timeout=240, interval=1)
        errors = fab("errors", "--job", job)
        assert errors.returncode == 0, output(errors)
        text = output(errors)
        assert f"first: rank {rank} (node {node} worker 1) on {host}" in text
        assert "killed by signal 9 (SIGKILL)" in text and "exit 1 (no error file)" in text  # the agent's echo
        first = json.loads(ok(fab("errors", "--job", job, "--json")).stdout)["first"]
        assert (first["who"], first["host"], first["rank"], first["signal"]) == \
            (f"rank {rank} (node {node} worker 1)", host, rank, 9)
        status = ok(fab("status", "--job", job))
        said = " ".join(output(status).split())
        assert f"first failure: rank {rank} (node {node} worker 1) on {host} error: killed by signal 9 (SIGKILL)" \
            in said, said
    finally:
        ok(fab("stop", "--job", job, timeout=120))
    assert not live_pids(job)


# --- ~/.fablaunch on one host: read-only, full --------------------------------------------------------------


@pytest.fixture
def homes(tmp_path: Path) -> Iterator[tuple[Cluster, Path]]:
    """Two fake hosts; node2 has its own HOME (sshd SetEnv), so its ~/.fablaunch can be broken alone."""
    home = tmp_path / "home2"
    home.mkdir()
    with Cluster(tmp_path / "c", 2, port=SSH_PORT + 1, base=41, env={"PATH": os.environ["PATH"]},
                 host_env={"node2": {"HOME": str(home)}}) as c:
        yield c, home


@contextlib.contextmanager
def mounted(path: Path, *how: list[str]) -> Iterator[Path]:
    """Mount commands run on `path` (made first), always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        for args in how:
            subprocess.run(["mount", *args, str(path)], check=True, capture_output=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def doctor(fab: Fab) -> tuple[subprocess.CompletedProcess[str], dict[str, dict]]:
    # The interpreter itself, not a pyenv shim: a shim looks for pyenv under $HOME, which node2 moved.
    flags = ("doctor", "--python", sys.executable)
    result = fab(*flags, "--port", str(master_port()), timeout=300)
    as_json = fab(*flags, "--port", str(master_port()), "--json", timeout=300)
    return result, {item["host"]: item for item in json.loads(as_json.stdout)}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
def test_a_read_only_or_full_fablaunch_dir_fails_doctor_on_that_host(homes: tuple[Cluster, Path],
                                                                     tmp_path: Path) -> None:
    cluster, home = homes
    assert cluster.ssh("node2", "echo $HOME").stdout.strip() == str(home)  # SetEnv reaches the host's shells
    fab = Fab(cluster, tmp_path)
    fab.write("gpus", "node1", "node2")
    state = home / ".fablaunch"

    result, hosts = doctor(fab)
    assert result.returncode == 0, output(result)
    assert hosts["node2"]["state_dir"]["status"] == "ok" and not state.exists()  # tried, and left nothing

    # A read-only mount over a roomy disk: only writing tells.
    with mounted(state, ["--bind", str(state)], ["-o", "remount,bind,ro"]):
        result, hosts = doctor(fab)
    assert result.returncode == 1
    assert (f"FAIL node2 ~/.fablaunch: {state} is not writable (Read-only file system): a launch keeps every job's "
            "scripts, logs and exit records there") in output(result)
    assert "checks failed on node2;" in output(result)
    assert hosts["node2"]["state_dir"]["status"] == "fail" and hosts["node1"]["state_dir"]["status"] == "ok"

    # A full disk: writable, but no room for a log.
    with mounted(state, ["-t", "tmpfs", "-o", "size=1m", "tmpfs"]):
        fill = subprocess.run(["dd", "if=/dev/zero", f"of={state / 'fill'}", "bs=64k"], capture_output=True, text=True)
        assert "No space left on device" in fill.stderr
        result, hosts = doctor(fab)
    assert result.returncode == 1
    assert f"FAIL node2 ~/.fablaunch: only 0 MiB free for {state} (under 100 MiB)" in output(result)
    assert hosts["node2"]["state_dir"]["value"] == 0 and hosts["node1"]["state_dir"]["status"] == "ok"
