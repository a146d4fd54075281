"""`fab relaunch` (issue 11): the last launch again, a new run, without the hosts that failed it.

Planning the new world is pure and tested without hosts; on the fake cluster a job whose ranks on
one host fail is relaunched without that host and the rest do a real gloo all_reduce.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from fablaunch import relaunch
from fablaunch.errors import UsageError
from fablaunch.survey import SessionState
from tests.conftest import JOBS, Fab, live_pids, master_port, outputs, wait_until

SPEC = {"command": ["t.py"], "env": {"A": "1"}}


def record(world: list[str], mode: str = "gpus", **extra: Any) -> dict[str, Any]:
    return {"job": "j", "mode": mode, "run": "r1", "world": world, "spec": SPEC, **extra}


# --- planning -----------------------------------------------------------------------------------------------------


def test_dropping_a_host_recomputes_the_world_and_says_what_changed() -> None:
    done = relaunch.plan(record(["n1", "n2", "n3", "n1", "n2", "n3"]), {"n1": "--exclude"}, allow_smaller=True)
    assert done.after == ["n2", "n3", "n2", "n3"] and done.ranks(done.after) == 4
    assert done.changes() == ["without n1: --exclude", "WORLD_SIZE 6 -> 4",
                              "MASTER_ADDR moves from n1 to n2 (the first host left)"]
    assert done.spec.env == {"A": "1"} and done.count == 1 and done.of_run == "r1"
    again = relaunch.plan(record(["n2", "n3"], relaunch={"count": 1}), {}, allow_smaller=False)
    assert again.count == 2 and again.changes() == ["the same world as before"]


def test_a_smaller_world_needs_allow_smaller_and_an_empty_or_unknown_one_is_refused() -> None:
    with pytest.raises(UsageError) as smaller:
        relaunch.plan(record(["n1 slots=4", "n2 slots=4"], "torchrun"), {"n2": "x"}, allow_smaller=False)
    assert smaller.value.where == "--allow-smaller" and "4 ranks instead of 8" in str(smaller.value)
    with pytest.raises(UsageError, match="no host of job j would be left"):
        relaunch.plan(record(["n1"]), {"n1": "x"}, allow_smaller=True)
    with pytest.raises(UsageError, match="n9 is not a host of job j: its hosts are n1, n2"):
        relaunch.plan(record(["n1", "n2"]), {"n9": "x"}, allow_smaller=True)
    with pytest.raises(UsageError, match="launched before"):
        relaunch.plan({"job": "j", "mode": "gpus", "hosts": ["n1"]}, {}, allow_smaller=True)


def test_a_host_can_be_named_as_written_or_by_its_name() -> None:
    done = relaunch.plan(record(["me@n1:2222 slots=2", "n2 slots=2"], "torchrun"), {"n1": "x"}, allow_smaller=True)
    assert done.after == ["n2 slots=2"] and done.dropped == {"me@n1:2222": "x"}


def test_exclude_failed_drops_the_first_failures_host_and_the_silent_ones_only() -> None:
    def state(host: str, rank: int, state: str, ended: float | None = None, code: int | None = None) -> SessionState:
        return SessionState("j", "gpus", host, f"j-rank-{rank}", rank, 0, state, exit_code=code, ended=ended)

    states = [state("n1", 0, "failed", 20.0, 1), state("n2", 1, "failed", 10.0, 3), state("n3", 2, "killed", 30.0),
              state("n4", 3, "unknown")]
    assert relaunch.failed_hosts(states, {"n5": "timed out after 20s"}) == {
        "n5": "unreachable (timed out after 20s)", "n2": "rank 1 failed first (failed, exit 3)", "n4": "unreachable"}


# --- on the cluster -----------------------------------------------------------------------------------------------




def test_relaunch_without_the_failed_host_runs_a_smaller_world_that_all_reduces(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2", "node3", "node1", "node2", "node3")
    port = str(master_port())
    first = fab("launch-gpus", "--job", job, "--port", port, "--env", "FLAKY_HOST=node2", "--", "flaky.py")
    assert first.returncode == 0, first.stderr

    def node2_failed() -> bool:
        states = json.loads(fab("status", "--job", job, "--json").stdout or "[]")
        return sum(s["host"] == "node2" and s["state"] == "failed" for s in states) == 2

    wait_until(node2_failed, timeout=60, interval=0.5)
    running = fab("relaunch", "--job", job, "--exclude-failed", "--allow-smaller")
    assert running.returncode == 2 and "--replace" in running.stderr, running.stdout + running.stderr
    refused = fab("relaunch", "--job", job, "--exclude-failed", "--dry-run")
    assert refused.returncode == 2 and "4 ranks instead of 6" in refused.stderr, refused.stderr

    again = fab("relaunch", "--job", job, "--exclude-failed", "--allow-smaller", "--replace", "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    said = " ".join(again.stdout.split())
    assert "Relaunch 1 of job" in said  # node2 runs ranks 1 and 4: either may have failed first
    assert re.search(r"without node2: rank [14] failed first \(failed, exit 3\)", said), said
    assert "WORLD_SIZE 6 -> 4" in said and "World: 4 ranks on 2 hosts: node1, node3" in said
    seen = outputs(fab.cwd, 4)
    for rank, data in enumerate(seen):
        assert data["sum"] == 10.0 and data["world"] == 4  # all_reduce of 1..4 over the new world
        assert data["env"]["RANK"] == str(rank) and data["env"]["FABLAUNCH_HOST"] == ["node1", "node3"][rank % 2]
        assert data["env"]["WORLD_SIZE"] == "4" and data["env"]["MASTER_PORT"] == port
    assert not (fab.cwd / "out" / "4.json").exists()

    # status shows the new run only: node2's files of the run before are not the job any more.
    status = fab("status", "--job", job)
    assert f"job {job} (gpus, relaunch 1 (run " in status.stdout and "without node2" in status.stdout
    states = json.loads(fab("status", "--job", job, "--json").stdout)
    assert sorted((s["rank"], s["host"], s["state"]) for s in states) == \
        [(0, "node1", "succeeded"), (1, "node3", "succeeded"), (2, "node1", "succeeded"), (3, "node3", "succeeded")]
    assert len({s["run"] for s in states}) == 1
    assert list((JOBS / job / ".previous").glob("node1-*")), "the run before keeps its files"
    wait_until(lambda: not live_pids(job), 30)


def test_relaunch_of_a_job_without_a_record_is_exit_2(fab: Fab, job: str) -> None:
    result = fab("relaunch", "--job", job)
    assert result.returncode == 2 and f"no launch record of job {job}" in result.stderr


# --- the blocklist ------------------------------------------------------------------------------------------------


def test_a_blocked_host_is_left_out_of_a_launch_with_a_warning_until_unblocked(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2", "node3")
    blocked = fab("hosts", "--blocklist", "node2", "--reason", "NIC flaps")
    assert blocked.returncode == 0, blocked.stderr
    assert "NIC flaps" in " ".join(blocked.stdout.split())
    listed = json.loads(fab("hosts", "--json").stdout)
    assert [(h["host"], bool(h["blocked"])) for h in listed["hosts"]] == \
        [("node1", False), ("node2", True), ("node3", False)]

    dry = fab("launch-gpus", "--job", job, "--dry-run", "--json", "--", "sleeper.py")
    assert dry.returncode == 0, dry.stderr
    assert "leaving out node2, on this project's blocklist: NIC flaps" in dry.stderr
    sessions = json.loads(dry.stdout)["sessions"]
    assert [(s["host"], s["rank"]) for s in sessions] == [("node1", 0), ("node3", 1)]

    assert fab("hosts", "--unblock", "node2").returncode == 0
    again = fab("launch-gpus", "--job", job, "--dry-run", "--json", "--", "sleeper.py")
    assert [s["host"] for s in json.loads(again.stdout)["sessions"]] == ["node1", "node2", "node3"]
    assert "leaving out" not in again.stderr
    nothing = fab("hosts", "--unblock", "node2")
    assert nothing.returncode == 2 and "node2 is not blocked" in nothing.stderr
    bad = fab("hosts", "--blocklist", "no;de")
    assert bad.returncode == 2 and "metacharacter" in bad.stderr


def test_relaunch_block_puts_the_left_out_host_on_the_blocklist(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    first = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--wait", "--", "behave.py", "*=exit:0")
    assert first.returncode == 0, first.stdout + first.stderr
    again = fab("relaunch", "--job", job, "--exclude", "node2", "--allow-smaller", "--block", "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    entry = json.loads(fab("hosts", "--json").stdout)["blocklist"]["node2"]
    assert entry["reason"] == f"left out by relaunch 1 of job {job}: --exclude"


def test_a_relaunch_keeps_the_gpus_a_selection_pinned_and_does_not_select_again(tmp_path: Path) -> None:
    spec = {**SPEC, "include": "n1:2,3@n2", "exclude": None, "num_nodes": None, "num_gpus": None}
    rec = record(["n1", "n1", "n2", "n2"], spec=spec, devices={"n1": "2,3"})
    done = relaunch.plan(rec, {"n2": "x"}, allow_smaller=True)
    again = relaunch.with_world(done, tmp_path / "j.gpus")
    assert again.include is None and again.gpus == str(tmp_path / "j.gpus")
    assert again.host_env == {"n1": {"CUDA_VISIBLE_DEVICES": "2,3"}}


def test_a_torchrun_relaunch_keeps_each_nodes_workers_as_they_were(tmp_path: Path) -> None:
    rec = record(["n1 slots=2", "n2 slots=2", "n3 slots=2"], "torchrun",
                 spec={**SPEC, "nproc_per_node": "4", "include": "n1:0,1@n2:0,1@n3:0,1"})
    again = relaunch.with_world(relaunch.plan(rec, {"n3": "x"}, allow_smaller=True), tmp_path / "j.hosts")
    assert again.nproc_per_node is None and again.include is None  # the world's slots=2 count, not 4 again
    assert (tmp_path / "j.hosts").exists() is False  # with_world only plans; world_file writes
