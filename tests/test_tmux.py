"""Starting a host's sessions within tmux's limit on one command (issue 8).

A tmux client sends all of one call's arguments to its server in one message of at most 16 KiB, so
64 ranks with a long job name and working directory cannot start in one call. The sessions are split
over several `&&`-chained calls, each new session still tagged in the call that creates it. The
calls are checked with a stand-in `tmux` that records its arguments, and run for real on a private
tmux server.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fablaunch import tmux
from fablaunch.errors import UsageError
from fablaunch.hostfile import parse_host
from fablaunch.plan import Plan, plan_gpus, plan_torchrun
from fablaunch.spec import JobSpec

JOB = "j" * 63 + "x"  # the longest job name there is: 64 characters
HOST = parse_host("node1", "t")
needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


def plan(workdir: str, ranks: int = 64, job: str = JOB) -> Plan:
    return plan_gpus(JobSpec(command=["sleeper.py"]), [HOST] * ranks, job, "/py", workdir)


def long_dir(base: Path, length: int) -> Path:
    """A new directory under base whose path is exactly `length` bytes long."""
    path = str(base)
    while len(path) < length:
        left = length - len(path)  # never leave 1: a component needs a slash and a character
        path += "/" + "d" * (left - 1 if left <= 201 else min(200, left - 3))
    assert len(path) == length, path
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def args_size(args: list[str]) -> int:
    return sum(len(a.encode()) + 1 for a in args)


def recorded_calls(line: str, dir_: str, tmp_path: Path, fail_on: int = 0) -> tuple[list[list[str]], int, str]:
    """Run a line with a stand-in `tmux` that records each call's arguments (and fails call `fail_on`)."""
    out = tmp_path / "calls"
    out.mkdir(parents=True, exist_ok=True)
    shim = (f"n=0; tmux() {{ n=$((n + 1)); printf '%s\\0' \"$@\" > {out}/$(printf %03d $n); "
            f"[ $n != {fail_on} ] || {{ echo 'tmux: boom' >&2; return 1; }}; }}\n")
    # The sessions' start time as long as planned for, as the launch payload sets it.
    start = "9" * tmux.START_BYTES
    result = subprocess.run(["bash", "-c", f"{shim}dir={dir_!s} start={start}\n{line}"], capture_output=True,
                            text=True)
    calls = [p.read_bytes().decode().split("\0")[:-1] for p in sorted(out.iterdir())]
    return calls, result.returncode, result.stderr


def commands(call: list[str]) -> list[list[str]]:
    """A call's arguments split at its `;` separators."""
    found: list[list[str]] = [[]]
    for arg in call:
        if arg == ";":
            found.append([])
        else:
            found[-1].append(arg)
    return found


def worst_case_dir(p: Plan) -> str:
    """`$dir` as long as the calls are planned for: a remote $HOME of HOME_MAX bytes."""
    return "/" + "h" * (tmux.HOME_MAX - 1) + p.sessions[0].dir.removeprefix("~")


# --- the limit ----------------------------------------------------------------------------------------------


@needs_tmux
def test_tmux_runs_exactly_TMUX_ARGS_MAX_bytes_of_arguments_and_not_one_more(server: dict[str, str]) -> None:
    def run(size: int) -> subprocess.CompletedProcess[str]:
        args = ["new-session", "-d", "-s", "keep", "sleep", "60", ";", "set-option", "-g", "@fablaunch_probe"]
        args.append("v" * (size - args_size(args) - 1))
        assert args_size(args) == size
        return subprocess.run(["tmux", *args], env=server, capture_output=True, text=True)

    assert run(tmux.TMUX_ARGS_MAX).returncode == 0
    subprocess.run(["tmux", "kill-server"], env=server, capture_output=True)
    refused = run(tmux.TMUX_ARGS_MAX + 1)
    assert refused.returncode == 1 and "failed to send command" in refused.stderr
    assert tmux.CALL_BUDGET < tmux.TMUX_ARGS_MAX


