"""The executor's held shells (a check and the action it guards run in one shell per host) and deadlines.

`localhost` runs through a local bash, so these run without SSH; the real-cluster launch tests and
tests/test_faults_deadlines.py cover the same code over SSH.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fabric
import pytest

from fablaunch.executor import BULK_MIN, REMOTE_SHELL, Executor, _bulk, hold_line
from fablaunch.hostfile import parse_host
from tests.cluster import Cluster, silent_listener

LOCAL = parse_host("localhost", "test")


def test_the_rest_of_a_held_script_runs_in_the_same_shell() -> None:
    with Executor(fabric.Config(), 2) as ex:
        held = ex.hold({LOCAL: (REMOTE_SHELL, f"checked=yes; echo checking\n{hold_line(0)}\n")})
        first = held["localhost"].outcome
        assert (first.ok, first.stdout) == (True, "checking\n")
        (done,) = ex.release(held, {"localhost": 'echo "then $checked"; echo err >&2; exit 4\n'}).values()
        assert (done.exit_code, done.stdout, done.stderr) == (4, "then yes\n", "err\n")


def test_a_failed_check_reports_its_status_and_the_shell_can_be_ended_unused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with Executor(fabric.Config(), 2) as ex:
        held = ex.hold({LOCAL: (REMOTE_SHELL, f"echo 'workdir: missing'\n{hold_line(1)}\n")})
        assert (held["localhost"].outcome.exit_code, held["localhost"].outcome.ok) == (1, False)
        (ended,) = ex.release(held, {}).values()
        assert ended.exit_code == 0 and not marker.exists()


def test_a_shell_that_exits_before_its_hold_line_cannot_be_released() -> None:
    with Executor(fabric.Config(), 2) as ex:
        held = ex.hold({LOCAL: (REMOTE_SHELL, f"echo bye; exit 3\n{hold_line(0)}\n")})
        assert held["localhost"].shell is None
        assert (held["localhost"].outcome.exit_code, held["localhost"].outcome.stdout) == (3, "bye\n")
        (late,) = ex.release(held, {"localhost": "echo never\n"}).values()
        assert not late.reached and "never" not in late.stdout


def test_run_one_streams_output_line_by_line_and_keeps_stderr_apart() -> None:
    lines: list[str] = []
    with Executor(fabric.Config(), 1) as ex:
        out = ex.run_one(LOCAL, REMOTE_SHELL, "echo a; echo b >&2; echo c\n", lines.append)
    assert lines == ["a\n", "c\n"] and (out.stdout, out.stderr, out.exit_code) == ("a\nc\n", "b\n", 0)


# --- deadlines (issue 8): the localhost path; tests/test_faults_deadlines.py covers SSH hosts -----------------

OTHER = parse_host("127.0.0.1", "test")  # also run through a local bash: a second "host" in one call


def group_alive(pgid: int) -> list[int]:
    """Running (not zombie) processes of a process group, read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(stat.parent.name))
    return found


