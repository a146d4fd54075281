"""Torchrun mode made readable (issue 9, item 7): workers' last lines, global ranks, `logs --rank/--node`.

The survey runs in a real bash over a torchrun log dir laid out as torchrun 2.13 leaves it, the
selection and prefixes are pure, and the last test runs `fab launch-torchrun` on 2 fake hosts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from fablaunch import jobs, survey
from fablaunch.errors import UsageError
from fablaunch.hostfile import parse_host
from fablaunch.survey import SEP, SessionState
from tasks.jobs import job_table
from tests.conftest import Fab, live_pids, master_port, wait_until

HOST = parse_host("node1", "test")


def node_dir(home: Path, job: str, nodes: list[int]) -> Path:
    d = home / ".fablaunch" / "jobs" / job / "node1"
    d.mkdir(parents=True)
    sessions = [{"session": f"{job}-node-{k}", "host": "node1", "rank": None, "node": k} for k in nodes]
    (d / "manifest.json").write_text(json.dumps({"job": job, "mode": "torchrun", "launched": "2026-11-24T10:00:00",
                                                 "sessions": sessions}))
    return d


def worker_log(d: Path, path: str, text: str, mtime: float) -> Path:
    f = d / path
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)
    os.utime(f, (mtime, mtime))
    return f


def dump(home: Path, job: str | None) -> str:
    env = {**os.environ, "HOME": str(home), "TMUX_TMPDIR": str(home / "no-tmux")}
    (home / "no-tmux").mkdir(exist_ok=True)
    return subprocess.run(["bash", "-s"], input=survey.payload(HOST, job), env=env, capture_output=True, text=True,
                          errors="replace", check=True).stdout


def node(k: int, ranks: list[int], source: str = "torchrun", host: str = "node1", job: str = "j") -> SessionState:
    return SessionState(job, "torchrun", host, f"{job}-node-{k}", None, k, "running", ranks=ranks,
                        ranks_source=source, log=f"/h/.fablaunch/jobs/{job}/{host}/node-{k}.log")


def fake_ssh(fab: Fab) -> Path:
    """Put a stand-in ssh on the fab's PATH that records its arguments (attach execs `ssh -t`)."""
    bin_dir = fab.cwd / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    record = fab.cwd / "ssh-args"
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
    (bin_dir / "ssh").chmod(0o755)
    fab.env = {**fab.env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return record


# --- the survey ---------------------------------------------------------------------------------------------------


def test_a_node_shows_its_newest_workers_last_line_from_the_newest_attempt(tmp_path: Path) -> None:
    d = node_dir(tmp_path, "j", [0])
    (d / "node-0.log").write_text("agent says little\n")
    run = "node-0.torchrun/j_abc"
    worker_log(d, f"{run}/attempt_0/0/stdout.log", "old attempt, newer file\n", 3000.0)
    os.utime(d / run / "attempt_0", (1000.0, 1000.0))  # the older attempt (its dir is older)
    worker_log(d, f"{run}/attempt_1/0/stdout.log", "w0 step 1\nw0 step 2\n", 2000.0)
    worker_log(d, f"{run}/attempt_1/0/stderr.log", "", 2000.0)
    # Worker 1 wrote last: lines that look like protocol or tail headers are its text, nothing more.
    forged = f"\x1eWTAIL {d}/{run}/attempt_1/0/stdout.log\n==> x <==\n\x1e0000 NOW 1\nw1 step 9\r\n\n"
    worker_log(d, f"{run}/attempt_1/1/stdout.log", forged, 2500.0)
    worker_log(d, f"{run}/attempt_1/1/stderr.log", "a warning\n", 2400.0)
    [state] = survey.parse(HOST, dump(tmp_path, "j"))
    assert state.last_line == "[w1] w1 step 9"
    assert state.log_age is not None and state.log_age > 0  # from worker 1's stdout, not the agent's log
    assert state.tail == ["agent says little"]  # the node's own tail is still the agent's
    assert sorted((w.local_rank, w.stream) for w in state.worker_logs) == [
        (0, "stderr"), (0, "stdout"), (1, "stderr"), (1, "stdout")]
    assert all("/attempt_1/" in w.path for w in state.worker_logs)
    [w1] = [w for w in state.worker_logs if (w.local_rank, w.stream) == (1, "stdout")]
    assert w1.tail[-1] == "w1 step 9" and w1.mtime == 2500.0 and "==> x <==" in w1.tail
    # No live worker: the ranks are assumed from the node's worker count (2) and its number.
    survey.fill_ranks([state])
    assert state.ranks == [0, 1] and state.ranks_source == "assumed"
    assert "ranks" in state.as_json() and "worker_logs" not in state.as_json()


def test_a_node_without_worker_logs_keeps_its_agents_last_line(tmp_path: Path) -> None:
    d = node_dir(tmp_path, "j", [0])
    (d / "node-0.log").write_text("Traceback ...\nSignalException: got signal: 2\n")
    [state] = survey.parse(HOST, dump(tmp_path, "j"))
    assert state.last_line == "SignalException: got signal: 2" and state.worker_logs == [] and state.ranks == []


def test_live_workers_rank_variables_give_the_nodes_global_ranks() -> None:
    manifest = {"job": "j", "mode": "torchrun", "launched": "x",
                "sessions": [{"session": "j-node-1", "host": "node1", "rank": None, "node": 1}]}
    text = "\n".join([
        f"{SEP}NOW 100", f"{SEP}PROCS",
        "/proc/10/environ:FABLAUNCH_SESSION=j-node-1@node1",  # the agent: no RANK
        "/proc/11/environ:FABLAUNCH_SESSION=j-node-1@node1", "/proc/11/environ:RANK=7",
        "/proc/11/environ:LOCAL_RANK=1",
        "/proc/12/environ:RANK=0", "/proc/12/environ:LOCAL_RANK=0",  # someone else's process
        f"{SEP}MANIFEST /h/.fablaunch/jobs/j/node1", json.dumps(manifest),
        f"{SEP}WTIMES /h/.fablaunch/jobs/j/node1/node-1.torchrun",
        "/h/.fablaunch/jobs/j/node1/node-1.torchrun/j_x/attempt_0/0/stdout.log 90",
        "/h/.fablaunch/jobs/j/node1/node-1.torchrun/j_x/attempt_0/1/stdout.log 95",
        f"{SEP}WTAIL /h/.fablaunch/jobs/j/node1/node-1.torchrun/j_x/attempt_0/1/stdout.log", "loss 0.5", "",
    ])
    [state] = survey.parse(HOST, text)
    # c10d may number this node anything: the RANK torchrun gave worker 1 is what counts.
    assert state.ranks == [6, 7] and state.ranks_source == "torchrun"
    assert state.last_line == "[w1] loss 0.5" and state.log_age == 5.0
    survey.fill_ranks([state])
    assert state.ranks == [6, 7] and state.ranks_source == "torchrun"


def test_assumed_ranks_count_each_nodes_workers_in_node_order() -> None:
    a, b, c = node(2, []), node(0, []), node(1, [])
    b.worker_logs = [survey.WorkerLog(k, "stdout", f"p{k}", 1.0, []) for k in range(3)]
    c.worker_logs = [survey.WorkerLog(k, "stdout", f"p{k}", 1.0, []) for k in range(2)]  # a: none yet
    survey.fill_ranks([a, b, c])
    assert (b.ranks, c.ranks, a.ranks) == ([0, 1, 2], [3, 4], [5, 6, 7])
    assert {s.ranks_source for s in (a, b, c)} == {"assumed"}


def test_the_status_table_shows_each_nodes_worker_ranks() -> None:
    states = [node(0, [0, 1]), node(1, [2, 3], "assumed")]
    states[0].last_line = "[w1] step 3"
    lines = job_table("j", states).plain_lines()
    assert lines[1].split()[:4] == ["host", "session", "node", "ranks"]
    assert lines[2].split()[2:4] == ["0", "0-1"] and lines[3].split()[2:4] == ["1", "2-3?"]
    assert "[w1] step 3" in lines[2]
    assert survey.span([4, 5]) == "4-5" and survey.span([3]) == "3" and survey.span([0, 2]) == "0,2"


# --- selecting logs ---------------------------------------------------------------------------------------------


TORCHRUN = [node(0, [0, 1]), node(1, [2, 3], host="node2")]


def test_rank_picks_one_worker_and_node_picks_a_whole_node() -> None:
    [pick] = jobs.select("j", TORCHRUN, [3], [])
    assert (pick.state.node, pick.node_log, pick.workers) == (1, False, [1])
    [pick] = jobs.select("j", TORCHRUN, [], [0])
    assert (pick.state.node, pick.node_log, pick.workers) == (0, True, None)
    assert [(p.state.node, p.workers) for p in jobs.select("j", TORCHRUN, [], [])] == [(0, None), (1, None)]
    assert [(p.state.node, p.workers) for p in jobs.select("j", TORCHRUN, [0, 1, 2], [])] == [(0, [0, 1]), (1, [0])]


def test_a_rank_or_node_the_job_lacks_is_a_usage_error_naming_the_range() -> None:
    with pytest.raises(UsageError, match=r"--rank: job j has no rank 9: its global ranks \(torchrun workers\) are 0-3"):
        jobs.select("j", TORCHRUN, [9], [])
    with pytest.raises(UsageError, match=r"--node: job j has no node 2: its nodes are 0-1"):
        jobs.select("j", TORCHRUN, [], [2])
    with pytest.raises(UsageError, match=r"no torchrun worker has started yet"):
        jobs.select("j", [node(0, []), node(1, [])], [0], [])


def test_per_gpu_ranks_select_as_before() -> None:
    gpus = [SessionState("g", "gpus", "node1", f"g-rank-{r}", r, r // 2, "running", log=f"/l/rank-{r}.log")
            for r in range(4)]
    assert [p.state.rank for p in jobs.select("g", gpus, [2], [])] == [2]
    assert [p.state.rank for p in jobs.select("g", gpus, [], [1])] == [2, 3]
    with pytest.raises(UsageError, match=r"job g has no rank 4: its ranks are 0-3$"):
        jobs.select("g", gpus, [4], [])


def test_a_rank_pick_reads_only_that_workers_files_and_says_both_numbers(tmp_path: Path) -> None:
    d = node_dir(tmp_path, "j", [1])
    (d / "node-1.log").write_text("agent\n")
    for local in (0, 1):
        for stream in ("stdout", "stderr"):
            worker_log(d, f"node-1.torchrun/j_x/attempt_0/{local}/{stream}.log", f"w{local} {stream}\n", 100.0)
    state = node(1, [2, 3], host="node1")
    state.log = str(d / "node-1.log")
    [pick] = jobs.select("j", [state], [3], [])
    out = subprocess.run(["bash", "-c", jobs.logs_payload([pick], 5, False)], capture_output=True, text=True,
                         check=True).stdout
    printed: list[str] = []
    printer = jobs.LinePrinter([state], printed.append)
    for line in out.splitlines():
        printer(line)
    assert sorted(printed) == ["[node1 node 1 rank 3 (worker 1) stderr] w1 stderr\n",
                               "[node1 node 1 rank 3 (worker 1) stdout] w1 stdout\n"]
    state.ranks_source = "assumed"
    printer = jobs.LinePrinter([state], printed.append)
    printer("j-node-1/j_x/attempt_0/0/stdout.log\tx")
    assert printed[-1] == "[node1 node 1 rank 2? (worker 0) stdout] x\n"


# --- a real cluster ----------------------------------------------------------------------------------------------


def prefixed(stdout: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2).rstrip()) for m in re.finditer(r"^\[([^\]]+)\] (.*)$", stdout, re.M)]