# --- splitting ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["gpus", "torchrun"])
def test_a_few_sessions_start_in_one_call(mode: str, tmp_path: Path) -> None:
    spec = JobSpec(command=["train.py"])
    small = (plan_gpus(spec, [HOST] * 8, "j", "/py", "/w") if mode == "gpus"
             else plan_torchrun(spec, [HOST], "j", "/py", "/w"))
    line = tmux.new_sessions(small, small.on(HOST))
    assert line.startswith("tmux new-session ")
    calls, code, _ = recorded_calls(line, "/home/u/.fablaunch/jobs/j/node1", tmp_path)
    assert code == 0 and len(calls) == 1
    assert [c[c.index("-s") + 1] for c in commands(calls[0]) if c[0] == "new-session"] == \
        [s.name for s in small.sessions]


def test_64_ranks_with_the_longest_job_name_and_a_long_workdir_are_split_within_the_budget(tmp_path: Path) -> None:
    big = plan("/w" * 100)
    sessions = big.on(HOST)
    calls, code, stderr = recorded_calls(tmux.new_sessions(big, sessions), worst_case_dir(big), tmp_path)
    assert code == 0, stderr
    *starts, end = calls
    assert len(starts) > 1
    for call in starts:  # what tmux would be sent, the remote $HOME as long as planned for
        assert args_size(call) <= tmux.CALL_BUDGET
    # Every session once, in rank order, tagged in the call that creates it.
    created = []
    for call in starts:
        cmds = commands(call)
        for i, cmd in enumerate(cmds):
            if cmd[0] == "new-session" and "-c" in cmd:
                name = cmd[cmd.index("-s") + 1]
                created.append(name)
                session = sessions[len(created) - 1]
                assert cmd[-3:] == ["sh", f"{worst_case_dir(big)}/{session.stem}.sh", "9" * tmux.START_BYTES]
                assert cmd[cmd.index("-c") + 1] == big.workdir
                tagged = {c[3]: c[4] for c in cmds[i + 1:i + 6] if c[:3] == ["set-option", "-t", f"={name}:"]}
                assert tagged == {key: value or "-" for key, value in tmux.tags(big, session).items()}
    assert created == [s.name for s in sessions]
    # A placeholder keeps the server up from the first call to the last, then goes.
    hold = commands(starts[0])[0]
    assert hold[:4] == ["new-session", "-d", "-s", hold[3]] and hold[3].startswith(f"{JOB}-launching-")
    assert hold[4:] == ["sleep", str(tmux.HOLD_SECONDS)]
    assert end == ["kill-session", "-t", f"={hold[3]}:"]


def test_a_failing_call_stops_the_chain_and_fails_the_line(tmp_path: Path) -> None:
    big = plan("/w" * 100)
    calls, code, stderr = recorded_calls(tmux.new_sessions(big, big.on(HOST)), worst_case_dir(big), tmp_path,
                                         fail_on=2)
    assert code != 0 and "tmux: boom" in stderr
    assert len(calls) == 3 and calls[2][0] == "kill-session"  # no third call of sessions; the placeholder goes
    assert "HOME" not in stderr  # $dir is as long as planned for: not the reason


def test_a_remote_home_longer_than_planned_for_is_named_when_tmux_fails(tmp_path: Path) -> None:
    p = plan("/w")
    line = tmux.new_sessions(p, p.on(HOST))
    too_long = "/" + "h" * tmux.HOME_MAX + p.sessions[0].dir.removeprefix("~")
    _, code, stderr = recorded_calls(line, too_long, tmp_path / "fails", fail_on=1)
    assert code != 0
    assert f"$HOME is longer than the {tmux.HOME_MAX} bytes" in stderr.splitlines()[-1]
    _, code, _ = recorded_calls(line, too_long, tmp_path / "runs")
    assert code == 0  # a long $HOME alone is no failure: only tmux's refusal is


def test_a_redirection_the_caller_appends_covers_every_tmux_call(tmp_path: Path) -> None:
    """The launch payload closes its lock's descriptor for tmux: a server started there would hold it."""
    for ranks in (1, 64):
        p = plan("/w" * 100, ranks)
        line = tmux.new_sessions(p, p.on(HOST))
        shim = ("tmux() { if { true >&9; } 2>/dev/null; then echo 'fd 9 open' >&2; fi; }\n"
                f"exec 9>{tmp_path / 'lock'}\ndir=/d\n")
        result = subprocess.run(["bash", "-c", f"{shim}{line} 9>&-"], capture_output=True, text=True)
        assert result.returncode == 0 and result.stderr == "", (ranks, result.stderr)
        assert len(tmux.calls(p, p.on(HOST))) == (1 if ranks == 1 else 6)


