"""`fab dump` (issue 4): py-spy stacks of every process of a job, identical ones folded, the odd one apart.

Ranks run tests/payloads/sleeper.py, which sleeps in a function no stack can hide
(`very_distinctive_sleeper_fn`), or in `odd_one_out_sleeper_fn` for the ranks told to.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fablaunch.hostfile import parse_host
from fablaunch.tasks import dump
from fablaunch.tasks.dump import Proc
from tests.cluster import Cluster
from tests.conftest import JOBS, SSH_PORT, Fab, live_pids, master_port, wait_until

SEP = dump.SEP
SPY_TEXT = """Process {pid}: /usr/bin/python3 sleeper.py
Python v3.11.7 (/usr/bin/python3.11)

Thread {tid} (idle): "MainThread"
    {fn} (sleeper.py:22)
        Locals:
            obj: <object at 0x{addr:x}>
    <module> (sleeper.py:33)
"""


def proc(host: str, pid: int, rank: int | None, fn: str = "very_distinctive_sleeper_fn", role: str = "rank",
         code: int = 0) -> Proc:
    text = SPY_TEXT.format(pid=pid, tid=pid + 7, fn=fn, addr=0x7F0000 + pid) if code == 0 else \
        f"Error: Failed to open process {pid}: Permission denied (os error 13)"
    return Proc(host, pid, 1, rank, rank, 0, "python sleeper.py", role, code, text)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join((result.stdout + "\n" + result.stderr).split())


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


# --- pure: ranges, normalizing, folding ------------------------------------------------------------------------


def test_ranges_are_written_like_dshbak() -> None:
    assert dump.ranges([0, 2, 3]) == "0,2-3"
    assert dump.ranges([7, 1, 2, 3, 9, 10, 3]) == "1-3,7,9-10"
    assert (dump.ranges([5]), dump.ranges([])) == ("5", "")


def test_stacks_differing_only_in_pids_thread_ids_and_addresses_fold() -> None:
    a, b = proc("node1", 100, 0), proc("node2", 200, 1)
    assert dump.normalize(a) == dump.normalize(b)
    assert "100" not in dump.normalize(a) and "Process" not in dump.normalize(a)
    assert dump.normalize(a).startswith('Thread (idle): "MainThread"\n    very_distinctive_sleeper_fn (sleeper.py:22)')
    assert dump.normalize(proc("node1", 100, 0, "odd_one_out_sleeper_fn")) != dump.normalize(a)
    # Failures fold by their message, pid taken out.
    bad = [proc("node1", 300, 4, code=1), proc("node2", 400, 5, code=1)]
    assert dump.normalize(bad[0]) == dump.normalize(bad[1])
    assert dump.normalize(bad[0]).startswith("py-spy failed (exit 1): Error: Failed to open process PID")
    assert "ptrace_scope" in dump.hint(bad[0])


def test_folding_puts_the_odd_rank_out_in_its_own_block() -> None:
    order = ["node1", "node2"]
    procs = [proc("node2", 21, 3), proc("node1", 11, 0), proc("node1", 12, 2, "odd_one_out_sleeper_fn"),
             proc("node2", 22, 1), proc("node1", 13, 0, "child_sleeper_fn", role="child"),
             proc("node2", 23, 3, "child_sleeper_fn", role="child"), proc("node1", 14, None, "run", role="agent"),
             proc("node2", 24, None, "run", role="agent"), proc("node2", 25, None, "other_fn", role="other")]
    folds = dump.fold(procs, order)
    assert [f.header(order) for f in folds] == [
        "ranks 0-1,3 (node1, node2)",
        "rank 2 (node1, pid 12)",
        "2 children of ranks 0,3 (node1, node2)",
        "torchrun agents (node1, node2)",
        "pid 25 (node2)",
    ]
    assert [p.pid for p in folds[0].members] == [11, 22, 21]
    mixed = dump.fold([proc("node1", 1, 0), proc("node1", 2, 0, role="child")], order)
    assert [f.header(order) for f in mixed] == ["rank 0; 1 child of rank 0 (node1)"]


def test_parse_classifies_ranks_children_and_agents() -> None:
    text = "".join([
        f"{SEP}PROC 10 1\nCMD=/usr/bin/python3 -m torch.distributed.run --nnodes 2 sleeper.py\n",
        f"{SEP}PROC 11 10\nRANK=2\nLOCAL_RANK=0\nGROUP_RANK=1\nCMD=/usr/bin/python3 -u sleeper.py\n",
        f"{SEP}PROC 12 11\nRANK=2\nLOCAL_RANK=0\nGROUP_RANK=1\nCMD=/usr/bin/python3 -c import time\n",
        f"{SEP}PROC 13 5\nRANK=3\nCMD=python x.py\n",
        f"{SEP}SPY /usr/bin/py-spy\n",
        f"{SEP}DUMP 11 0\n" + SPY_TEXT.format(pid=11, tid=11, fn="f", addr=1),
        f"{SEP}DUMP 12 1\nError: boom\n",
        f"{SEP}DUMP 13\n",
    ])
    result = dump.parse("node2", text)
    got = [(p.pid, p.role, p.rank, p.local_rank, p.node, p.exit_code) for p in result.procs]
    assert got == [(10, "agent", None, None, None, None), (11, "rank", 2, 0, 1, 0), (12, "child", 2, 0, 1, 1),
                   (13, "rank", 3, None, None, -1)]
    assert result.procs[1].dump.startswith("Process 11:") and result.procs[2].dump == "Error: boom"
    assert result.problem == ""
    missing = dump.parse("node2", f"{SEP}PROC 11 10\nRANK=0\nCMD=python\n{SEP}NOSPY\n")
    assert "py-spy not found" in missing.problem and "pip install py-spy" in missing.problem
    assert missing.procs[0].exit_code is None


# --- the payload in a real bash, without SSH ---------------------------------------------------------------------


def test_payload_finds_the_jobs_python_by_marker_and_dumps_it(tmp_path: Path) -> None:
    host = parse_host("localhost", "test")
    code = "import time\ndef payload_test_sleeper_fn():\n    time.sleep(120)\nprint('go', flush=True)\n" \
           "payload_test_sleeper_fn()\n"
    env = {**os.environ, "FABLAUNCH_TAG": "pj@localhost", "RANK": "5", "LOCAL_RANK": "1"}
    marked = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-c", code], env={**env, "FABLAUNCH_TAG": "other@localhost"},
                             stdout=subprocess.PIPE, text=True)
    try:
        assert marked.stdout and marked.stdout.readline() == "go\n"
        out = subprocess.run(["bash", "-s"], input=dump.payload("pj", host, [], False), capture_output=True,
                             text=True, timeout=120)
        result = dump.parse("localhost", out.stdout)
        assert [(p.pid, p.role, p.rank, p.local_rank, p.ok) for p in result.procs] == [
            (marked.pid, "rank", 5, 1, True)], out
        assert "payload_test_sleeper_fn" in result.procs[0].dump
        only = subprocess.run(["bash", "-s"], input=dump.payload("pj", host, [4], False), capture_output=True,
                              text=True, timeout=120)
        assert dump.parse("localhost", only.stdout).procs == []
    finally:
        for p in (marked, other):
            p.kill()
            p.wait()


# --- the real CLI against fake hosts ----------------------------------------------------------------------------


def logged(job: str, where: dict[int, str], jobs: Path = JOBS) -> bool:
    """Every rank has printed its line, so it sleeps in its function now."""
    for rank, host in where.items():
        log = jobs / job / host / f"rank-{rank}.log"
        if not (log.exists() and "sleeps" in log.read_text()):
            return False
    return True


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def blocks(stdout: str) -> dict[str, str]:
    """`fab dump`'s output as {header: stack}: each block starts with a rule line, `header ─────`."""
    found: dict[str, str] = {}
    header = None
    for line in stdout.splitlines():
        m = re.fullmatch(r"(\S.*?) ─+", line.rstrip())
        if m:
            header = m.group(1)
            found[header] = ""
        elif header is not None:
            found[header] += line + "\n"
    return found


