"""`fab status`, `logs`, `attach`, `stop` and `wait` against a real cluster (issue 3).

Every check of what is still running reads /proc through `live_pids`, never the tool's own report.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.conftest import FAB, REPO, Fab, alive, live_pids, master_port, sessions, wait_until

JSON_KEYS = {"job", "mode", "host", "session", "rank", "node", "state", "exit_code", "signal", "log"}
ENDED = {"succeeded", "failed", "killed"}


# --- helpers ------------------------------------------------------------------------------------------------


def output(result: subprocess.CompletedProcess[str]) -> str:
    """stdout and stderr of a `fab` call, whitespace collapsed so table wrapping never matters."""
    return " ".join((result.stdout + "\n" + result.stderr).split())


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def launch_gpus(fab: Fab, job: str, *behaviour: str, env: tuple[str, ...] = ()) -> None:
    """Launch behave.py with one session per line of ./gpus."""
    flags = [x for e in env for x in ("--env", e)]
    ok(fab("launch-gpus", "--job", job, "--gpus", "gpus", "--port", str(master_port()), *flags,
           "--", "behave.py", *behaviour))


def status_json(fab: Fab, job: str, cwd: Path | None = None) -> list[dict[str, Any]]:
    """`fab status --json --job JOB`, keeping only that job's sessions."""
    result = ok(fab("status", "--json", "--job", job, cwd=cwd))
    return [s for s in json.loads(result.stdout) if s["job"] == job]


