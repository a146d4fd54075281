"""`fab launch-gpus` and `fab launch-torchrun` against a real cluster of fake hosts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cluster import Cluster
from tests.conftest import (
    FAB,
    JOBS,
    REPO,
    SSH_PORT,
    Fab,
    live_pids,
    master_port,
    outputs,
    sessions,
    slow_path,
    wait_until,
)

NASTY = ["a b", "'", '"', "$HOME", "`id`", "$(id)", "a;b", "x|y", "&&", "\\", "line\nbreak", "tab\there", "é",
         "日本語", "🚀", "-", "--flag=--", "", "*", "~", "#no comment", "%s", "{a,b}"]




def test_per_gpu_job_over_three_interleaved_hosts_gets_the_torchrun_environment(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2", "node3", "node1", "# a comment", "", "node2", "node3")
    result = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--env", "EXTRA=x y", "--",
                 "probe.py", "--flag", "two words")
    assert result.returncode == 0, result.stderr
    assert all(len(s) == 2 for s in sessions(fab.cluster, job).values())
    ranks = outputs(fab.cwd, 6)
    hosts = ["node1", "node2", "node3", "node1", "node2", "node3"]
    for rank, seen in enumerate(ranks):
        env = seen["env"]
        assert seen["sum"] == 21.0 and seen["world"] == 6  # all_reduce of 1..6
        assert env["RANK"] == str(rank)
        assert env["FABLAUNCH_HOST"] == hosts[rank]
        assert env["LOCAL_RANK"] == str(rank // 3)
        assert env["WORLD_SIZE"] == "6" and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["GROUP_RANK"] == env["NODE_RANK"] == str(rank % 3)
        assert env["MASTER_ADDR"] == "127.0.0.11"  # resolved through ssh_config, not the alias
        assert env["OMP_NUM_THREADS"] == "1" and env["EXTRA"] == "x y"
        assert seen["argv"] == ["--flag", "two words"] and seen["cwd"] == str(fab.cwd)
    error_files = {r["env"]["TORCHELASTIC_ERROR_FILE"] for r in ranks}
    assert len(error_files) == 6
    wait_until(lambda: not live_pids(job), 30)
    for rank, host in enumerate(hosts):
        exit_record = json.loads((JOBS / job / host / f"rank-{rank}.exit").read_text())
        assert exit_record["exit_code"] == 0
        assert (JOBS / job / host / f"rank-{rank}.log").exists()
        mode = stat.S_IMODE((JOBS / job / host / f"rank-{rank}.sh").stat().st_mode)
        assert mode == 0o600
    record = json.loads((fab.cwd / ".fablaunch" / "records" / f"{job}.json").read_text())
    assert record["hosts"] == ["node1", "node2", "node3"] and len(record["sessions"]) == 6


def test_torchrun_job_runs_one_agent_per_node_with_slots(fab: Fab, job: str) -> None:
    fab.write("hosts", "node1 slots=2", "node2 slots=2", "node3 slots=2")
    result = fab("launch-torchrun", "--job", job, "--port", str(master_port()), "--", "probe.py", "it's")
    assert result.returncode == 0, result.stderr
    assert sessions(fab.cluster, job) == {f"node{k + 1}": [f"{job}-node-{k}"] for k in range(3)}
    ranks = outputs(fab.cwd, 6, timeout=240)
    assert {r["sum"] for r in ranks} == {21.0}
    assert sorted(r["env"]["LOCAL_RANK"] for r in ranks) == ["0", "0", "0", "1", "1", "1"]
    assert all(r["argv"] == ["it's"] for r in ranks)
    script = (JOBS / job / "node2" / "node-1.sh").read_text()
    assert "--rdzv-backend c10d --rdzv-endpoint 127.0.0.11:" in script
    assert "--nnodes 3 --nproc-per-node 2 --redirects 3 --log-dir" in script


def _dump(fab: Fab, job: str, args: list[str], env: dict[str, str]) -> dict:
    flags = [x for k, v in env.items() for x in ("--env", f"{k}={v}")]
    result = fab("launch-gpus", "--job", job, *flags, "--", "dump.py", *args)
    assert result.returncode == 0, result.stderr
    return outputs(fab.cwd, 1, timeout=30)[0]


def test_nasty_arguments_and_env_values_arrive_byte_for_byte(fab: Fab, job: str) -> None:
    fab.write("gpus", "node2")
    env = {f"V{i}": value for i, value in enumerate(NASTY)}
    seen = _dump(fab, job, NASTY, env)
    assert seen["argv"] == NASTY
    assert {k: seen["env"][k] for k in env} == env


_arg = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(args=st.lists(_arg, min_size=1, max_size=4), value=_arg)
def test_any_text_round_trips_through_argv_and_env(fab: Fab, job: str, args: list[str], value: str) -> None:
    for old in (fab.cwd / "out").glob("*.json"):
        old.unlink()
    fab.write("gpus", "node1")
    seen = _dump(fab, job, args, {"ANY": value})
    assert seen["argv"] == args
    assert seen["env"]["ANY"] == value
    wait_until(lambda: not sessions(fab.cluster, job)["node1"], 10)


def test_secret_env_value_never_shows_in_any_process_list(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    secret = "hf_s3cr3t_do_not_show_4711"
    result = fab("launch-gpus", "--job", job, "--env", f"HF_TOKEN={secret}", "--", "behave.py", "*=sleep")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(live_pids(job)) >= 4, 20)
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert secret not in listing
    assert "behave.py" in listing  # the ranks are there, only the secret is not
    assert secret not in result.stdout + result.stderr


def test_dry_run_prints_scripts_with_masked_secrets_and_touches_nothing(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    result = fab("launch-gpus", "--job", job, "--dry-run", "--env", "WANDB_API_KEY=topsecret", "--env",
                 "VISIBLE=shown", "--", "train.py", "--lr", "0.1")
    assert result.returncode == 0, result.stderr
    assert "topsecret" not in result.stdout and "WANDB_API_KEY=*****" in result.stdout
    assert "VISIBLE=shown" in result.stdout and "train.py --lr 0.1" in result.stdout
    assert "node1" in result.stdout and "node2" in result.stdout and "manifest.json" in result.stdout
    assert "tmux new-session" not in result.stdout  # compact by default: one script, one manifest
    verbose = fab("launch-gpus", "--job", job, "--dry-run", "--verbose", "--env", "WANDB_API_KEY=topsecret",
                  "--", "train.py", "--lr", "0.1")
    assert "tmux new-session" in verbose.stdout and "topsecret" not in verbose.stdout
    assert verbose.stdout.count("rank-1.sh") >= 1 and verbose.stdout.count("rank-0.sh") >= 1
    assert len(result.stdout.splitlines()) < len(verbose.stdout.splitlines()) * 0.7
    assert sessions(fab.cluster, job) == {"node1": [], "node2": [], "node3": []}
    assert not (JOBS / job).exists() and not (fab.cwd / ".fablaunch").exists()


BAD_INPUT = [
    (["--gpus", "missing"], None, "missing: no such file"),
    (["--gpus", "gpus"], ["# only a comment", ""], "gpus: no hosts listed"),
    (["--gpus", "gpus"], ["node1", "node 2"], "gpus:2: 'node 2' is not a valid host: whitespace"),
    (["--gpus", "gpus"], ["node1;rm -rf /"], "gpus:1:"),
    (["--gpus", "gpus"], ["node1", "$(reboot)"], "gpus:2: '$(reboot)' is not a valid host: shell metacharacter"),
    (["--gpus", "gpus", "--job", "a.b"], ["node1"], "--job: 'a.b' is not a valid job name"),
    (["--gpus", "gpus", "--port", "99999"], ["node1"], "--port: 99999 is not a TCP port"),
    (["--gpus", "gpus", "--env", "NOEQUALS"], ["node1"], "--env: 'NOEQUALS' is not KEY=VALUE"),
    (["--gpus", "gpus", "--spec", "job.yaml"], ["node1"], "job.yaml: key 'nproc_per_nodes': unknown key"),
]


@pytest.mark.parametrize(("flags", "lines", "message"), BAD_INPUT)
def test_bad_input_exits_2_naming_the_problem_and_launches_nothing(fab: Fab, job: str, flags: list[str],
                                                                   lines: list[str] | None, message: str) -> None:
    if lines is not None:
        fab.write("gpus", *lines)
    fab.write("job.yaml", "nproc_per_nodes: 4")
    result = fab("launch-gpus", "--job", job, *flags, "--", "dump.py") if "--job" not in flags else \
        fab("launch-gpus", *flags, "--", "dump.py")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(sessions(fab.cluster, job).values()) and not live_pids(job)


@pytest.mark.parametrize(("lines", "message"), [
    (["node1", "node1"], "hosts:2: host 'node1' is listed twice (first at hosts:1)"),
    (["node1 slots=0"], "hosts:1: slots must be a positive integer, not '0'"),
    (["node1 slots=x"], "hosts:1: slots must be a positive integer"),
])
def test_bad_hosts_file_exits_2(fab: Fab, job: str, lines: list[str], message: str) -> None:
    fab.write("hosts", *lines)
    result = fab("launch-torchrun", "--job", job, "--", "dump.py")
    assert result.returncode == 2 and message in result.stderr
    assert not any(sessions(fab.cluster, job).values())


def test_spec_file_holds_options_and_command_and_flags_override_it(fab: Fab, job: str) -> None:
    fab.write("gpus", "node3")
    fab.write("job.yaml", f"name: {job}", "command: [dump.py, from-spec]", "env: {FROM_SPEC: 'yes', LEVEL: spec}",
              "port: 6000")
    result = fab("launch-gpus", "--spec", "job.yaml", "--env", "LEVEL=flag", "--port", "6001")
    assert result.returncode == 0, result.stderr
    seen = outputs(fab.cwd, 1, timeout=30)[0]
    assert seen["argv"] == ["from-spec"]
    assert seen["env"]["FROM_SPEC"] == "yes" and seen["env"]["LEVEL"] == "flag" and seen["env"]["MASTER_PORT"] == "6001"
    fab.write("bad.yaml", "port: five")
    bad = fab("launch-gpus", "--spec", "bad.yaml", "--", "dump.py")
    assert bad.returncode == 2 and "bad.yaml: key 'port': must be an integer, not str" in bad.stderr


def test_a_running_job_name_is_refused_unless_replace(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    assert fab("launch-gpus", "--job", job, "--", "behave.py", "*=sleep").returncode == 0
    wait_until(lambda: len(live_pids(job)) >= 4, 20)
    first = sorted(live_pids(job))
    again = fab("launch-gpus", "--job", job, "--", "behave.py", "*=sleep")
    assert again.returncode == 2 and "already running" in again.stderr
    assert sorted(live_pids(job)) == first  # the running job was not touched
    replaced = fab("launch-gpus", "--job", job, "--replace", "--", "behave.py", "*=sleep")
    assert replaced.returncode == 0, replaced.stderr
    wait_until(lambda: len(live_pids(job)) >= 4 and not set(first) & set(live_pids(job)), 20)
    assert len(list((JOBS / job / ".previous").iterdir())) == 2  # the first run's files were kept


def test_an_unreachable_host_fails_the_launch_and_nothing_runs_anywhere(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2", "node3")
    fab.cluster.stop_host("node3")
    try:
        result = fab("launch-gpus", "--job", job, "--", "behave.py", "*=sleep")
    finally:
        fab.cluster.start_host("node3")
    assert result.returncode == 1
    assert "node3" in result.stdout and "unreachable" in result.stdout
    assert not any(sessions(fab.cluster, job).values()) and not live_pids(job)


def test_a_missing_working_directory_fails_the_launch(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    result = fab("launch-gpus", "--job", job, "--workdir", "/nonexistent/dir", "--", "dump.py")
    assert result.returncode == 1
    assert "workdir: /nonexistent/dir does not exist" in result.stdout
    assert not any(sessions(fab.cluster, job).values())


def test_a_host_failing_mid_launch_rolls_back_the_others(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2", "node3")
    # node3 cannot set its job directory aside (its .previous is a file): only node3's launch fails.
    (JOBS / job / "node3").mkdir(parents=True)
    (JOBS / job / ".previous").write_text("in the way")
    result = fab("launch-gpus", "--job", job, "--", "behave.py", "*=sleep")
    assert result.returncode == 1
    assert "rolled back" in result.stdout and "node3" in result.stdout
    wait_until(lambda: not live_pids(job), 15)
    assert not any(sessions(fab.cluster, job).values())
    kept = fab("launch-gpus", "--job", job + "-n", "--no-rollback", "--", "behave.py", "*=sleep")
    assert kept.returncode == 0  # a clean job of another name is unaffected


def test_localhost_runs_without_ssh(fab: Fab, job: str) -> None:
    fab.write("gpus", "localhost", "localhost")
    env = {**fab.env, "PATH": os.environ["PATH"]}
    result = subprocess.run(["fab", "-r", str(REPO), "launch-gpus", "--job", job, "--", "dump.py", "x"],
                            cwd=fab.cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    seen = outputs(fab.cwd, 2, timeout=30)
    assert [s["env"]["LOCAL_RANK"] for s in seen] == ["0", "1"] and seen[0]["env"]["MASTER_ADDR"] == "localhost"


def test_fablaunch_script_and_fab_work_from_any_directory(fab: Fab, tmp_path: Path) -> None:
    listing = subprocess.run(["fab", "-r", str(REPO), "-l"], cwd="/", capture_output=True, text=True)
    for name in ("launch-gpus", "launch-torchrun", "status", "logs", "attach", "stop", "wait"):
        assert name in listing.stdout
    script = subprocess.run(["fablaunch", "-l"], cwd="/", capture_output=True, text=True)
    assert script.returncode == 0 and "launch-gpus" in script.stdout


@pytest.mark.parametrize("name", ["launch-gpus", "launch-torchrun", "status", "logs", "attach", "stop", "wait"])
def test_every_flag_has_help(name: str) -> None:
    out = subprocess.run(["fab", "-r", str(REPO), "--help", name], capture_output=True, text=True).stdout
    options = out.split("Options:", 1)[1].splitlines()
    flags = [line for line in options if line.strip().startswith("-")]
    assert flags
    for line in flags:
        assert len(line.strip().split("  ", 1)) == 2 or options[options.index(line) + 1].startswith(" " * 10), line


def test_ctrl_c_during_the_launch_rolls_back_and_a_slow_host_starts_nothing_later(
        tmp_path_factory: pytest.TempPathFactory, job: str) -> None:
    """node2 writes its files late (its `flock`, before them, sleeps first): Ctrl-C arrives after node1 started."""
    root = tmp_path_factory.mktemp("slow")
    with Cluster(root / "c", 2, port=SSH_PORT + 4, base=131, env={"PATH": os.environ["PATH"]},
                 host_env={"node2": {"PATH": slow_path(root, "flock", 6)}}) as two:
        work = root / "w"
        work.mkdir()
        (work / "gpus").write_text("node1\nnode2\n")
        proc = subprocess.Popen([FAB, "-r", str(REPO), "-S", str(two.ssh_config), "launch-gpus", "--job", job,
                                 "--port", str(master_port()), "--", "sleep", "600"],
                                cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            wait_until(lambda: sessions(two, job)["node1"], timeout=30)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 130, out + err
            assert "rolling back" in err
            wait_until(lambda: not live_pids(job), timeout=15)
            # node2's payload wakes up after the rollback: its guard must keep it from starting anything.
            wait_until(lambda: "sleep 6" not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                                               text=True).stdout, timeout=20)
            assert sessions(two, job) == {"node1": [], "node2": []}
            assert not live_pids(job)
        finally:
            proc.kill()


def test_a_workdir_under_home_is_the_hosts_home_not_this_machines(fab: Fab, job: str, tmp_path: Path) -> None:
    # The fake hosts share this machine's HOME, so `~/...` there is the same directory: the check is that
    # `~` reaches the host unexpanded and is expanded there (a quoted '~' would be a directory named ~).
    where = Path.home() / f".fablaunch-test-{job}"
    where.mkdir(exist_ok=True)
    try:
        shutil.copy(fab.cwd / "probe.py", where)
        fab.write("gpus", "node1")
        result = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--workdir", f"~/{where.name}",
                     "--wait", "--", "probe.py")
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads((where / "out" / "0.json").read_text())["cwd"] == str(where)
        missing = fab("launch-gpus", "--job", job, "--workdir", "~/no-such-dir-of-fablaunch", "--", "probe.py")
        assert missing.returncode == 1 and "workdir: ~/no-such-dir-of-fablaunch does not exist" in missing.stdout
    finally:
        shutil.rmtree(where, ignore_errors=True)
