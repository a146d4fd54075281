"""`fab prune`: finished jobs are forgotten on the hosts and here; a running one never is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from tests.conftest import JOBS, Fab, live_pids, master_port, wait_until


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def jobs_in_status(fab: Fab) -> set[str]:
    return {s["job"] for s in json.loads(ok(fab("status", "--json")).stdout)}


def test_prune_forgets_finished_jobs_and_never_a_running_one(fab: Fab, job: str) -> None:
    done, running = f"{job}-done", f"{job}-running"
    fab.write("gpus", "node1", "node2")
    ok(fab("launch-gpus", "--job", done, "--port", str(master_port()), "--", "behave.py", "*=exit:0"))
    ok(fab("launch-gpus", "--job", running, "--port", str(master_port()), "--", "sleeper.py"))
    wait_until(lambda: not live_pids(done) and len(live_pids(running)) >= 4, timeout=40)
    assert {done, running} <= jobs_in_status(fab)

    dry = ok(fab("prune", "--dry-run"))
    assert "would be removed" in dry.stdout and "running" in dry.stdout
    assert (JOBS / done / "node1").is_dir() and (fab.cwd / ".fablaunch" / "records" / f"{done}.json").exists()
    recent = ok(fab("prune", "--older-than", "1h"))
    assert "ended" in recent.stdout and (JOBS / done / "node1").is_dir()  # ended seconds ago: kept

    ok(fab("prune"))
    assert not (JOBS / done).exists()
    assert not (fab.cwd / ".fablaunch" / "records" / f"{done}.json").exists()
    assert (JOBS / running / "node1" / "manifest.json").exists() and len(live_pids(running)) >= 4
    assert jobs_in_status(fab) >= {running} and done not in jobs_in_status(fab)

    kept = fab("prune", "--job", running)
    assert kept.returncode == 1 and "running" in kept.stderr
    assert len(live_pids(running)) >= 4
    ok(fab("stop", "--job", running, "--grace", "1"))
    ok(fab("prune", "--job", running))
    assert not (JOBS / running).exists()


def test_prune_refuses_a_bad_age(fab: Fab) -> None:
    fab.write("gpus", "node1")
    for bad in ("soon", "-1h", "1.5d", "99999999999d"):
        result = fab("prune", "--older-than", bad)
        assert result.returncode == 2 and "--older-than" in result.stderr, (bad, result.stderr)


def test_a_host_where_a_launch_of_the_job_holds_its_lock_is_not_pruned(tmp_path: Path) -> None:
    from fablaunch.hostfile import parse_host
    from fablaunch.scripts import prune_payload

    host = parse_host("node1", "test")
    job_dir = tmp_path / ".fablaunch" / "jobs" / "j"
    (job_dir / "node1").mkdir(parents=True)
    (job_dir / "node1" / "rank-0.log").write_text("done\n")
    lock = job_dir / ".node1.lock"
    lock.touch()
    env = {**os.environ, "HOME": str(tmp_path), "TMUX_TMPDIR": str(tmp_path / "no-tmux")}
    # A launch between its lock and its sessions; its own session, so its `sleep` (which holds the lock too) goes.
    holder = subprocess.Popen(["flock", str(lock), "sleep", "30"], start_new_session=True)
    try:
        wait_until(lambda: subprocess.run(["flock", "-n", str(lock), "true"]).returncode != 0, timeout=10)
        held = subprocess.run(["bash", "-s"], input=prune_payload("j", host, False), env=env, capture_output=True,
                              text=True, timeout=30)
        assert held.stdout.strip() == "running" and (job_dir / "node1" / "rank-0.log").exists()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    free = subprocess.run(["bash", "-s"], input=prune_payload("j", host, False), env=env, capture_output=True,
                          text=True, timeout=30)
    assert free.stdout.strip().startswith("files=") and not job_dir.exists()