def test_per_gpu_ranks_over_two_hosts_fold_and_the_odd_one_stands_out(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2", "node1", "node2")
    ok(fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "sleeper.py", "odd=2", "child=3"))
    wait_until(lambda: logged(job, {0: "node1", 1: "node2", 2: "node1", 3: "node2"}), timeout=60)
    wait_until(lambda: any("child_sleeper_fn" in cmdline(p) for p in live_pids(job)), timeout=30)
    time.sleep(0.5)  # the child's line is printed before it reaches its function; give it a moment

    shown = blocks(ok(fab("dump", "--job", job)).stdout)
    [child] = [h for h in shown if h.startswith("1 child of rank 3 (node2, pid ")]
    [odd] = [h for h in shown if h.startswith("rank 2 (node1, pid ")]
    assert set(shown) == {"ranks 0-1,3 (node1, node2)", odd, child}, shown
    assert "very_distinctive_sleeper_fn (sleeper.py:" in shown["ranks 0-1,3 (node1, node2)"]
    assert "odd_one_out_sleeper_fn" in shown[odd] and "very_distinctive" not in shown[odd]
    assert "child_sleeper_fn" in shown[child]

    data = json.loads(ok(fab("dump", "--job", job, "--json")).stdout)
    assert data["job"] == job and data["problems"] == []
    assert [(g["ranks"], g["hosts"]) for g in data["groups"]] == [
        ([0, 1, 3], ["node1", "node2"]), ([2], ["node1"]), ([3], ["node2"])]
    assert sorted((p["host"], p["rank"], p["role"], p["ok"]) for p in data["processes"]) == [
        ("node1", 0, "rank", True), ("node1", 2, "rank", True), ("node2", 1, "rank", True),
        ("node2", 3, "child", True), ("node2", 3, "rank", True)]
    for p in data["processes"]:
        assert f"Process {p['pid']}:" in p["dump"]

    # Only some ranks, with locals; and without --job, the job launched last from here.
    some = json.loads(ok(fab("dump", "--rank", "2", "--rank", "3", "--locals", "--json")).stdout)
    assert some["job"] == job
    assert sorted((p["rank"], p["role"]) for p in some["processes"]) == [(2, "rank"), (3, "child"), (3, "rank")]
    [three] = [g for g in some["groups"] if g["members"][0]["role"] == "rank" and g["ranks"] == [3]]
    assert "sleeper_local: " in three["stack"] and "fablaunch-local-42" in three["stack"]


