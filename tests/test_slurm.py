"""The Slurm backend against a real Slurm (issue 10): slurmctld and three slurmd on this machine.

Real `fab` command lines submit real batch scripts; ranks run gloo all_reduce across the three
nodes. Every outcome is checked through the files the ranks wrote, Slurm's own commands and /proc.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

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
    assert logs.stdout.strip() == ""  # probe prints nothing; the prefix shows only with text
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


def test_a_pending_job_shows_slurms_reason_and_stop_cancels_it(sfab: SlurmFab) -> None:
    job = "sl-pending"
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
    for line in ("#SBATCH --nodes=2", "#SBATCH --partition=debug", "#SBATCH --time=0:10:00", "exec srun"):
        assert line in result.stdout
    assert "hush" not in result.stdout and "API_TOKEN=*****" in result.stdout
    assert not sfab.files("sl-dry").exists()
    assert "sl-dry" not in sfab.slurm_cmd("squeue", "-h", "-o", "%j")


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
