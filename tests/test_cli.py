"""The `fab` command line around the tasks: fab's own flags that fablaunch honours or refuses."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from tests.cluster import Cluster
from tests.conftest import Fab, live_pids, master_port, wait_until


def test_dash_capital_h_is_refused_instead_of_running_a_launch_per_host(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1")
    result = fab("-H", "node1,node2", "launch-gpus", "--job", job, "--dry-run", "--", "sleeper.py")
    assert result.returncode == 2 and "--gpus or --hosts" in result.stderr, result.stdout + result.stderr
    assert "Dry run" not in result.stdout


def test_attach_runs_ssh_with_fabs_ssh_config_and_key(fab: Fab, job: str, tmp_path: Path) -> None:
    fab.write("gpus", "node2")
    result = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "sleeper.py")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: live_pids(job), timeout=30)
    # A stand-in ssh that records its arguments: attach execs ssh -t, which needs a terminal.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "ssh-args"
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
    (bin_dir / "ssh").chmod(0o755)
    key = fab.cluster.client_key
    fab.env = {**fab.env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    attached = fab("-i", str(key), "attach", "--job", job, "--rank", "0")
    assert attached.returncode == 0, attached.stdout + attached.stderr
    argv = record.read_text().splitlines()
    assert argv[:2] == ["-t", "-F"] and argv[2] == str(fab.ssh_config)
    assert ["-i", str(key)] == argv[argv.index("-i"):argv.index("-i") + 2]
    assert "node2" in argv and argv[-1] == f"tmux attach-session -t ={job}-rank-0"


def test_stop_and_wait_print_json_when_asked(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    launched = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "behave.py", "0=exit:0",
                   "1=sleep")
    assert launched.returncode == 0, launched.stderr
    waited = fab("wait", "--job", job, "--timeout", "3", "--json")
    data = json.loads(waited.stdout)
    assert waited.returncode == 124 and data["exit_code"] == 124 and data["job"] == job
    assert sorted((s["rank"], s["host"]) for s in data["sessions"]) == [(0, "node1"), (1, "node2")]
    stopped = fab("stop", "--job", job, "--grace", "1", "--json")
    rows = json.loads(stopped.stdout)
    assert stopped.returncode == 0 and {r["host"]: r["result"] for r in rows}["node2"] == "stopped"
    assert all(isinstance(r["processes"], int) for r in rows)
    assert not live_pids(job)


def test_launch_prints_json_when_asked_and_nothing_else_on_stdout(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    dry = fab("launch-gpus", "--job", job, "--dry-run", "--json", "--env", "API_TOKEN=hush", "--", "behave.py", "x y")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] is True and [s["rank"] for s in plan["sessions"]] == [0, 1]
    assert plan["sessions"][1]["env"]["RANK"] == "1" and plan["sessions"][1]["env"]["API_TOKEN"] == "*****"
    assert plan["sessions"][0]["argv"][-2:] == ["behave.py", "x y"] and "hush" not in dry.stdout
    assert not live_pids(job)

    done = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--wait", "--json", "--",
               "behave.py", "0=exit:0", "1=exit:3")
    assert done.returncode == 3, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert data["job"] == job and data["exit_code"] == 3 and data["run"]
    assert [(h["host"], h["result"]) for h in data["hosts"]] == [("node1", "started"), ("node2", "started")]
    assert {s["rank"]: (s["state"], s["exit_code"]) for s in data["sessions"]} == {0: ("succeeded", 0),
                                                                                   1: ("failed", 3)}


def test_a_failed_launch_prints_its_hosts_as_json_with_the_exit_code(fab: Fab, job: str, cluster: Cluster) -> None:
    fab.write("gpus", "node1", "node2")
    cluster.stop_host("node2")
    try:
        result = fab("-t", "2", "launch-gpus", "--job", job, "--json", "--", "sleeper.py")
    finally:
        cluster.start_host("node2")
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert f"cannot run job {job}" in data["error"]
    hosts = {h["host"]: h["result"] for h in data["hosts"]}
    assert hosts["node2"].startswith("unreachable") and hosts["node1"] == "ready; not launched"
    assert not live_pids(job)
    followed = fab("launch-gpus", "--job", job, "--json", "--follow", "--", "sleeper.py")
    assert followed.returncode == 2 and "--follow" in followed.stderr and followed.stdout == ""
