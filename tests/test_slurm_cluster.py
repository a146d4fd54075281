"""The Slurm test cluster behaves like a real three-node cluster: srun, sbatch and scancel work."""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import alive, wait_until
from tests.slurm_cluster import SlurmCluster


def marked(value: str) -> list[int]:
    """Live processes (zombies excluded) whose environment holds SLURM_TEST_MARK=value."""
    wanted = f"SLURM_TEST_MARK={value}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            hit = wanted in environ.read_bytes().split(b"\0")
        except OSError:
            continue
        if hit and alive(int(environ.parent.name)):
            found.append(int(environ.parent.name))
    return found


def session_leader(pid: int) -> bool:
    """Whether a process leads its own session (it called setsid())."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    # After the command name: state, ppid, pgrp, session.
    return fields[3] == str(pid)


def job_field(slurm: SlurmCluster, job: str, field: str) -> str:
    """One field of `scontrol show job -o` (e.g. JobState), or "" if slurmctld has no such job."""
    out = slurm.run("scontrol", "show", "job", "-o", job).stdout
    match = re.search(rf"(?:^| ){field}=(\S*)", out)
    return match.group(1) if match else ""


def sbatch(slurm: SlurmCluster, cwd: Path, script: str, *options: str) -> str:
    """Submit a batch script (read from stdin) and return its job id."""
    result = subprocess.run(
        ["sbatch", "--parsable", *options],
        input=script,
        env=slurm.env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def jobs(slurm: SlurmCluster) -> Iterator[list[str]]:
    """Job ids a test submits; any still there afterwards are cancelled."""
    ids: list[str] = []
    yield ids
    if ids:
        slurm.run("scancel", *ids)


def test_three_idle_nodes_on_loopback(slurm: SlurmCluster) -> None:
    assert slurm.nodes == ["node1", "node2", "node3"]
    # Idle once jobs of earlier tests (the cluster is shared by the session) have ended.
    wait_until(lambda: slurm.node_states() == dict.fromkeys(slurm.nodes, "idle"), timeout=60)
    for node in slurm.nodes:
        out = slurm.run("scontrol", "show", "node", node).stdout
        assert "NodeAddr=127.0.0.1 " in out, out


def test_srun_spans_the_nodes_in_order(slurm: SlurmCluster) -> None:
    result = slurm.run(
        "srun", "-N3", "--ntasks-per-node=1", "bash", "-c", "echo $SLURM_NODEID $SLURMD_NODENAME $SLURM_PROCID"
    )
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == ["0 node1 0", "1 node2 1", "2 node3 2"]


def test_sbatch_job_runs_and_writes_its_output(slurm: SlurmCluster, tmp_path: Path, jobs: list[str]) -> None:
    job = sbatch(slurm, tmp_path, "#!/bin/bash\necho hello from $SLURMD_NODENAME\n", "-o", str(tmp_path / "out-%j.txt"))
    jobs.append(job)
    wait_until(lambda: job_field(slurm, job, "JobState") == "COMPLETED", timeout=30)
    assert job_field(slurm, job, "ExitCode") == "0:0"
    out = tmp_path / f"out-{job}.txt"
    assert job_field(slurm, job, "StdOut") == str(out)
    assert out.read_text() == f"hello from {job_field(slurm, job, 'NodeList')}\n"


def test_scancel_leaves_no_process_on_any_node(slurm: SlurmCluster, tmp_path: Path, jobs: list[str]) -> None:
    mark = f"scancel-{tmp_path.name}"
    # Every task starts a child in its own session that ignores SIGTERM, and ignores it itself:
    # only KillWait's SIGKILL ends them.
    task = "trap '' TERM; setsid bash -c \"trap '' TERM INT HUP; sleep 300\" & sleep 300"
    script = f"#!/bin/bash\nexport SLURM_TEST_MARK={mark}\nsrun -N3 --ntasks-per-node=1 bash -c {shlex.quote(task)}\n"
    job = sbatch(slurm, tmp_path, script, "-N3", "-o", str(tmp_path / "out.txt"))
    jobs.append(job)
    # Three session leaders (one per node) besides the batch shell, srun and the tasks.
    wait_until(lambda: len([pid for pid in marked(mark) if session_leader(pid)]) == 3, timeout=30)
    assert len(marked(mark)) >= 9
    assert job_field(slurm, job, "NodeList") == "node[1-3]"
    assert slurm.run("scancel", job).returncode == 0
    wait_until(lambda: not marked(mark), timeout=30)
    wait_until(lambda: job_field(slurm, job, "JobState") == "CANCELLED", timeout=30)
    wait_until(lambda: slurm.node_states() == dict.fromkeys(slurm.nodes, "idle"), timeout=30)
