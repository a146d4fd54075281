"""Ordering a job's failures: the earliest failure of training code is the root cause."""

from __future__ import annotations

import json

import pytest

from fablaunch import failures
from fablaunch.survey import SessionState, WorkerError
from fablaunch.tasks import jobs

# What torch 2.13's torchrun agent printed (2 workers on one node, `--redirects 3`) when worker 1 did
# os.kill(os.getpid(), 9); it wrote no TORCHELASTIC error file, neither the worker's nor its own.
SIGKILLED = """\
W1124 19:59:26.175000 22350 site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 22451 closing signal SIGTERM
E1124 19:59:26.177000 22350 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -9) local_rank: 1 (pid: 22452) of binary: /root/.pyenv/versions/3.11.7/bin/python3
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
=======================================================
w.py FAILED
-------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-24_19:59:26
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 22451)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 22451
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-24_19:59:26
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 22452)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 22452
=======================================================
""".splitlines()  # noqa: E501, W291
# The end of the summary when worker 1 did sys.exit(3) without @record (no error file either).
EXITED = """\
Root Cause (first observed failure):
[0]:
  time      : 2026-11-24_20:04:28
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 3 (pid: 5514) 
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
""".splitlines()  # noqa: W291
# ... and when worker 1 raised under @record: its error file tells the rest.
RAISED = """\
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 5566) 
  error_file: /h/node-0.torchrun/j_v1l_g_zp/attempt_0/1/error.json
  traceback : Traceback (most recent call last):
  ValueError: boom
============================================================
""".splitlines()  # noqa: W291


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
    assert [failures.describe(f) for f in found] == ["killed by signal 9 (SIGKILL)", "exit 1 (no error file)"]


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


def test_a_workers_error_file_is_named_by_its_global_rank_when_the_node_knows_its_ranks() -> None:
    worker = WorkerError(1, 0, "/h/node-1.torchrun/r/attempt_0/1/error.json", 12.0, record("ValueError: boom"))
    root = failures.first(failures.collect([node(1, "failed", 13.0, [worker], exit_code=1, ranks=[2, 3])]))
    assert (root.rank, root.who) == (3, "rank 3 (node 1 worker 1)")


def test_without_any_failure_there_is_no_first() -> None:
    assert failures.first(failures.collect([rank(0, "succeeded", 1.0, code=0)])) is None


def test_json_names_the_job_the_first_failure_and_all_of_them() -> None:
    found = failures.collect([rank(0, "failed", 2.0, code=3), rank(1, "failed", 1.0, code=4)])
    data = json.loads(failures.as_json("j", found))
    assert data["job"] == "j" and data["first"]["rank"] == 1 and data["first"]["who"] == "rank 1"
    assert [(f["rank"], f["exit_code"]) for f in data["failures"]] == [(1, 4), (0, 3)]
    assert json.loads(failures.as_json("j", []))["first"] is None


# --- torchrun workers that left no error file ---------------------------------------------------------------


def tail(lines: list[str], n: int = 5) -> list[str]:
    """What `fab status` keeps of a log: its last lines, blank ones dropped."""
    return [line for line in lines[-n:] if line.strip()]


@pytest.mark.parametrize("lines", [SIGKILLED, tail(SIGKILLED)], ids=["whole log", "last 5 lines"])
def test_the_agents_summary_names_the_worker_and_its_signal(lines: list[str]) -> None:
    told = failures.worker_exit(lines)
    assert told == failures.WorkerExit(local_rank=1, rank=1, exit_code=-9, pid=22452, error_file="<N/A>")
    assert told.signal == 9


def test_without_the_summary_the_agents_log_line_names_the_worker() -> None:
    told = failures.worker_exit(SIGKILLED[:2])
    assert (told.local_rank, told.signal, told.pid, told.error_file) == (1, 9, 22452, "")


def test_lines_that_are_not_torchruns_name_nobody() -> None:
    assert failures.worker_exit([]) is None
    assert failures.worker_exit(["rank 1 does exitcode stuff", "exitcode: -9", "failed (exitcode: -9) local_rank"]) \
        is None


def test_a_sigkilled_worker_is_reported_with_its_signal_and_is_the_first_failure() -> None:
    agent = node(0, "failed", 30.0, exit_code=1, tail=tail(SIGKILLED))
    found = failures.collect([agent])
    assert [(f.kind, f.who) for f in found] == [("worker", "rank 1 (node 0 worker 1)"), ("node", "node 0")]
    root = failures.first(found)
    assert (root.rank, root.signal, root.exit_code, root.time, root.file) == (1, 9, None, 30.0, agent.log)
    assert failures.describe(root) == "killed by signal 9 (SIGKILL)"
    assert failures.describe(found[1]) == "exit 1 (no error file)"  # the agent's echo
    data = json.loads(failures.as_json("j", found))
    assert data["first"]["who"] == "rank 1 (node 0 worker 1)" and data["first"]["signal"] == 9


def test_status_names_the_worker_and_its_signal() -> None:
    lines = jobs.summary("j", [node(0, "failed", 30.0, exit_code=1, tail=tail(SIGKILLED)),
                               node(1, "running", None)])
    assert lines[:2] == ["job j: 2 sessions, 1 failed, 1 running; first failure: rank 1 (node 0 worker 1) on node1",
                         "  error: killed by signal 9 (SIGKILL)"]


def test_a_worker_that_exited_without_record_is_named_with_its_exit_code() -> None:
    root = failures.first(failures.collect([node(1, "failed", 30.0, exit_code=1, tail=tail(EXITED))]))
    assert (root.who, root.exit_code, failures.describe(root)) == ("rank 1 (node 1 worker 1)", 3,
                                                                   "exit 3 (no error file)")


def test_a_worker_with_an_error_file_is_reported_from_it_not_from_the_log() -> None:
    worker = WorkerError(1, 0, "/h/node-0.torchrun/j_v1l_g_zp/attempt_0/1/error.json", 29.0,
                         record("ValueError: boom"))
    found = failures.collect([node(0, "failed", 30.0, [worker], exit_code=1, tail=tail(RAISED, 6))])
    assert [(f.who, failures.describe(f)) for f in found] == [("node 0 worker 1", "ValueError: boom"),
                                                             ("node 0", "exit 1 (no error file)")]


def test_the_log_is_read_only_for_an_agent_that_failed() -> None:
    for state in ("running", "succeeded"):
        assert failures.collect([node(0, state, None, tail=tail(SIGKILLED))]) == []
    gpus_rank = rank(0, "failed", 3.0, code=1)
    gpus_rank.tail = tail(SIGKILLED)  # a rank that printed torchrun-like text is still a rank
    assert [f.kind for f in failures.collect([gpus_rank])] == ["rank"]


def test_signals_are_named_as_on_linux() -> None:
    assert [failures.describe(f) for f in failures.collect([rank(0, "killed", 1.0, signal=15),
                                                            rank(1, "killed", 2.0, signal=10),
                                                            rank(2, "killed", 3.0, signal=40)])] == [
        "killed by signal 15 (SIGTERM)", "killed by signal 10 (SIGUSR1)", "killed by signal 40"]