def started_group(path: Path, timeout: float = 10) -> int:
    """The process group id a local script wrote to `path` (its shell's $$, the group leader)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = path.read_text().strip() if path.exists() else ""
        if text:
            return int(text)
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


def test_a_command_past_its_deadline_times_out_its_process_group_dies_and_other_hosts_keep_results(
        tmp_path: Path) -> None:
    pgid_file = tmp_path / "pgid"
    slow = f"echo $$ > {pgid_file}; echo before; sleep 60 & sleep 60\n"
    start = time.monotonic()
    with Executor(fabric.Config(), 4, deadline=1) as ex:
        out = ex.run({LOCAL: (REMOTE_SHELL, slow), OTHER: (REMOTE_SHELL, "echo fine\n")})
    assert time.monotonic() - start < 10
    assert (out["localhost"].error, out["localhost"].ok, out["localhost"].exit_code) == ("timed out after 1s", False,
                                                                                        None)
    assert out["localhost"].stdout == "before\n"  # what arrived before the deadline is kept
    assert (out["127.0.0.1"].ok, out["127.0.0.1"].stdout) == (True, "fine\n")
    assert group_alive(started_group(pgid_file)) == []  # both sleeps too, not just the shell


def test_fab_T_replaces_the_callers_default_and_a_call_can_replace_the_executors() -> None:
    config = fabric.Config()
    config.timeouts.command = 1
    with Executor(config, 2, deadline=30) as ex:
        assert ex.run_one(LOCAL, REMOTE_SHELL, "sleep 30\n").error == "timed out after 1s"
    with Executor(fabric.Config(), 2) as ex:  # no deadline by default; this call brings its own
        assert ex.run_one(LOCAL, REMOTE_SHELL, "sleep 30\n", deadline=0.5).error == "timed out after 0.5s"
        assert ex.run_one(LOCAL, REMOTE_SHELL, "sleep 0.2; echo done\n").stdout == "done\n"


def test_a_held_shell_past_its_deadline_cannot_be_released(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with Executor(fabric.Config(), 2, deadline=1) as ex:
        held = ex.hold({LOCAL: (REMOTE_SHELL, f"sleep 30\n{hold_line(0)}\n")})
        assert (held["localhost"].outcome.error, held["localhost"].shell) == ("timed out after 1s", None)
        (late,) = ex.release(held, {"localhost": f"touch {marker}\n"}).values()
    assert not late.reached and not marker.exists()


def test_the_rest_of_a_held_script_is_patient_unless_told_otherwise() -> None:
    with Executor(fabric.Config(), 2, deadline=0.5) as ex:
        held = ex.hold({LOCAL: (REMOTE_SHELL, f"{hold_line(0)}\n")})
        (done,) = ex.release(held, {"localhost": "sleep 1.5; echo launched\n"}).values()
        assert (done.ok, done.stdout) == (True, "launched\n")
        held = ex.hold({LOCAL: (REMOTE_SHELL, f"{hold_line(0)}\n")})
        (cut,) = ex.release(held, {"localhost": "sleep 30\n"}, patient=False).values()
        assert cut.error == "timed out after 0.5s"


def test_a_patient_deadline_cuts_only_a_shell_that_never_started(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    streamed: list[str] = []
    with Executor(fabric.Config(), 2, deadline=0.5, patient=True) as ex:
        # Started (its STARTED line came back at once), then slow and silent: not cut.
        slow = ex.run_one(LOCAL, REMOTE_SHELL, "sleep 1.5; echo a; echo b\n", streamed.append)
        assert (slow.ok, streamed) == (True, ["a\n", "b\n"])
        # A shell stuck in its startup files (bash reads BASH_ENV before its command) never starts.
        hang = tmp_path / "hang.sh"
        hang.write_text("sleep 60\n")
        monkeypatch.setenv("BASH_ENV", str(hang))
        stuck = ex.run_one(LOCAL, REMOTE_SHELL, "echo never\n")
    assert (stuck.error, stuck.stdout) == ("timed out after 0.5s", "")


def test_following_output_without_a_deadline_and_close_ends_what_is_in_flight(tmp_path: Path) -> None:
    pgid_file = tmp_path / "pgid"
    lines: list[str] = []
    ex = Executor(fabric.Config(), 2, deadline=0.5)
    script = f"echo $$ > {pgid_file}; while :; do echo tick; sleep 0.2; done\n"
    follow = threading.Thread(target=ex.run_one, args=(LOCAL, REMOTE_SHELL, script, lines.append),
                              kwargs={"deadline": None}, daemon=True)
    follow.start()
    pgid = started_group(pgid_file)
    time.sleep(1.5)  # well past the executor's deadline: this call has none
    assert follow.is_alive() and len(lines) >= 3
    ex.close()  # Ctrl-C / SIGTERM: `with Executor` ends here
    follow.join(10)
    assert not follow.is_alive() and group_alive(pgid) == []


def test_the_started_line_never_shows_in_output() -> None:
    with Executor(fabric.Config(), 2, deadline=5) as ex:
        out = ex.run_one(LOCAL, REMOTE_SHELL, "printf 'no newline'\n")
        held = ex.hold({LOCAL: (REMOTE_SHELL, f"echo first\n{hold_line(0)}\n")})
        (rest,) = ex.release(held, {"localhost": "echo second\n"}).values()
    assert out.stdout == "no newline" and held["localhost"].outcome.stdout == "first\n" and rest.stdout == "second\n"


def test_a_dropped_handshake_is_retried_within_the_connect_deadline_and_a_silent_one_is_not() -> None:
    """A busy sshd (MaxStartups) closes the connection at once: worth retrying, within the deadline.
    A hung one accepts and says nothing: one connect deadline, then give up (was 15 s x 4 tries)."""
    config = fabric.Config()
    config.connect_kwargs.timeout = 1  # `fab -t 1`
    with socket.create_server(("127.0.0.35", 0)) as dropper, Executor(config, 2, deadline=30) as ex:
        tries: list[float] = []

        def drop() -> None:
            with contextlib.suppress(OSError):
                while True:
                    dropper.accept()[0].close()
                    tries.append(time.monotonic())

        threading.Thread(target=drop, daemon=True).start()
        start = time.monotonic()
        dropped = ex.run_one(parse_host(f"root@127.0.0.35:{dropper.getsockname()[1]}", "test"), REMOTE_SHELL, "")
        assert dropped.error == "unreachable: connection closed before the SSH banner (sshd busy: MaxStartups?)"
        assert len(tries) >= 2 and time.monotonic() - start < 3
    with socket.create_server(("127.0.0.36", 0)) as free:
        port = free.getsockname()[1]
    with silent_listener("127.0.0.36", port) as accepted, Executor(config, 2, deadline=30) as ex:
        start = time.monotonic()
        silent = ex.run_one(parse_host(f"root@127.0.0.36:{port}", "test"), REMOTE_SHELL, "")
        assert (silent.error, len(accepted)) == ("unreachable: no SSH banner within 1s", 1)
        assert time.monotonic() - start < 3


def test_ssh_config_lookups_answer_as_paramikos_without_a_user_name_look_up_per_stanza(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One stanza per host made each Connection ask for the user name once per stanza (quadratic at 256
    hosts); the quick lookup asks only where a Match needs it, and every answer stays paramiko's."""
    import getpass

    from fablaunch.executor import _quick_ssh_config

    path = tmp_path / "ssh_config"
    path.write_text("".join(f"Host node{i}\n  HostName 127.0.0.{i}\n  Port {2000 + i}\n\n" for i in range(1, 41))
                    + "Match originalhost node7 user root\n  User seven\n\nMatch localuser nobody-here\n  Port 9\n\n"
                    + "Host *.lab\n  User lab\n\nHost *\n  ConnectTimeout 7\n")
    plain, quick = fabric.Config(runtime_ssh_path=str(path)), fabric.Config(runtime_ssh_path=str(path))
    _quick_ssh_config(quick)
    asked: list[str] = []
    real = getpass.getuser
    monkeypatch.setattr(getpass, "getuser", lambda: asked.append("?") or real())
    for name in ["node1", "node7", "node40", "gpu.lab", "elsewhere"]:
        fast, slow = fabric.Connection(name, config=quick), fabric.Connection(name, config=plain)
        assert (fast.host, fast.port, fast.user, dict(fast.ssh_config)) == \
               (slow.host, slow.port, slow.user, dict(slow.ssh_config))
    asked.clear()
    fabric.Connection("node40", config=quick)
    assert len(asked) <= 5  # Fabric's default user, then the two Match stanzas in each of paramiko's two passes
    fabric.Connection("node40", config=plain)
    assert len(asked) > 80


