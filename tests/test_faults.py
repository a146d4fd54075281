"""A user's worst day, on the real cluster: hostile rank output, dead tmux servers, signals and races
during a launch, stop scoping, a full disk, read-only directories.

Every outcome is checked through /proc (`live_pids`) and the fake hosts' own tmux, never only through
fablaunch's report. Stuck hosts and silent listeners are in test_faults_deadlines.py, bad input in
test_faults_input.py, tmux limits and torchrun signals in test_faults_limits.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.conftest import (
    FAB,
    JOBS,
    PAYLOADS,
    REPO,
    SSH_PORT,
    Fab,
    environ_of,
    live_pids,
    master_port,
    sessions,
    slow_path,
    wait_until,
)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def status_json(fab: Fab, job: str, cwd: Path | None = None) -> list[dict]:
    return [s for s in json.loads(ok(fab("status", "--json", "--job", job, cwd=cwd)).stdout) if s["job"] == job]


def runs_of(job: str) -> set[bytes]:
    """The launch runs (FABLAUNCH_RUN values) the job's live processes belong to."""
    return {v for p in live_pids(job) for v in environ_of(p) if v.startswith(b"FABLAUNCH_RUN=")}


@contextlib.contextmanager
def mounted(path: Path, *options: str) -> Iterator[Path]:
    """A small tmpfs at `path` (e.g. `size=256k`, or `ro`), always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options or ("size=1m",)), "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# --- a rank's output is data ---------------------------------------------------------------------------------


def test_hostile_rank_output_is_shown_literally_and_forges_nothing(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    ok(fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "hostile.py", "sleep"))
    wait_until(lambda: all(s["last_line"].endswith("[rank0]: last") for s in status_json(fab, job)), timeout=30)

    states = status_json(fab, job)
    # The forged exit record, NOW line and manifest in the log change nothing: both ranks still run.
    assert [(s["rank"], s["state"], s["exit_code"]) for s in states] == [(0, "running", None), (1, "running", None)]
    assert all(s["last_line"] == "[bold red]not markup[/] [rank0]: last" for s in states)

    table = ok(fab("status"))  # every job, as a plain `fab status` shows them: one bad log must not break it
    assert "[bold red]not markup[/] [rank0]: last" in table.stdout
    assert "\x1b" not in table.stdout and "\x1e" not in table.stdout
    logs = ok(fab("logs", "--job", job, "--rank", "0"))
    assert "[rank0]: RuntimeError: [/opt/gloo/transport/tcp/pair.cc:553]" in logs.stdout
    assert fab("wait", "--job", job, "--timeout", "3").returncode == 124  # the forged record did not end it
    assert len(live_pids(job)) >= 2


def test_a_failed_ranks_bracketed_error_text_reaches_status_wait_and_errors_intact(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    ok(fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "behave.py",
           "0=sleep", "1=raise:[/opt/gloo/pair.cc:553] [rank1]: peer closed [/bold]"))
    code = fab("wait", "--job", job, "--fail-fast", timeout=120)
    assert code.returncode == 1, code.stdout + code.stderr  # rank 1 raised (exit 1)
    assert "Traceback" not in code.stderr
    for args in (("status",), ("status", "--job", job), ("errors", "--job", job)):
        result = fab(*args)
        assert "Traceback" not in result.stderr, result.stderr
        assert "[/opt/gloo/pair.cc:553] [rank1]: peer closed [/bold]" in result.stdout, (args, result.stdout)


# --- a rank outliving its tmux server ----------------------------------------------------------------------


def test_a_rank_whose_tmux_server_died_runs_detached_and_blocks_a_second_copy(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node1")
    ok(fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "stubborn.py"))
    wait_until(lambda: len(live_pids(job)) >= 4, timeout=30)  # two ranks, each with its tee
    fab.cluster.tmux("node1", "kill-server")
    wait_until(lambda: not sessions(fab.cluster, job)["node1"], timeout=10)
    time.sleep(0.5)
    before = sorted(live_pids(job))
    assert len(before) >= 2  # the ranks ignored the hangup and still hold their GPUs

    states = status_json(fab, job)
    assert [(s["rank"], s["state"], s["detached"]) for s in states] == [(0, "running", True), (1, "running", True)]
    assert "running (detached)" in ok(fab("status", "--job", job)).stdout

    again = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "stubborn.py")
    assert again.returncode == 2 and "already running" in again.stderr, again.stderr
    assert not sessions(fab.cluster, job)["node1"]  # nothing new started
    assert sorted(p for p in live_pids(job) if p in before) == before and len(runs_of(job)) == 1

    ok(fab("stop", "--job", job, "--grace", "1"))
    wait_until(lambda: not live_pids(job), timeout=15)


# --- signals and races during a launch ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two hosts; node2 writes its job files late (its `flock`, before them, sleeps 5 s first)."""
    root = tmp_path_factory.mktemp("faults")
    with Cluster(root / "c", 2, port=SSH_PORT + 6, base=141, env={"PATH": os.environ["PATH"]},
                 host_env={"node2": {"PATH": slow_path(root, "flock", 5)}}) as cluster:
        yield cluster