def test_torchrun_status_shows_ranks_and_last_lines_and_logs_pick_ranks_and_nodes(fab: Fab, job: str) -> None:
    fab.write("hosts", "node1 slots=2", "node2 slots=2")
    result = fab("launch-torchrun", "--job", job, "--hosts", "hosts", "--port", str(master_port()),
                 "--", "behave.py", "*=sleep")
    assert result.returncode == 0, result.stderr
    try:
        def settled() -> list[dict] | None:
            out = fab("status", "--json", "--job", job)
            states = [s for s in json.loads(out.stdout) if s["job"] == job] if out.returncode == 0 else []
            done = len(states) == 2 and all(len(s["ranks"]) == 2 and "does sleep" in s["last_line"] for s in states)
            return states if done else None

        states = wait_until(settled, timeout=90, interval=1)
        assert isinstance(states, list)
        by_node = {s["node"]: s for s in states}
        assert sorted(r for s in states for r in s["ranks"]) == [0, 1, 2, 3]
        for k, host in ((0, "node1"), (1, "node2")):
            s = by_node[k]
            assert s["host"] == host and s["ranks_source"] == "torchrun" and s["log_age"] is not None
            assert s["ranks"] == list(range(s["ranks"][0], s["ranks"][0] + 2))  # consecutive, by local rank
            m = re.fullmatch(rf"\[w(\d)\] rank (\d) on {host} does sleep ?", s["last_line"])
            assert m and s["ranks"][int(m.group(1))] == int(m.group(2)), s["last_line"]

        table = " ".join(fab("status", "--job", job).stdout.split())
        for s in states:
            assert f"{s['session']} {s['node']} {s['ranks'][0]}-{s['ranks'][1]} running" in table, table

        three = next(s for s in states if 3 in s["ranks"])
        out = fab("logs", "--job", job, "--rank", "3")
        assert out.returncode == 0, out.stderr
        lines = prefixed(out.stdout)
        local = three["ranks"].index(3)
        assert lines and {p for p, _ in lines} <= {f"{three['host']} node {three['node']} rank 3 (worker {local}) {x}"
                                                   for x in ("stdout", "stderr")}, lines
        assert [t for _, t in lines] == [f"rank 3 on {three['host']} does sleep"]

        out = fab("logs", "--job", job, "--node", "0")
        assert out.returncode == 0, out.stderr
        workers = {p for p, t in prefixed(out.stdout) if "worker" in p and "does sleep" in t}
        assert workers == {f"node1 node 0 rank {r} (worker {w}) stdout" for w, r in enumerate(by_node[0]["ranks"])}
        assert all(p.startswith("node1 node 0") for p, _ in prefixed(out.stdout))

        out = fab("logs", "--job", job, "--rank", "9")
        assert out.returncode == 2 and "no rank 9" in out.stderr and "0-3" in out.stderr, out.stderr

        # attach --rank is a global rank too: the node running that worker; --node a node.
        record = fake_ssh(fab)
        out = fab("attach", "--job", job, "--rank", "3")
        assert out.returncode == 0 and f"worker of node {three['node']}" in out.stderr, out.stdout + out.stderr
        argv = record.read_text().splitlines()
        assert argv[-2:] == [three["host"], f"tmux attach-session -t ={job}-node-{three['node']}"]
        out = fab("attach", "--job", job, "--node", "0")
        assert out.returncode == 0 and record.read_text().splitlines()[-2:] == ["node1", f"tmux attach-session "
                                                                                         f"-t ={job}-node-0"]
        out = fab("attach", "--job", job, "--rank", "7")
        assert out.returncode == 2 and "no rank 7" in out.stderr, out.stderr
        out = fab("logs", "--job", job, "--node", "2")
        assert out.returncode == 2 and "its nodes are 0-1" in out.stderr, out.stderr
    finally:
        fab("stop", "--job", job, "--grace", "1")
        wait_until(lambda: not live_pids(job), timeout=10)
