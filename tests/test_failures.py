"""Ordering a job's failures: the earliest failure of training code is the root cause."""

from __future__ import annotations

import json

from tasks import failures
from tasks.survey import SessionState, WorkerError


def record(message: str, trace: str = "", stamp: str = "100") -> dict[str, object]:
    return {"message": {"message": message, "extraInfo": {"py_callstack": trace, "timestamp": stamp}}}


def rank(r: int, state: str, ended: float | None, code: int | None = None, signal: int | None = None,
         error: dict[str, object] | None = None, error_time: float | None = None) -> SessionState:
    return SessionState("j", "gpus", f"node{r % 2 + 1}", f"j-rank-{r}", r, r % 2, state, exit_code=code,
                        signal=signal, ended=ended, error=error, error_time=error_time,
                        log=f"~/.fablaunch/jobs/j/node{r % 2 + 1}/rank-{r}.log")


def node(n: int, state: str, ended: float | None, workers: tuple[WorkerError, ...] = (), **kw: object) -> SessionState:
    return SessionState("j", "torchrun", f"node{n + 1}", f"j-node-{n}", None, n, state, ended=ended,
                        worker_errors=list(workers), log=f"~/.fablaunch/jobs/j/node{n + 1}/node-{n}.log", **kw)


# --- reading error files ------------------------------------------------------------------------------------


def test_record_style_error_files_give_type_message_traceback_and_timestamp() -> None:
    trace = "Traceback (most recent call last):\n  File \"t.py\", line 3\nValueError: boom\n"
    assert failures.parse_error(record("ValueError: boom", trace, "1700000000")) == (
        "ValueError", "boom", trace.rstrip(), 1700000000.0)


def test_a_message_without_an_exception_type_is_kept_whole() -> None:
    assert failures.parse_error(record("Signal 6 received by PID 12: core dumped"))[:2] == (
        "", "Signal 6 received by PID 12: core dumped")
    assert failures.parse_error({"message": "RuntimeError: flat"})[:2] == ("RuntimeError", "flat")


def test_unreadable_or_missing_error_files_give_nothing_not_a_crash() -> None:
    assert failures.parse_error(None) == ("", "", "", None)
    assert failures.parse_error({"raw": "{not json"}) == ("", "{not json", "", None)
    assert failures.parse_error(record("KeyError: 'x'", stamp="soon"))[3] is None


def test_a_multiline_message_reports_its_last_line() -> None:
    assert failures.parse_error(record("while doing x:\nOSError: disk full"))[:2] == ("OSError", "disk full")


# --- ordering -----------------------------------------------------------------------------------------------


def test_failures_are_in_time_order_and_only_failed_or_killed_sessions_count() -> None:
    states = [rank(0, "failed", 30.0, code=1), rank(1, "killed", 20.0, signal=9), rank(2, "succeeded", 5.0, code=0),
              rank(3, "running", None), rank(4, "lost", None)]
    found = failures.collect(states)
    assert [(f.rank, f.time) for f in found] == [(1, 20.0), (0, 30.0)]
    assert failures.first(found).rank == 1
    assert [failures.describe(f) for f in found] == ["killed by signal 9", "exit 1 (no error file)"]


def test_an_error_files_time_counts_before_a_slow_exit() -> None:
    late_exit = rank(1, "failed", 50.0, code=1, error=record("ValueError: boom"), error_time=10.0)
    found = failures.collect([rank(0, "failed", 20.0, code=1), late_exit])
    assert [f.rank for f in found] == [1, 0]
    assert (found[0].exc_type, found[0].message, found[0].time) == ("ValueError", "boom", 10.0)
    assert found[0].file == "~/.fablaunch/jobs/j/node2/rank-1.error.json"


def test_a_torchrun_workers_failure_wins_over_an_agent_that_ended_earlier() -> None:
    worker = WorkerError(1, 0, "/h/node-1.torchrun/r/attempt_0/1/error.json", 12.0, record("ValueError: boom"))
    echo = node(0, "failed", 11.0, exit_code=1)  # the other node's agent noticed first
    found = failures.collect([echo, node(1, "failed", 13.0, [worker], exit_code=1)])
    assert [(f.kind, f.node) for f in found] == [("node", 0), ("worker", 1), ("node", 1)]
    root = failures.first(found)
    assert (root.who, root.host, failures.describe(root)) == ("node 1 worker 1", "node2", "ValueError: boom")


def test_without_any_failure_there_is_no_first() -> None:
    assert failures.first(failures.collect([rank(0, "succeeded", 1.0, code=0)])) is None


def test_json_names_the_job_the_first_failure_and_all_of_them() -> None:
    found = failures.collect([rank(0, "failed", 2.0, code=3), rank(1, "failed", 1.0, code=4)])
    data = json.loads(failures.as_json("j", found))
    assert data["job"] == "j" and data["first"]["rank"] == 1 and data["first"]["who"] == "rank 1"
    assert [(f["rank"], f["exit_code"]) for f in data["failures"]] == [(1, 4), (0, 3)]
    assert json.loads(failures.as_json("j", []))["first"] is None