def test_torchrun_workers_are_dumped_by_rank_and_agents_too(fab: Fab, job: str) -> None:
    fab.write("hosts", "node1 slots=1", "node2 slots=1")
    ok(fab("launch-torchrun", "--job", job, "--hosts", "hosts", "--port", str(master_port()),
           "--", "sleeper.py", "odd=1"))

    def workers_sleep() -> bool:
        logs = [p.read_text() for p in (JOBS / job).glob("node*/node-*.torchrun/*/attempt_*/*/stdout.log")]
        return sum("sleeps" in text for text in logs) == 2

    wait_until(workers_sleep, timeout=120, interval=0.5)
    data = json.loads(ok(fab("dump", "--job", job, "--json")).stdout)
    agents = sorted(p["host"] for p in data["processes"] if p["role"] == "agent")
    workers = {p["rank"]: p for p in data["processes"] if p["role"] == "rank"}
    assert agents == ["node1", "node2"] and len(data["processes"]) == 4, data["processes"]
    # The rendezvous numbers the nodes in any order: one worker per node, its rank its node's.
    assert sorted(workers) == [0, 1] and {workers[r]["host"] for r in workers} == {"node1", "node2"}
    assert all((w["local_rank"], w["node"]) == (0, r) for r, w in workers.items())
    by_header = {g["header"].split(" (")[0]: g for g in data["groups"]}
    assert "very_distinctive_sleeper_fn" in by_header["rank 0"]["stack"]
    assert "odd_one_out_sleeper_fn" in by_header["rank 1"]["stack"]
    agent_groups = [g for g in data["groups"] if g["members"][0]["role"] == "agent"]
    assert agent_groups and all("torch/distributed/" in g["stack"] for g in agent_groups), agent_groups


# --- a host without py-spy ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two fake hosts on 127.0.0.51-52; node2 has no py-spy.

    This machine's ~/.bashrc puts pyenv's shims (py-spy's among them) first on every ssh session's
    PATH, so node2 gets a HOME of its own, without that file, and the system's PATH only: a fresh host.
    """
    root = tmp_path_factory.mktemp("bare")
    home = root / "home2"
    home.mkdir()
    system = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    with Cluster(root, 2, port=SSH_PORT, base=51, env={"PATH": os.environ["PATH"]},
                 host_env={"node2": {"PATH": system, "HOME": str(home)}}) as c:
        yield c


def test_a_host_without_py_spy_says_how_to_install_it_and_fails(fab: Fab, job: str, bare: Cluster) -> None:
    here = Fab(bare, fab.cwd)
    home2 = Path(bare.root / "home2")
    assert not Path("/usr/bin/py-spy").exists() and not (home2 / ".local/bin/py-spy").exists()
    try:
        here.write("gpus", "node1", "node2")
        # The system python: no py-spy beside it, so node2 cannot find one anywhere.
        ok(here("launch-gpus", "--job", job, "--python", "/usr/bin/python3", "--port", str(master_port()),
                "--", "sleeper.py"))
        wait_until(lambda: logged(job, {0: "node1"}) and logged(job, {1: "node2"}, home2 / ".fablaunch" / "jobs"),
                   timeout=60)
        result = here("dump", "--job", job)
        assert result.returncode == 1, output(result)
        assert "node2: py-spy not found" in output(result) and "pip install py-spy" in output(result)
        shown = blocks(result.stdout)
        [header] = [h for h in shown if h.startswith("rank 0 (node1, pid ")]
        assert "very_distinctive_sleeper_fn" in shown[header] and len(shown) == 1
        data: dict[str, Any] = json.loads(here("dump", "--job", job, "--json").stdout)
        assert [p["host"] for p in data["problems"]] == ["node2"]
        assert [(p["host"], p["rank"], p["exit_code"]) for p in data["processes"]] == [
            ("node1", 0, 0), ("node2", 1, None)]
    finally:
        for name in bare.names:
            for line in bare.tmux(name, "ls", "-F", "#{session_name}").stdout.split():
                if line.startswith(job):
                    bare.tmux(name, "kill-session", "-t", f"={line}:")
