"""The Slurm backend against a real Slurm (issue 10): slurmctld and three slurmd on this machine.

Real `fab` command lines submit real batch scripts; ranks run gloo all_reduce across the three
nodes. Every outcome is checked through the files the ranks wrote, Slurm's own commands and /proc.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fablaunch.spec import JobSpec
from tests.conftest import FAB, PAYLOADS, REPO, alive, tagged_pids, wait_until
from tests.slurm_cluster import SlurmCluster


class SlurmFab:
    """`fab -r REPO ...` in a project directory, with the cluster's SLURM_CONF."""

    def __init__(self, slurm: SlurmCluster, cwd: Path) -> None:
        self.slurm, self.cwd = slurm, cwd
        self.env = {**os.environ, **slurm.env, "COLUMNS": "200"}

    def __call__(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run([FAB, "-r", str(REPO), *args], cwd=self.cwd, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def slurm_cmd(self, *args: str) -> str:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=30).stdout

    def files(self, job: str) -> Path:
        return self.cwd / ".fablaunch" / "slurm" / job


@pytest.fixture
def sfab(slurm: SlurmCluster, tmp_path: Path) -> SlurmFab:
    (tmp_path / "out").mkdir()
    return SlurmFab(slurm, tmp_path)


def said(result: subprocess.CompletedProcess[str]) -> str:
    return f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"


def test_a_per_gpu_job_runs_one_rank_per_task_with_the_env_contract_and_exact_argv(sfab: SlurmFab) -> None:
    job = "sl-gpus"
    result = sfab("launch-gpus", "--slurm", "--job", job, "--nodes", "3", "--gpus-per-node", "2", "--wait",
                  "--env", "EXTRA=a b 'c' $HOME", "--env", "API_TOKEN=hush-123",
                  "--", str(PAYLOADS / "probe.py"), "it's", "two words", "$x")
    assert result.returncode == 0, said(result)
    seen = {int(p.stem): json.loads(p.read_text()) for p in (sfab.cwd / "out").glob("*.json")}
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]
    nodes = [f"node{i}" for i in (1, 2, 3)]
    for rank, data in seen.items():
        env = data["env"]
        assert data["sum"] == 21.0 and data["world"] == 6
        assert data["argv"] == ["it's", "two words", "$x"]
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == \
            (str(rank), str(rank % 2), "6", "2")
        assert env["GROUP_RANK"] == env["NODE_RANK"] == str(rank // 2)
        assert env["FABLAUNCH_HOST"] == nodes[rank // 2]
        assert env["MASTER_ADDR"] == "127.0.0.1"  # NodeAddr of node1, not its name
        assert env["EXTRA"] == "a b 'c' $HOME" and env["OMP_NUM_THREADS"] == "1"
        assert env["TORCHELASTIC_ERROR_FILE"] == str(sfab.files(job) / nodes[rank // 2] / f"rank-{rank}.error.json")
        record = json.loads((sfab.files(job) / nodes[rank // 2] / f"rank-{rank}.exit").read_text())
        assert record["exit_code"] == 0
    ports = {d["env"]["MASTER_PORT"] for d in seen.values()}
    assert len(ports) == 1 and 20000 <= int(ports.pop()) < 40000  # derived from the job id

    # The secret is only in the 0600 env file: not in the batch script, sbatch's argv or Slurm's view.
    script = sfab.files(job) / "job.sbatch"
    assert stat.S_IMODE(script.stat().st_mode) == 0o600
    assert stat.S_IMODE((sfab.files(job) / "env.sh").stat().st_mode) == 0o600
    assert "hush-123" not in script.read_text()
    job_id = json.loads((sfab.cwd / ".fablaunch" / "records" / f"{job}.json").read_text())["slurm_job"]
    assert "hush-123" not in sfab.slurm_cmd("scontrol", "show", "job", "-dd", job_id)

    status = json.loads(sfab("status", "--job", job, "--json").stdout)
    assert sorted((s["rank"], s["host"], s["state"]) for s in status) == \
        [(r, nodes[r // 2], "succeeded") for r in range(6)]
    logs = sfab("logs", "--job", job, "--rank", "3")
    assert logs.returncode == 0, said(logs)
    # probe prints nothing itself; torch may warn (no numpy on a fresh machine): only rank 3's lines show
    assert all(line.startswith("[node2 rank 3] ") for line in logs.stdout.splitlines()), logs.stdout
    waited = sfab("wait", "--job", job, "--json")
    assert waited.returncode == 0 and json.loads(waited.stdout)["exit_code"] == 0


def test_a_torchrun_job_runs_one_torchrun_per_node_meeting_at_the_first(sfab: SlurmFab) -> None:
    job = "sl-torchrun"
    result = sfab("launch-torchrun", "--slurm", "--job", job, "--nodes", "3", "--nproc-per-node", "2", "--wait",
                  "--", str(PAYLOADS / "probe.py"), "a b")
    assert result.returncode == 0, said(result)
    status = json.loads(sfab("status", "--job", job, "--json").stdout)
    assert sorted((s["node"], s["host"], s["state"]) for s in status) == \
        [(0, "node1", "succeeded"), (1, "node2", "succeeded"), (2, "node3", "succeeded")]
    seen = {int(p.stem): json.loads(p.read_text()) for p in (sfab.cwd / "out").glob("*.json")}
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]
    assert all(d["sum"] == 21.0 and d["world"] == 6 and d["argv"] == ["a b"] for d in seen.values())
    assert sorted(d["env"]["FABLAUNCH_HOST"] for d in seen.values()) == ["node1", "node1", "node2", "node2",
                                                                         "node3", "node3"]


def test_the_first_failing_rank_is_named_and_wait_gives_its_code(sfab: SlurmFab) -> None:
    job = "sl-fail"
    result = sfab("launch-gpus", "--slurm", "--job", job, "--nodes", "3", "--gpus-per-node", "2",
                  *[x for r in (0, 1, 2, 3, 5) for x in ("--env", f"DELAY_{r}=4")],
                  "--", str(PAYLOADS / "behave.py"), "4=exit:3", "*=exit:0")
    assert result.returncode == 0, said(result)
    waited = sfab("wait", "--job", job)
    assert waited.returncode == 3, said(waited)
    assert "first failure: rank 4 on node3 (exit 3)" in " ".join(waited.stdout.split())
    first = json.loads(sfab("errors", "--job", job, "--json").stdout)["first"]
    assert (first["rank"], first["host"], first["exit_code"]) == (4, "node3", 3)


def test_stop_signals_every_task_and_leaves_no_process(sfab: SlurmFab) -> None:
    job = "sl-stop"
    result = sfab("launch-gpus", "--slurm", "--job", job, "--nodes", "3", "--gpus-per-node", "2",
                  "--", str(PAYLOADS / "behave.py"), "0=sleep", "1=deaf:INT", "2=deaf:INT,TERM", "*=spawn")
    assert result.returncode == 0, said(result)

    def all_started() -> bool:
        states = json.loads(sfab("status", "--job", job, "--json").stdout or "[]")
        return len(states) == 6 and all(s["state"] == "running" and "does" in s["last_line"] for s in states)

    wait_until(all_started, timeout=60, interval=1)
    pids = tagged_pids(job)
    assert pids
    stopped = sfab("stop", "--job", job, "--grace", "2")
    assert stopped.returncode == 0, said(stopped)
    text = " ".join(stopped.stdout.split())
    assert "rank 0, rank 3, rank 4, rank 5: exited on SIGINT" in text and "rank 1: needed SIGTERM" in text
    assert "rank 2: KILL needed" in text
    assert "SIGINT to every task" in stopped.stderr
    wait_until(lambda: not any(alive(p) for p in pids) and not tagged_pids(job), timeout=30)
    states = {s["rank"]: s["state"] for s in json.loads(sfab("status", "--job", job, "--json").stdout)}
    assert states[0] == "killed" and states[2] in ("killed", "cancelled")  # SIGKILLed: by the sweep or Slurm
    again = sfab("stop", "--job", job)
    assert again.returncode == 0 and "Nothing to stop" in again.stdout, said(again)


def _idle_gpu_on_every_node(sfab: SlurmFab) -> None:
    """A stand-in nvidia-smi on the PATH every step inherits: one GPU per node at idle power (11 %)."""
    bin_dir = sfab.cwd / "bin"
    bin_dir.mkdir()
    shutil.copy(PAYLOADS / "fake_nvidia_smi.py", bin_dir / "nvidia-smi")
    (bin_dir / "nvidia-smi").chmod(0o755)
    figures = {"gpus": [{"index": 0, "uuid": "GPU-0", "utilization.gpu": 100, "power.draw": "77.00",
                         "power.limit": "700.00", "memory.used": 1024, "memory.total": 81920}], "apps": []}
    (sfab.cwd / "smi.json").write_text(json.dumps(figures))
    sfab.env.update(PATH=f"{bin_dir}:{sfab.env['PATH']}", FAKE_NVIDIA_SMI=str(sfab.cwd / "smi.json"))


def _running(sfab: SlurmFab, job: str, count: int, text: str) -> None:
    def started() -> bool:
        states = json.loads(sfab("status", "--job", job, "--json").stdout or "[]")
        return len(states) == count and all(s["state"] == "running" and text in s["last_line"] for s in states)

    wait_until(started, timeout=90, interval=1)


def test_top_and_dump_ask_the_jobs_nodes_through_a_step_of_the_job(sfab: SlurmFab) -> None:
    job = "sl-top"
    _idle_gpu_on_every_node(sfab)
    result = sfab("launch-gpus", "--slurm", "--job", job, "--nodes", "3", "--gpus-per-node", "2",
                  "--", str(PAYLOADS / "sleeper.py"))
    assert result.returncode == 0, said(result)
    _running(sfab, job, 6, "sleeps")

    top = sfab("top", "--json", "--job", job, "--stall", "1000")
    assert top.returncode == 0, said(top)
    data = json.loads(top.stdout)
    assert [(h["host"], h["status"], h["totals"]["power_pct"]) for h in data["hosts"]] == \
        [("node1", "ok", 11.0), ("node2", "ok", 11.0), ("node3", "ok", 11.0)]
    assert data["sessions"] == {"running": 6}
    assert sorted((f["rank"], f["host"]) for f in data["flagged"]) == [(r, f"node{r // 2 + 1}") for r in range(6)]
    assert all(f["reasons"] == ["GPU 0 at 11% of power limit (near idle)"] for f in data["flagged"])

    dumped = sfab("dump", "--json", "--job", job)
    assert dumped.returncode == 0, said(dumped)
    [group] = json.loads(dumped.stdout)["groups"]
    assert group["ranks"] == [0, 1, 2, 3, 4, 5] and group["hosts"] == ["node1", "node2", "node3"]
    assert "very_distinctive_sleeper_fn" in group["stack"]
    one = sfab("dump", "--job", job, "--rank", "4")
    assert one.returncode == 0 and "rank 4 (node3, pid" in one.stdout, said(one)

    assert sfab("stop", "--job", job).returncode == 0
    late = sfab("dump", "--job", job)
    assert late.returncode == 1 and "no node runs it now" in late.stderr, said(late)


def test_top_judges_a_torchrun_node_by_its_workers_logs_in_the_shared_directory(sfab: SlurmFab) -> None:
    job = "sl-top-tr"
    _idle_gpu_on_every_node(sfab)
    result = sfab("launch-torchrun", "--slurm", "--job", job, "--nodes", "2", "--nproc-per-node", "2",
                  "--", str(PAYLOADS / "sleeper.py"))
    assert result.returncode == 0, said(result)

    def workers_sleep() -> bool:
        logs = [p.read_text() for p in sfab.files(job).glob("node*/node-*.torchrun/*/attempt_*/*/stdout.log")]
        return sum("sleeps" in text for text in logs) == 4

    wait_until(workers_sleep, timeout=120, interval=0.5)

    def silent() -> list[dict[str, Any]] | None:
        top = sfab("top", "--json", "--job", job, "--stall", "1")
        flagged = json.loads(top.stdout)["flagged"] if top.returncode == 0 else []
        return flagged if len(flagged) == 2 and all(len(f["reasons"]) == 2 for f in flagged) else None

    flagged = wait_until(silent, timeout=60, interval=1)
    assert isinstance(flagged, list)
    assert [(f["host"], f["node"]) for f in flagged] == [("node1", 0), ("node2", 1)]
    for f in flagged:
        assert f["reasons"][0].startswith("worker ") and " log silent for " in f["reasons"][0], f
        assert f["reasons"][1] == "GPU 0 at 11% of power limit (near idle)"
    assert sfab("stop", "--job", job).returncode == 0


def test_follow_waits_for_a_pending_job_and_ends_with_it(sfab: SlurmFab) -> None:
    job = "sl-follow"
    result = sfab("launch-gpus", "--slurm", "--job", job, "--nodes", "2", "--sbatch-arg=--begin=now+4",
                  "--env", "DELAY_1=2", "--follow", "--", str(PAYLOADS / "behave.py"), "0=exit:0", "1=exit:3")
    assert result.returncode == 3, said(result)
    assert f"job {job} has not started yet (PENDING (BeginTime: its --begin time has not come))" in result.stderr
    assert "[node1 rank 0] rank 0 on node1 does exit 0" in result.stdout
    assert "[node2 rank 1] rank 1 on node2 does exit 3" in result.stdout
    assert "first failure: rank 1 on node2 (exit 3)" in " ".join(result.stdout.split())
    again = sfab("logs", "--job", job, "--follow", timeout=60)  # an ended job: its logs, then the end
    assert again.returncode == 0 and "rank 1 on node2 does exit 3" in again.stdout, said(again)
    left = subprocess.run(["pgrep", "-f", f"tail -n .* -F {sfab.files(job)}"], capture_output=True, text=True)
    assert left.stdout == "", "a tail of the job's logs was left running"


def test_inside_an_allocation_the_job_is_a_step_of_it_and_stop_touches_only_that_step(sfab: SlurmFab) -> None:
    granted = subprocess.run(["salloc", "-N3", "--exclusive", "--no-shell"], env=sfab.env, capture_output=True,
                             text=True, timeout=60)
    alloc = granted.stderr.split("Granted job allocation ")[1].split()[0]
    users = subprocess.Popen(["srun", f"--jobid={alloc}", "--overlap", "--job-name=users-own", "-N3",
                              "--ntasks-per-node=1", "sleep", "600"], env=sfab.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    sfab.env["SLURM_JOB_ID"] = alloc

    def steps() -> list[str]:
        return sfab.slurm_cmd("squeue", "-h", "-s", "-j", alloc, "-o", "%j").split()

    try:
        wait_until(lambda: "users-own" in steps(), timeout=30)
        job = "sl-alloc"
        result = sfab("launch-gpus", "--slurm", "--job", job, "--nodes", "2", "--gpus-per-node", "2", "--wait",
                      "--", str(PAYLOADS / "probe.py"), "x y")
        assert result.returncode == 0, said(result)
        assert f"as step fablaunch-{job}-" in result.stdout and f"of Slurm allocation {alloc}" in result.stdout
        seen = {int(p.stem): json.loads(p.read_text()) for p in (sfab.cwd / "out").glob("*.json")}
        assert sorted(seen) == [0, 1, 2, 3]
        assert all(d["sum"] == 10.0 and d["world"] == 4 and d["argv"] == ["x y"] for d in seen.values())
        assert sorted(d["env"]["FABLAUNCH_HOST"] for d in seen.values()) == ["node1", "node1", "node2", "node2"]
        assert not (sfab.files(job) / "job.sbatch").exists() and (sfab.files(job) / "step.sh").exists()

        for flags, named in ((["--partition", "debug"], "--partition"), (["--nodes", "4"], "--nodes")):
            refused = sfab("launch-gpus", "--slurm", "--job", "sl-alloc-bad", *flags, "--", "x.py")
            assert refused.returncode == 2 and named in refused.stderr, said(refused)
        assert not sfab.files("sl-alloc-bad").exists()

        job = "sl-alloc-stop"
        result = sfab("launch-gpus", "--slurm", "--job", job, "--nodes", "3", "--gpus-per-node", "2",
                      "--", str(PAYLOADS / "behave.py"), "1=deaf:INT", "*=spawn")
        assert result.returncode == 0, said(result)
        _running(sfab, job, 6, "does")
        pids = tagged_pids(job)
        stopped = sfab("stop", "--job", job, "--grace", "2")
        assert stopped.returncode == 0, said(stopped)
        text = " ".join(stopped.stdout.split())
        assert "rank 0, rank 2, rank 3, rank 4, rank 5: exited on SIGINT" in text and "rank 1: needed SIGTERM" in text
        wait_until(lambda: not any(alive(p) for p in pids) and not tagged_pids(job), timeout=30)
        # The user's own step and the allocation itself are untouched.
        wait_until(lambda: steps() == ["users-own"], timeout=30)  # fablaunch's own sweep steps end too
        assert sfab.slurm_cmd("squeue", "-h", "-j", alloc, "-o", "%T").strip() == "RUNNING"
        assert users.poll() is None
        again = sfab("stop", "--job", job)
        assert again.returncode == 0 and "Nothing to stop" in again.stdout, said(again)
    finally:
        users.kill()
        sfab.slurm_cmd("scancel", alloc)
        sfab.slurm.wait_idle()  # the next test's jobs must not wait for this allocation's nodes


def test_a_derived_port_that_is_taken_on_the_first_node_moves_to_a_free_one(sfab: SlurmFab) -> None:
    job = "sl-port"
    result = sfab("launch-gpus", "--slurm", "--job", job, "--nodes", "2", "--sbatch-arg=--begin=now+4",
                  "--", str(PAYLOADS / "probe.py"))
    assert result.returncode == 0, said(result)
    job_id = json.loads((sfab.cwd / ".fablaunch" / "records" / f"{job}.json").read_text())["slurm_job"]
    derived = 20000 + int(job_id) % 20000
    with socket.socket() as holder:  # another program holds the port on node1 (this machine) before the job starts
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("", derived))
        holder.listen()
        waited = sfab("wait", "--job", job)
    assert waited.returncode == 0, said(waited)
    seen = [json.loads(p.read_text()) for p in (sfab.cwd / "out").glob("*.json")]
    assert len(seen) == 2 and {d["env"]["MASTER_PORT"] for d in seen} == {str(derived + 1)}


def test_slurms_reasons_for_waiting_are_said_in_words() -> None:
    from fablaunch.slurm import JobInfo, why_waiting

    assert why_waiting(JobInfo("7", "PENDING", "PartitionTimeLimit")) == \
        "PENDING (PartitionTimeLimit: its --time is over the partition's limit: it will not start)"
    assert why_waiting(JobInfo("7", "PENDING", "ReqNodeNotAvail,_UnavailableNodes:node3")).endswith(
        "node3: a node it needs is down, drained or reserved)")
    assert why_waiting(JobInfo("7", "PENDING", "SomethingNew")) == "PENDING (SomethingNew)"
    assert why_waiting(JobInfo("7", "RUNNING", "None")) == "RUNNING"


def test_a_pending_job_shows_slurms_reason_and_stop_cancels_it(sfab: SlurmFab) -> None:
    job = "sl-pending"
    sfab.slurm.wait_idle()  # with a node still busy, Slurm gives Resources as the reason, not BeginTime
    result = sfab("launch-gpus", "--slurm", "--job", job, "--nodes", "2", "--sbatch-arg=--begin=now+1hour",
                  "--", str(PAYLOADS / "sleeper.py"))
    assert result.returncode == 0, said(result)
    [state] = json.loads(sfab("status", "--job", job, "--json").stdout)
    assert state["state"] == "pending" and "BeginTime" in state["last_line"]
    timed = sfab("wait", "--job", job, "--timeout", "2")
    assert timed.returncode == 124, said(timed)
    stopped = sfab("stop", "--job", job)
    assert stopped.returncode == 0, said(stopped)
    [state] = json.loads(sfab("status", "--job", job, "--json").stdout)
    assert state["state"] == "cancelled"


def test_dry_run_prints_the_batch_script_and_submits_nothing(sfab: SlurmFab) -> None:
    result = sfab("launch-gpus", "--slurm", "--job", "sl-dry", "--nodes", "2", "--partition", "debug",
                  "--time", "0:10:00", "--env", "API_TOKEN=hush", "--dry-run", "--", "train.py")
    assert result.returncode == 0, said(result)
    for line in ("#SBATCH --nodes=2", "#SBATCH --partition=debug", "#SBATCH --time=0:10:00",
                 "srun --kill-on-bad-exit=0"):
        assert line in result.stdout
    assert "hush" not in result.stdout and "API_TOKEN=*****" in result.stdout
    assert not sfab.files("sl-dry").exists()
    assert "sl-dry" not in sfab.slurm_cmd("squeue", "-h", "-o", "%j")
    # Inside an allocation: the script that starts a step of it, here.
    sfab.env["SLURM_JOB_ID"] = "999"
    inside = sfab("launch-gpus", "--slurm", "--job", "sl-dry", "--nodes", "2", "--dry-run", "--", "train.py")
    assert inside.returncode == 0, said(inside)
    assert "step.sh (mode 0600; run here, detached: a step of allocation 999)" in inside.stdout
    assert "--job-name=fablaunch-sl-dry-" in inside.stdout and "#SBATCH" not in inside.stdout
    assert not sfab.files("sl-dry").exists()


@pytest.mark.parametrize(("flags", "named"), [
    (["--partition", "nope"], "invalid partition"),
    (["--nodes", "0"], "--nodes"),
    (["--nodes", "9"], "Slurm refuses"),
    (["--time", "soon"], "--time"),
    (["--sbatch-arg=qos"], "--sbatch-arg"),
    (["--nodelist", "node1;rm"], "--nodelist"),
], ids=["partition", "zero nodes", "too many nodes", "time", "sbatch arg", "nodelist"])
def test_bad_slurm_options_exit_2_and_submit_nothing(sfab: SlurmFab, flags: list[str], named: str) -> None:
    before = sfab.slurm_cmd("squeue", "-h", "-o", "%i")
    result = sfab("launch-gpus", "--slurm", "--job", "sl-bad", *flags, "--", "train.py")
    assert result.returncode == 2 and named in result.stderr, said(result)
    assert sfab.slurm_cmd("squeue", "-h", "-o", "%i") == before
    assert not (sfab.cwd / ".fablaunch" / "records" / "sl-bad.json").exists()


def test_slurm_flags_need_slurm(sfab: SlurmFab) -> None:
    result = sfab("launch-gpus", "--nodes", "2", "--", "train.py")
    assert result.returncode == 2 and "--nodes" in result.stderr and "--slurm" in result.stderr, said(result)


def test_attach_opens_a_shell_on_the_ranks_node_inside_the_job(sfab: SlurmFab) -> None:
    job = "sl-attach"
    result = sfab("launch-gpus", "--slurm", "--job", job, "--nodes", "2", "--", str(PAYLOADS / "sleeper.py"))
    assert result.returncode == 0, said(result)
    try:
        wait_until(lambda: any(s["state"] == "running" and s["rank"] == 1 for s in
                               json.loads(sfab("status", "--job", job, "--json").stdout or "[]")), timeout=60)
        # srun --pty needs a terminal: `script` gives it one; the shell runs one command and exits.
        fab = " ".join(["fab", "-r", str(REPO), "attach", "--job", job, "--rank", "1"])
        shell = subprocess.run(["script", "-qec", fab, "/dev/null"], input="echo on-$SLURMD_NODENAME; exit\n",
                               cwd=sfab.cwd, env=sfab.env, capture_output=True, text=True, timeout=60)
        assert "on-node2" in shell.stdout, shell.stdout + shell.stderr
    finally:
        assert sfab("stop", "--job", job, "--grace", "1").returncode == 0


def test_doctor_checks_slurm_the_partition_and_each_node(sfab: SlurmFab) -> None:
    result = sfab("doctor", "--slurm", "--nodes", "3", "--json")
    assert result.returncode == 0, said(result)
    checks = {c["check"]: c for c in json.loads(result.stdout)}
    assert checks["partition"]["status"] == "ok" and "debug is up" in checks["partition"]["detail"]
    assert {f"node node{i}" for i in (1, 2, 3)} <= set(checks)
    assert all("torch" in checks[f"node node{i}"]["detail"] for i in (1, 2, 3))
    missing = sfab("doctor", "--slurm", "--partition", "nope")
    assert missing.returncode == 1 and "no partition nope" in missing.stdout, said(missing)
    many = json.loads(sfab("doctor", "--slurm", "--nodes", "5", "--json").stdout)
    assert any(c["check"] == "nodes" and c["status"] == "warn" for c in many)

    # A GPU job: every node must have the GPUs (none here: no nvidia-smi) and a torch with NCCL (CPU torch).
    bare = sfab("doctor", "--slurm", "--nodes", "2", "--gpus-per-node", "1", "--json")
    assert bare.returncode == 1, said(bare)
    details = {c["check"]: c["detail"] for c in json.loads(bare.stdout)}
    assert "no nvidia-smi (no GPU)" in details["node node1"] and "torch has no NCCL" in details["node node2"]
    _idle_gpu_on_every_node(sfab)
    two = json.loads(sfab("doctor", "--slurm", "--nodes", "1", "--gpus-per-node", "2", "--json").stdout)
    assert "1 GPUs, 2 wanted" in {c["check"]: c["detail"] for c in two}["node node1"]
    gpu_flags_alone = sfab("doctor", "--gpus-per-node", "2")
    assert gpu_flags_alone.returncode == 2 and "--slurm" in gpu_flags_alone.stderr, said(gpu_flags_alone)


def test_a_node_with_the_gpus_and_nccl_passes_and_says_what_it_has() -> None:
    from fablaunch import slurm

    p = dataclasses.replace(slurm.plan(JobSpec(command=["t.py"], slurm={"gpus_per_node": 8}), "gpus"),
                            logdir="/shared")
    fields = {"python": "3.11.7", "torch": "2.13.0", "nccl": "2.27.3", "gpus": "8", "writable": "yes"}
    assert slurm._node_verdict(p, fields) == \
        ("ok", "python 3.11.7, torch 2.13.0, NCCL 2.27.3, 8 GPUs, /shared writable")
    assert slurm._node_verdict(p, {**fields, "gpus": "4"}) == ("fail", "4 GPUs, 8 wanted")
    assert slurm._node_verdict(p, {"python": "-", "writable": "no"})[1] == \
        "no interpreter " + p.python + "; no nvidia-smi (no GPU); cannot write /shared"


def test_how_a_slurm_task_ended_comes_from_its_signal_else_from_when_it_ended() -> None:
    from fablaunch.jobs import _slurm_end
    from fablaunch.survey import SessionState

    phases = [("INT", 100.0), ("TERM", 110.0), ("KILL", 113.0)]

    def task(state: str, signal: int | None = None, ended: float | None = None) -> SessionState:
        return SessionState("j", "gpus", "node1", "j-rank-0", 0, 0, state, signal=signal, ended=ended)

    assert _slurm_end(task("killed", 15, 111.0), phases) == "TERM"
    assert _slurm_end(task("failed", ended=104.0), phases) == "INT"  # caught SIGINT, exited with its own code
    assert _slurm_end(task("succeeded", ended=112.0), phases) == "TERM"
    assert _slurm_end(task("failed", ended=50.0), phases) is None  # ended before the stop: not its doing
    assert _slurm_end(task("cancelled"), phases) == "KILL"
    assert _slurm_end(task("running"), phases) is None


def test_a_task_with_a_hostile_missing_workdir_says_so_and_runs_nothing(tmp_path: Path) -> None:
    from fablaunch import slurm
    from fablaunch.spec import JobSpec

    workdir = tmp_path / 'no "$(touch pwned)"'
    p = slurm.plan(JobSpec(command=["true"], name="j", workdir=str(workdir),
                           slurm={"logdir": str(tmp_path / "logs")}), "gpus")
    env = {"PATH": os.environ["PATH"], "SLURMD_NODENAME": "n1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NTASKS": "1", "SLURM_NODEID": "0", "SLURM_NNODES": "1", "FABLAUNCH_JOB": "j",
           "FABLAUNCH_RUN": "7"}
    done = subprocess.run(["bash", "-c", slurm.task_script(p)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1
    assert f"fablaunch: working directory {workdir} does not exist on n1" in done.stderr
    assert json.loads((tmp_path / "logs" / "j" / "n1" / "rank-0.exit").read_text())["exit_code"] == 1
    assert not (tmp_path / "pwned").exists()