def test_hosts_are_read_over_descriptors_numbered_past_1024(cluster: Cluster) -> None:
    """A launch to a few hundred hosts holds a socket per host and a pipe pair per channel read: past
    descriptor 1024, where select.select fails ("filedescriptor out of range"); the executor polls."""
    fillers: list[int] = []
    try:
        while not fillers or fillers[-1] < 1100:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        with Executor(fabric.Config(runtime_ssh_path=str(cluster.ssh_config)), 8, deadline=20) as ex:
            out = ex.run({parse_host(name, "test"): (REMOTE_SHELL, "echo up; echo err >&2\n")
                          for name in cluster.names})
        assert {spec: (o.exit_code, o.stdout, o.stderr) for spec, o in out.items()} == \
               {name: (0, "up\n", "err\n") for name in cluster.names}
    finally:
        for fd in fillers:
            os.close(fd)


def test_the_open_file_limit_is_raised_to_the_hard_limit_for_many_hosts() -> None:
    """A soft limit of 1024 (many systems' default) would end a launch to a few hundred hosts in EMFILE."""
    script = ("import resource\n"
              "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
              "import fabric\n"
              "from fablaunch.executor import Executor\n"
              "Executor(fabric.Config(), 2).close()\n"
              "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n")
    soft, hard = map(int, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                         check=True, timeout=60).stdout.split())
    assert soft == (65536 if hard == resource.RLIM_INFINITY else min(hard, 65536))