def start_fab(cluster: Cluster, cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([FAB, "-r", str(REPO), "-S", str(cluster.ssh_config), *args], cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})


def workdir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir()
    (path / "gpus").write_text("node1\nnode1\nnode2\nnode2\n")
    for payload in PAYLOADS.glob("*.py"):
        (path / payload.name).write_bytes(payload.read_bytes())
    return path


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGHUP,), (signal.SIGINT, signal.SIGINT)],
                         ids=["SIGTERM", "SIGHUP", "SIGINT-twice"])
def test_a_signal_mid_launch_rolls_everything_back_and_leaves_no_phantom_job(
        slow: Cluster, tmp_path: Path, job: str, signals: tuple[signal.Signals, ...]) -> None:
    work = workdir(tmp_path, "w")
    proc = start_fab(slow, work, "launch-gpus", "--job", job, "--port", str(master_port()), "--", "sleeper.py")
    try:
        wait_until(lambda: len(sessions(slow, job)["node1"]) == 2, timeout=30)  # node1 started, node2 still writing
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.3)
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signals[0], out + err
    assert "rolling back" in err and "Traceback" not in err
    wait_until(lambda: not live_pids(job), timeout=15)
    time.sleep(6)  # node2's slow payload has woken up by now: its guard must have kept it from starting
    assert sessions(slow, job) == {"node1": [], "node2": []} and not live_pids(job)
    assert not (work / ".fablaunch" / "records" / f"{job}.json").exists()
    history = [json.loads(line) for line in (work / ".fablaunch" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["outcome"] == f"rolled back after {signals[0].name}"
    fab = Fab(slow, work)
    assert status_json(fab, job, cwd=work) == []  # no phantom job
    assert not list(JOBS.glob(f"{job}/*/manifest.json"))


@pytest.mark.parametrize("preflight", [True, False], ids=["preflight", "no-preflight"])
def test_two_launches_of_one_name_leave_exactly_one_job_and_one_refusal(
        slow: Cluster, tmp_path: Path, job: str, preflight: bool) -> None:
    flags = [] if preflight else ["--no-preflight"]
    port = str(master_port())
    # Two project directories, so only the hosts can tell the launches apart (one directory's lock would).
    procs = [start_fab(slow, workdir(tmp_path, name), "launch-gpus", "--job", job, "--port", port, *flags, "--",
                       "sleeper.py") for name in ("a", "b")]
    try:
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            p.kill()
    codes = sorted(code for code, _, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    refusal = next(err for code, _, err in results if code)
    assert "already running" in refusal or "being launched" in refusal, refusal
    assert {h: len(s) for h, s in sessions(slow, job).items()} == {"node1": 2, "node2": 2}
    wait_until(lambda: len(live_pids(job)) >= 8, timeout=30)  # 4 ranks and their tees, all of one run
    assert len(runs_of(job)) == 1
    winner = tmp_path / ("a" if results[0][0] == 0 else "b")
    ok(Fab(slow, winner)("stop", "--job", job, "--grace", "1"))
    assert not live_pids(job)


def test_two_launches_from_one_directory_refuse_at_once(slow: Cluster, tmp_path: Path, job: str) -> None:
    work = workdir(tmp_path, "w")
    first = start_fab(slow, work, "launch-gpus", "--job", job, "--port", str(master_port()), "--", "sleeper.py")
    try:
        wait_until(lambda: (work / ".fablaunch" / "locks" / f"{job}.lock").exists(), timeout=20)
        time.sleep(0.5)
        second = Fab(slow, work)("launch-gpus", "--job", job, "--port", str(master_port()), "--", "sleeper.py",
                                 timeout=30)
        assert second.returncode == 1 and "being launched by another fab process" in second.stderr, second.stderr
        assert first.wait(timeout=90) == 0, first.communicate()
    finally:
        first.kill()
    assert len(runs_of(job)) == 1
    ok(Fab(slow, work)("stop", "--job", job, "--grace", "1"))


def test_stop_during_a_launch_waits_for_it_and_leaves_nothing_running(slow: Cluster, tmp_path: Path,
                                                                       job: str) -> None:
    work = workdir(tmp_path, "w")
    launch = start_fab(slow, work, "launch-gpus", "--job", job, "--port", str(master_port()), "--", "sleeper.py")
    try:
        wait_until(lambda: len(sessions(slow, job)["node1"]) == 2, timeout=30)  # node2 still writing its files
        stop = Fab(slow, work)("stop", "--job", job, "--grace", "1", timeout=120)
        assert launch.wait(timeout=60) == 0
    finally:
        launch.kill()
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "Waiting for the launch" in stop.stderr
    assert sessions(slow, job) == {"node1": [], "node2": []}
    assert not live_pids(job)


# --- stop is scoped -----------------------------------------------------------------------------------------


def test_stop_without_a_job_stops_only_this_projects_jobs_and_an_empty_name_stops_nothing(
        fab: Fab, job: str, tmp_path: Path) -> None:
    other = tmp_path / "other-project"
    other.mkdir()
    for payload in PAYLOADS.glob("*.py"):
        (other / payload.name).write_bytes(payload.read_bytes())
    fab.write("gpus", "node1", "node2")
    (other / "gpus").write_text("node1\nnode2\n")
    ok(fab("launch-gpus", "--job", f"{job}-mine", "--port", str(master_port()), "--", "sleeper.py"))
    ok(fab("launch-gpus", "--job", f"{job}-theirs", "--port", str(master_port()), "--", "sleeper.py", cwd=other))
    wait_until(lambda: len(live_pids(f"{job}-mine")) >= 4 and len(live_pids(f"{job}-theirs")) >= 4, timeout=30)

    shown = ok(fab("status")).stdout  # this project's jobs; another project's are only counted
    assert f"job {job}-mine" in shown and f"job {job}-theirs" not in shown
    assert "not launched from this directory" in shown
    assert f"job {job}-theirs" in ok(fab("status", "--all")).stdout
    for empty in ("", "  "):
        refused = fab("stop", "--job", empty)
        assert refused.returncode == 2 and "--job" in refused.stderr, refused.stderr
    assert len(live_pids(f"{job}-mine")) >= 4 and len(live_pids(f"{job}-theirs")) >= 4

    stopped = ok(fab("stop", "--grace", "1"))
    assert f"Stopping the jobs launched from this directory: {job}-mine" in stopped.stdout
    assert not live_pids(f"{job}-mine")
    assert len(live_pids(f"{job}-theirs")) >= 4  # another project's job is not this stop's to touch
    ok(fab("stop", "--job", f"{job}-theirs", "--grace", "1", cwd=other))


def test_stop_all_needs_saying_and_stops_every_job_on_the_named_hosts(fab: Fab, job: str, tmp_path: Path) -> None:
    # `root@node1` is a host spec of its own (its own marker), so --all here reaches no other test's job.
    fab.write("gpus", "root@node1", "root@node1")
    ok(fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "sleeper.py"))
    wait_until(lambda: len(live_pids(job)) >= 4, timeout=30)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "gpus").write_text("root@node1\n")
    assert "--all" in fab("stop", cwd=elsewhere).stderr  # no records there: name a job or say --all
    assert len(live_pids(job)) >= 4
    ok(fab("stop", "--all", "--yes", "--grace", "1", cwd=elsewhere))
    assert not live_pids(job)


# --- nothing silently lost -----------------------------------------------------------------------------------


def test_a_full_disk_mid_run_keeps_the_ranks_exit_code(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1")
    with mounted(JOBS / job, "size=256k"):
        ok(fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "fill.py", "1024"))
        code = fab("wait", "--job", job, "--timeout", "60")
        states = status_json(fab, job)
    assert code.returncode == 3, code.stdout + code.stderr
    assert [(s["state"], s["exit_code"]) for s in states] == [("failed", 3)]


def test_a_read_only_working_directory_is_refused_before_anything_starts(fab: Fab, job: str, tmp_path: Path) -> None:
    readonly = tmp_path / "ro"
    fab.write("gpus", "node1", "node2")
    with mounted(readonly, "ro", "size=64k"):
        # As the job's working directory: a preflight failure on every host.
        result = fab("launch-gpus", "--job", job, "--workdir", str(readonly), "--port", str(master_port()), "--",
                     "sleep", "60")
        assert result.returncode == 1 and f"workdir: {readonly} is not writable" in result.stdout, result.stdout
        # As the directory fab runs in: its launch record cannot be kept, so nothing is launched.
        here = fab("launch-gpus", "--job", job, "--gpus", str(fab.cwd / "gpus"), "--workdir",
                   str(fab.cwd), "--port", str(master_port()), "--", "sleep", "60", cwd=readonly)
        assert here.returncode == 1 and "cannot write" in here.stderr and "Traceback" not in here.stderr, here.stderr
    assert sessions(fab.cluster, job) == {"node1": [], "node2": [], "node3": []}
    assert not live_pids(job)


def test_a_read_only_home_on_one_host_fails_preflight_everywhere(tmp_path: Path, job: str) -> None:
    home = tmp_path / "home2"
    with mounted(home, "ro", "size=64k"), \
            Cluster(tmp_path / "c", 2, port=SSH_PORT + 7, base=151, env={"PATH": os.environ["PATH"]},
                    host_env={"node2": {"HOME": str(home)}}) as cluster:
        work = workdir(tmp_path, "w")
        result = Fab(cluster, work)("launch-gpus", "--job", job, "--port", str(master_port()), "--", "sleep", "60")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "home: cannot write ~/.fablaunch/jobs" in result.stdout
        assert sessions(cluster, job) == {"node1": [], "node2": []}
    assert not live_pids(job)


def test_waiting_on_a_job_that_is_not_there_is_an_immediate_clear_error(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    for flags in ((), ("--timeout", "600")):  # the subprocess timeout is the hang guard: it must not wait
        result = fab("wait", "--job", f"{job}-NO-SUCH-JOB", *flags, timeout=60)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"no job {job}-NO-SUCH-JOB on the hosts" in result.stderr and "Traceback" not in result.stderr


def test_two_host_specs_of_one_machine_count_each_session_once(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "root@node1", "node1", "root@node1")  # one tmux server, two host specs
    ok(fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "sleeper.py"))
    assert len(sessions(fab.cluster, job)["node1"]) == 4
    states = status_json(fab, job)
    assert sorted((s["host"], s["rank"], s["state"]) for s in states) == [
        ("node1", 0, "running"), ("node1", 2, "running"), ("root@node1", 1, "running"), ("root@node1", 3, "running")]
    ok(fab("stop", "--job", job, "--grace", "1"))
    assert not live_pids(job) and not sessions(fab.cluster, job)["node1"]
