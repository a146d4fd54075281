"""The executor's held shells: a check and the action it guards run in one shell per host.

`localhost` runs through a local bash, so these run without SSH; the real-cluster launch tests
cover the same code over SSH.
"""

from __future__ import annotations

from pathlib import Path

import fabric

from tasks.executor import REMOTE_SHELL, Executor, hold_line
from tasks.hostfile import parse_host

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