def _long_script(lines: int, marker: Path | None = None) -> str:
    """A script well past BULK_MIN: numbered echo lines, a here-document and a quoted byte mix."""
    body = "".join(f"echo line {i}\n" for i in range(lines))
    touch = f"touch {marker}\n" if marker else ""
    return touch + body + "cat <<'EOF'\nheredoc $HOME `x`\nEOF\nprintf '%s\\n' 'a'\"'\"'b \\ $c'\n"


def test_a_long_script_runs_whole_read_in_bulk_on_a_real_host(cluster: Cluster) -> None:
    """A script past BULK_MIN is read by one `head -c`, not a byte per read(2), and runs exactly as sent:
    every line, a here-document and quoting intact; the first and the rest of a held script alike."""
    script = _long_script(1000)
    assert len(script) > BULK_MIN
    expected = "".join(f"line {i}\n" for i in range(1000)) + "heredoc $HOME `x`\na'b \\ $c\n"
    host = parse_host(cluster.names[0], "test")
    with Executor(fabric.Config(runtime_ssh_path=str(cluster.ssh_config)), 2, deadline=30) as ex:
        (out,) = ex.run({host: (REMOTE_SHELL, script + "exit 7\n")}).values()
        assert (out.exit_code, out.stdout, out.stderr) == (7, expected, "")
        held = ex.hold({host: (REMOTE_SHELL, script + f"kept=1\n{hold_line(0)}\n")})
        assert (held[host.spec].outcome.ok, held[host.spec].outcome.stdout) == (True, expected)
        (rest,) = ex.release(held, {host.spec: 'echo "kept=$kept"\n' + script}).values()
        assert (rest.exit_code, rest.stdout) == (0, "kept=1\n" + expected)


def test_a_long_script_cut_short_runs_nothing_of_itself(tmp_path: Path) -> None:
    """A launcher gone mid-send leaves a script cut short: bash reading it line by line would run its
    first half; read in bulk, without its end mark, none of it runs."""
    marker = tmp_path / "ran"
    whole = _bulk(_long_script(1000, marker).encode())
    for cut in (len(whole) - 1, len(whole) // 2):
        done = subprocess.run(["bash", "-s"], input=whole[:cut], capture_output=True, timeout=30)
        assert done.returncode == 141 and b"cut short; nothing of it ran" in done.stderr
        assert not done.stdout and not marker.exists()
    done = subprocess.run(["bash", "-s"], input=whole, capture_output=True, timeout=30)
    assert done.returncode == 0 and marker.exists() and done.stdout.startswith(b"line 0\n")


def test_a_short_script_is_sent_as_it_is() -> None:
    assert _bulk(b"echo hi\n") == b"echo hi\n"