def by_rank(states: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {s["rank"]: s for s in states}


def count_state(fab: Fab, job: str, states: set[str]) -> int:
    return sum(s["state"] in states for s in status_json(fab, job))


def job_log(job: str, host: str, stem: str) -> Path:
    """Where a session's log lives on its host (all fake hosts share this machine's home)."""
    return Path.home() / ".fablaunch" / "jobs" / job / host / f"{stem}.log"


def environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def session_id(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def live_on(job: str, host: str) -> list[int]:
    """Live processes of a job carrying the marker of one fake host."""
    marker = f"FABLAUNCH_TAG={job}@{host}".encode()
    return [p for p in live_pids(job) if marker in environ(p)]


def prefixed(stdout: str) -> list[tuple[str, str]]:
    """`[host who] text` lines of `fab logs`, as (prefix, text)."""
    found = []
    for line in stdout.splitlines():
        m = re.fullmatch(r"\[([^\]]+)\] (.*)", line)
        if m:
            found.append((m.group(1), m.group(2).rstrip()))
    return found


# --- status and wait: every rank's fate, and the first failure ----------------------------------------------


def test_status_tells_each_ranks_fate_and_wait_gives_the_first_failures_code(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2", "node1", "node2")
    launch_gpus(fab, job, "0=exit:0", "1=exit:3", "2=kill", "3=sleep", env=("DELAY_1=1", "DELAY_2=4"))
    wait_until(lambda: count_state(fab, job, ENDED) == 3, timeout=40, interval=0.5)

    states = status_json(fab, job)
    assert len(states) == 4
    for s in states:
        assert s.keys() >= JSON_KEYS, s
        assert (s["job"], s["mode"]) == (job, "gpus")
    got = {r: (s["host"], s["session"], s["node"], s["state"], s["exit_code"], s["signal"])
           for r, s in by_rank(states).items()}
    assert got == {
        0: ("node1", f"{job}-rank-0", 0, "succeeded", 0, None),
        1: ("node2", f"{job}-rank-1", 1, "failed", 3, None),
        2: ("node1", f"{job}-rank-2", 0, "killed", None, 9),
        3: ("node2", f"{job}-rank-3", 1, "running", None, None),
    }
    for rank, s in by_rank(states).items():
        assert Path(s["log"]) == job_log(job, s["host"], f"rank-{rank}")
        assert f"rank {rank} on {s['host']} does" in Path(s["log"]).read_text()

    # Rank 1 ended (at ~1 s) before rank 2 was killed (at ~4 s): it is the root cause.
    plain = ok(fab("status", "--job", job))
    assert "first failure: rank 1 " in output(plain)
    assert "first failure: rank 2" not in output(plain)

    timed_out = fab("wait", "--job", job, "--timeout", "2")
    assert timed_out.returncode == 124, output(timed_out)
    assert live_on(job, "node2"), "wait --timeout must leave the job running"
    assert by_rank(status_json(fab, job))[3]["state"] == "running"

    failed = fab("wait", "--job", job, "--fail-fast")
    assert failed.returncode == 3, output(failed)
    assert "first failure: rank 1 " in output(failed)
    wait_until(lambda: not live_pids(job), timeout=5)


# --- stop: complete and safe --------------------------------------------------------------------------------


def test_stop_kills_children_and_setsid_escapees_but_nothing_it_did_not_start(
        fab: Fab, job: str, cluster: Cluster) -> None:
    fab.write("gpus", "node1", "node2")
    launch_gpus(fab, job, "*=spawn")

    def spawned() -> bool:
        lines = [cmdline(p) for p in live_pids(job)]
        deaf = sum("trap '' INT TERM HUP" in c for c in lines)
        return deaf == 2 and sum(c == "sleep 1000" for c in lines) == 2

    wait_until(spawned, timeout=30)
    pids = live_pids(job)
    ranks = [p for p in pids if "behave.py" in cmdline(p)]
    escapees = [p for p in pids if "trap '' INT TERM HUP" in cmdline(p) and not cmdline(p).startswith("setsid")]
    assert len(ranks) == 2 and escapees
    # The deaf child really left the ranks' sessions: no process-group or session kill can reach it.
    assert {session_id(p) for p in escapees}.isdisjoint({session_id(p) for p in ranks})

    outsider_session = cluster.tmux("node1", "new-session", "-d", "-s", "outsider", "sleep 600")
    lookalike = f"{job}-rank-0-mine"  # a user's own session named like the job's: not tagged, not ours
    cluster.tmux("node1", "new-session", "-d", "-s", lookalike, "sleep 600", check=True)
    outsider = subprocess.Popen(["sleep", "600"])
    try:
        assert outsider_session.returncode == 0, outsider_session.stderr
        pane = int(cluster.tmux("node1", "display-message", "-p", "-t", "=outsider:", "#{pane_pid}").stdout)

        result = fab("stop", "--job", job, "--grace", "1")
        assert result.returncode == 0, output(result)

        wait_until(lambda: not live_pids(job), timeout=5)
        assert sessions(cluster, f"{job}-rank-") == {"node1": [lookalike], "node2": [], "node3": []}
        assert cluster.tmux("node1", "has-session", "-t", "=outsider").returncode == 0
        assert alive(pane)
        assert outsider.poll() is None
    finally:
        outsider.kill()
        outsider.wait()
        cluster.tmux("node1", "kill-session", "-t", "=outsider:")
        cluster.tmux("node1", "kill-session", "-t", f"={lookalike}:")


def test_stop_tells_each_signal_as_it_goes_and_how_each_rank_ended(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node1", "node2")
    launch_gpus(fab, job, "0=sleep", "1=deaf:INT", "2=deaf:INT,TERM")
    wait_until(lambda: sum("behave.py" in cmdline(p) for p in live_pids(job)) == 3, timeout=30)
    time.sleep(1)  # the ranks have set their signal dispositions once they printed; give them a moment

    result = fab("stop", "--job", job, "--grace", "1")
    assert result.returncode == 0, output(result)
    assert "node1: SIGINT to" in result.stderr and "node1: SIGTERM to" in result.stderr
    assert "node2: SIGKILL to" in result.stderr and "all gone after SIGKILL" in result.stderr
    text = " ".join(result.stdout.split())
    assert "rank 0: exited on SIGINT; rank 1: needed SIGTERM" in text
    assert "rank 2: KILL needed" in text
    assert not live_pids(job)

    again = fab("launch-gpus", "--job", job, "--replace", "--port", str(master_port()), "--",
                "behave.py", "*=sleep")
    assert again.returncode == 0, output(again)
    wait_until(lambda: sum("behave.py" in cmdline(p) for p in live_pids(job)) == 3, timeout=30)
    stopped = fab("stop", "--job", job, "--grace", "5", "--json")
    assert stopped.returncode == 0, output(stopped)
    ended = {e["who"]: e["how"] for r in json.loads(stopped.stdout) for e in r["ended"]}
    assert ended == {"rank 0": "exited on SIGINT", "rank 1": "exited on SIGINT", "rank 2": "exited on SIGINT"}
    assert stopped.stderr == ""


def test_stopping_a_stopped_job_is_fine_and_says_nothing_to_stop(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    launch_gpus(fab, job, "*=sleep")
    wait_until(lambda: len(live_on(job, "node1")) and len(live_on(job, "node2")), timeout=20)

    first = fab("stop", "--job", job, "--grace", "1")
    assert first.returncode == 0, output(first)
    assert "nothing to stop" not in output(first).lower()
    wait_until(lambda: not live_pids(job), timeout=5)

    second = fab("stop", "--job", job, "--grace", "1")
    assert second.returncode == 0, output(second)
    assert "nothing to stop" in output(second).lower()


def test_stop_with_an_unreachable_host_exits_1_and_names_it(fab: Fab, job: str, cluster: Cluster) -> None:
    fab.write("gpus", "node1", "node2")
    launch_gpus(fab, job, "*=sleep")
    wait_until(lambda: live_on(job, "node1") and live_on(job, "node2"), timeout=20)

    cluster.stop_host("node2")
    try:
        result = fab("stop", "--job", job, "--grace", "1")
        assert result.returncode == 1, output(result)
        assert re.search(r"node2\b.*unreachable", output(result)), output(result)
        # The reachable host was still stopped; the unreachable one could not be, and is not lied about.
        wait_until(lambda: not live_on(job, "node1"), timeout=5)
        assert live_on(job, "node2")
    finally:
        cluster.start_host("node2")
    ok(fab("stop", "--job", job, "--grace", "1"))
    wait_until(lambda: not live_pids(job), timeout=5)


# --- logs and attach: output outlives sessions ----------------------------------------------------------------


def test_logs_show_each_ranks_own_output_after_the_job_ended(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2", "node1")
    launch_gpus(fab, job, "*=exit:0", env=("DELAY_0=0", "DELAY_1=0", "DELAY_2=0"))
    wait_until(lambda: count_state(fab, job, {"succeeded"}) == 3, timeout=30, interval=0.5)

    result = ok(fab("logs", "--job", job))
    assert sorted(prefixed(result.stdout)) == [
        ("node1 rank 0", "rank 0 on node1 does exit 0"),
        ("node1 rank 2", "rank 2 on node1 does exit 0"),
        ("node2 rank 1", "rank 1 on node2 does exit 0"),
    ]

    only = ok(fab("logs", "--job", job, "--rank", "1"))
    assert prefixed(only.stdout) == [("node2 rank 1", "rank 1 on node2 does exit 0")]


def test_logs_are_kept_after_stop(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    launch_gpus(fab, job, "*=sleep")
    wait_until(lambda: all("does sleep" in (p.read_text() if p.exists() else "")
                           for p in (job_log(job, "node1", "rank-0"), job_log(job, "node2", "rank-1"))),
               timeout=20)
    ok(fab("stop", "--job", job, "--grace", "1"))
    wait_until(lambda: not live_pids(job), timeout=5)

    lines = prefixed(ok(fab("logs", "--job", job)).stdout)
    assert ("node1 rank 0", "rank 0 on node1 does sleep") in lines, lines
    assert ("node2 rank 1", "rank 1 on node2 does sleep") in lines, lines
    # Each rank's lines come from its own file only.
    assert not any(p == "node1 rank 0" and "rank 1" in t for p, t in lines), lines
    assert not any(p == "node2 rank 1" and "rank 0" in t for p, t in lines), lines


def test_attach_to_an_ended_rank_points_to_logs(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1")
    launch_gpus(fab, job, "0=exit:0", env=("DELAY_0=0",))
    wait_until(lambda: count_state(fab, job, {"succeeded"}) == 1, timeout=20, interval=0.5)

    result = fab("attach", "--job", job, "--rank", "0")
    assert result.returncode != 0, output(result)
    assert "fab logs" in output(result)


# --- status from another machine ------------------------------------------------------------------------------


def test_status_from_another_working_directory_finds_the_job_on_the_hosts(
        fab: Fab, job: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    fab.write("gpus", "node1", "node2")
    launch_gpus(fab, job, "0=exit:0", "1=sleep", env=("DELAY_0=0",))
    wait_until(lambda: count_state(fab, job, {"succeeded"}) == 1, timeout=20, interval=0.5)

    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copy(fab.cwd / "gpus", elsewhere / "gpus")
    assert (fab.cwd / ".fablaunch").is_dir() and not (elsewhere / ".fablaunch").exists()

    def essentials(states: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted((s["host"], s["session"], s["rank"], s["node"], s["state"], s["exit_code"], s["log"])
                      for s in states)

    here = essentials(status_json(fab, job))
    assert [x[4] for x in here] == ["succeeded", "running"]
    assert essentials(status_json(fab, job, cwd=elsewhere)) == here
    # Without --job too: every job of this project found on the hosts.
    everything = json.loads(ok(fab("status", "--json", cwd=elsewhere)).stdout)
    assert essentials([s for s in everything if s["job"] == job]) == here


# --- torchrun mode -----------------------------------------------------------------------------------------------


def test_torchrun_job_status_per_node_logs_per_worker_and_stop_leaves_no_worker(fab: Fab, job: str) -> None:
    fab.write("hosts", "node1 slots=2", "node2 slots=2")
    ok(fab("launch-torchrun", "--job", job, "--hosts", "hosts", "--port", str(master_port()),
           "--", "behave.py", "*=sleep"))

    def workers() -> list[int]:
        return [p for p in live_pids(job) if "behave.py" in cmdline(p) and "torch.distributed.run" not in cmdline(p)]

    wait_until(lambda: len(workers()) == 4, timeout=60, interval=0.5)

    states = status_json(fab, job)
    assert sorted((s["node"], s["host"], s["session"], s["rank"], s["state"], s["mode"]) for s in states) == [
        (0, "node1", f"{job}-node-0", None, "running", "torchrun"),
        (1, "node2", f"{job}-node-1", None, "running", "torchrun"),
    ]
    assert all(s.keys() >= JSON_KEYS for s in states)

    def every_worker_logged() -> list[tuple[str, str]] | None:
        lines = [(p, t) for p, t in prefixed(ok(fab("logs", "--job", job)).stdout) if "worker" in p]
        return lines if len({t for _, t in lines if "does sleep" in t}) == 4 else None

    lines = wait_until(every_worker_logged, timeout=30, interval=1)
    assert isinstance(lines, list)
    ranks = set()
    for host, node in (("node1", 0), ("node2", 1)):
        for local in (0, 1):
            who = rf"{host} node {node} rank \d \(worker {local}\) stdout"
            mine = [(p, t) for p, t in lines if re.fullmatch(who, p)]
            assert len(mine) == 1 and re.fullmatch(rf"rank (\d) on {host} does sleep", mine[0][1]), lines
            assert mine[0][0].split()[4] == mine[0][1].split()[1]  # the prefix's global rank is the worker's RANK
            ranks.add(mine[0][1].split()[1])
    assert ranks == {"0", "1", "2", "3"}

    result = fab("stop", "--job", job, "--grace", "1")
    assert result.returncode == 0, output(result)
    wait_until(lambda: not live_pids(job), timeout=5)


# --- launch, then wait or follow ---------------------------------------------------------------------------------


def test_launch_with_wait_exits_with_the_first_failures_code(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    result = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--wait", "--env", "DELAY_1=1",
                 "--", "behave.py", "0=exit:0", "1=exit:5")
    assert result.returncode == 5, output(result)
    assert "first failure: rank 1 " in output(result)
    assert not live_pids(job)


def test_launch_with_follow_streams_every_rank_until_the_job_ends(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    result = ok(fab("launch-gpus", "--job", job, "--port", str(master_port()), "--follow",
                    "--env", "DELAY_0=1", "--env", "DELAY_1=1", "--", "behave.py", "*=exit:0"))
    assert sorted(prefixed(result.stdout)) == [
        ("node1 rank 0", "rank 0 on node1 does exit 0"),
        ("node2 rank 1", "rank 1 on node2 does exit 0"),
    ]
    # Following leaves nothing behind on the hosts: no `tail -F` waiting on logs that will never grow.
    followers = [p for p in Path("/proc").glob("[0-9]*") if f"/jobs/{job}/" in cmdline(int(p.name))]
    assert wait_until(lambda: not [p for p in followers if alive(int(p.name))], timeout=10)


def test_launch_with_follow_ends_with_the_summary_and_exit_code_of_wait(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    result = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--follow", "--env", "DELAY_1=1",
                 "--", "behave.py", "0=exit:0", "1=exit:4")
    assert result.returncode == 4, output(result)
    assert ("node2 rank 1", "rank 1 on node2 does exit 4") in prefixed(result.stdout)
    assert "first failure: rank 1 " in output(result)


def test_ctrl_c_in_wait_exits_130_with_one_line_and_the_job_keeps_running(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1")
    launch_gpus(fab, job, "*=sleep")
    wait_until(lambda: live_pids(job), timeout=30)
    proc = subprocess.Popen([FAB, "-r", str(REPO), "-S", str(fab.ssh_config), "wait", "--job", job], cwd=fab.cwd,
                            env=fab.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip() == "fablaunch: interrupted", err
    assert live_pids(job)


def test_replace_says_what_it_stopped(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    launch_gpus(fab, job, "*=sleep")
    wait_until(lambda: len(live_pids(job)) >= 4, timeout=30)
    again = ok(fab("launch-gpus", "--job", job, "--port", str(master_port()), "--replace", "--", "behave.py",
                   "*=sleep"))
    assert f"--replace: stopped the running job {job}: 2 processes on node1, 2 processes on node2" in output(again)


# --- errors: the first failure is the root cause -------------------------------------------------------------


def test_errors_shows_the_first_failure_with_its_exception_and_traceback(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2", "node1")
    # Rank 0 fails only once rank 2's error file exists, so rank 2 is first by construction.
    rank2_error = job_log(job, "node1", "rank-2").with_suffix(".error.json")
    launch_gpus(fab, job, "0=exit:1", "1=sleep", "2=raise:boom",
                env=(f"AFTER_0={rank2_error}", "DELAY_0=1", "DELAY_2=0"))
    wait_until(lambda: count_state(fab, job, ENDED) == 2, timeout=60, interval=0.5)

    shown = ok(fab("errors", "--job", job))
    assert "first: rank 2 on node1" in output(shown)
    assert "ValueError: boom" in output(shown) and 'raise ValueError(arg)' in output(shown)
    assert re.search(r"\+\d+\.\d\ds node1 rank 0 exit 1 \(no error file\)", output(shown)), output(shown)

    data = json.loads(ok(fab("errors", "--job", job, "--json")).stdout)
    assert (data["first"]["rank"], data["first"]["host"], data["first"]["exc_type"], data["first"]["message"]) == (
        2, "node1", "ValueError", "boom")
    assert [(f["rank"], f["kind"]) for f in data["failures"]] == [(2, "rank"), (0, "rank")]
    assert data["failures"][0]["time"] < data["failures"][1]["time"]
    assert "first failure: rank 2 " in output(ok(fab("status", "--job", job)))