def test_a_workdir_too_long_for_one_session_is_refused_naming_the_limit() -> None:
    with pytest.raises(UsageError) as refused:
        tmux.check_fits(plan("/" + "w" * 20000))
    assert refused.value.where == "--workdir"
    assert "path too long for tmux" in refused.value.problem and str(tmux.TMUX_ARGS_MAX) in refused.value.problem
    room = int(refused.value.problem.rsplit("at most ", 1)[1].split()[0])
    fits = plan("/" + "w" * (room - 1))  # exactly `room` bytes: every session fits, one to a call
    tmux.check_fits(fits)
    assert len(tmux.calls(fits, fits.on(HOST))) == 64 + 1  # the placeholder takes a call of its own
    too_long = plan("/" + "w" * room)
    with pytest.raises(UsageError, match="--workdir: path too long for tmux"):
        tmux.check_fits(too_long)
    with pytest.raises(UsageError, match="--workdir: path too long for tmux"):
        tmux.new_sessions(too_long, too_long.on(HOST))


def test_a_host_name_too_long_for_any_session_is_refused_by_name() -> None:
    host = parse_host("h" * 16000, "t")
    huge = plan_gpus(JobSpec(command=["x.py"]), [host], "j", "/py", "/w")
    with pytest.raises(UsageError) as refused:
        tmux.check_fits(huge)
    assert refused.value.where == f"host {host.spec}" and refused.value.problem.startswith("too long for tmux")


def test_a_few_ranks_with_a_short_name_still_take_one_call() -> None:
    """The split costs a tmux start-up per call, so calls are only as many as the limit needs."""
    assert len(tmux.calls(plan("/w", 8, "job"), plan("/w", 8, "job").on(HOST))) == 1
    assert len(tmux.calls(plan("/w", 20, "job"), plan("/w", 20, "job").on(HOST))) == 1


# --- on a real tmux -----------------------------------------------------------------------------------------


def run_on(server: dict[str, str], p: Plan, dir_: Path, script: str) -> subprocess.CompletedProcess[str]:
    for session in p.sessions:
        (dir_ / f"{session.stem}.sh").write_text(script)
    start = "9" * tmux.START_BYTES  # the longest start time planned for
    return subprocess.run(["bash", "-c", f"set -u; dir={dir_} start={start}\n{tmux.new_sessions(p, p.on(HOST))}"],
                          env=server, capture_output=True, text=True, timeout=120)


@needs_tmux
def test_64_sessions_with_a_64_character_job_and_a_200_character_workdir_start_tagged(
        server: dict[str, str], tmp_path: Path) -> None:
    workdir = long_dir(tmp_path, 200)
    p = plan(str(workdir))
    one_call = sum(tmux.session_commands(p, s)[1] for s in p.sessions)
    assert one_call > tmux.TMUX_ARGS_MAX  # what made the launch fail before the split
    dir_ = long_dir(tmp_path / "home", tmux.dir_bytes_max(p.sessions[0]))  # the longest $dir planned for
    result = run_on(server, p, dir_, "sleep 60\n")
    assert result.returncode == 0, result.stderr
    listed = subprocess.run(["bash", "-c", tmux.list_command(JOB, HOST.spec)], env=server, capture_output=True,
                            text=True).stdout.splitlines()
    found = {f[0]: f for f in (line.split(tmux.FIELD_SEP) for line in listed)}
    assert sorted(found) == sorted(s.name for s in p.sessions)
    for s in p.sessions:
        assert found[s.name][1:6] == [JOB, "gpus", "node1", str(s.rank), "0"]
    everything = subprocess.run(["tmux", "ls", "-F", "#{session_name}"], env=server, capture_output=True,
                                text=True).stdout.split()
    assert len(everything) == 64  # the placeholder is gone


@needs_tmux
def test_ranks_that_all_exit_at_once_still_start_cleanly_over_several_calls(
        server: dict[str, str], tmp_path: Path) -> None:
    """A server whose sessions all ended exits; the placeholder keeps it up for the later calls."""
    p = plan(str(long_dir(tmp_path, 200)))
    assert len(tmux.calls(p, p.on(HOST))) > 1
    dir_ = tmp_path / "d"
    dir_.mkdir()
    for _ in range(3):
        result = run_on(server, p, dir_, "exit 0\n")
        assert result.returncode == 0, result.stderr  # every set-option found its session
