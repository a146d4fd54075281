"""`fab errors`: every failure a job recorded, in the order it happened, the first one in full.

When one rank dies, the others die soon after of NCCL or rendezvous timeouts, and each of those later
failures has a traceback too. The root cause is almost always the earliest failure of a training
process, so failures are put in time order and a rank's (or torchrun worker's) own failure wins over
the torchrun agent's, whose error merely reports that a worker or the rendezvous went away.
Building the list is pure: it reads the `SessionState`s of one survey, so it is unit-tested without SSH.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from .survey import SessionState, WorkerError

# Processes that run training code, as opposed to torchrun's agent watching them.
PRIMARY = ("rank", "worker")

# Signal names by number as on Linux, where the ranks run: the launcher may be a Mac, whose numbers differ.
SIGNALS = dict(enumerate([
    "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2", "PIPE", "ALRM", "TERM",
    "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG", "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO",
    "PWR", "SYS"], start=1))

# A torchrun worker that dies without an error file (a signal, or an exit without @record) is told
# only in its agent's output; the agent writes no error file of its own for it (record() dumps only a
# worker's file). torch 2.13's agent logs (elastic/multiprocessing/api.py)
#   E1124 19:59:26.177000 22350 .../api.py:1002] failed (exitcode: -9) local_rank: 1 (pid: 22452) of binary: ...
# and ends its output with ChildFailedError's summary, the root cause last (errors/__init__.py):
#   Root Cause (first observed failure):
#   [0]:
#     time      : 2026-11-24_19:59:26
#     host      : node1
#     rank      : 1 (local_rank: 1)
#     exitcode  : -9 (pid: 22452)  (SIGKILL)
#     error_file: <N/A>
#     traceback : Signal 9 (SIGKILL) received by PID 22452
#   =======================================================
NO_ERROR_FILE = "<N/A>"
_AGENT_LINE = re.compile(r"\] failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)")
_RANK_LINE = re.compile(r"\s*rank\s*: (\d+) \(local_rank: (\d+)\)\s*")
_EXIT_LINE = re.compile(r"\s*exitcode\s*: (-?\d+) \(pid: (\d+)\)(?:\s+\((\w+)\))?\s*")
_FILE_LINE = re.compile(r"\s*error_file\s*: (.*?)\s*")


@dataclass
class Failure:
    """One recorded failure: who, when, how it ended, and the exception if an error file caught it."""

    job: str
    host: str
    session: str
    kind: str  # rank (per-GPU mode), worker (a torchrun worker), node (torchrun's agent)
    rank: int | None
    node: int | None
    local_rank: int | None
    time: float | None
    exit_code: int | None = None
    signal: int | None = None
    exc_type: str = ""
    message: str = ""
    traceback: str = ""
    file: str = ""

    @property
    def who(self) -> str:
        if self.kind == "rank":
            return f"rank {self.rank}"
        if self.kind == "worker":
            worker = f"node {self.node} worker {'?' if self.local_rank is None else self.local_rank}"
            return worker if self.rank is None else f"rank {self.rank} ({worker})"
        return f"node {self.node}"

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "who": self.who}


def parse_error(error: dict[str, Any] | None) -> tuple[str, str, str, float | None]:
    """(exception type, message, traceback, timestamp) of a TORCHELASTIC error file.

    `@record` writes {"message": {"message": "ValueError: boom", "extraInfo": {"py_callstack": ...,
    "timestamp": ...}}}; older writers put the message string at the top level; unreadable files
    are kept as {"raw": text}.
    """
    if not error:
        return "", "", "", None
    inner = error.get("message", error.get("raw", ""))
    extra: dict[str, Any] = {}
    if isinstance(inner, dict):
        extra = inner.get("extraInfo") or {}
        inner = inner.get("message", "")
    extra = extra or error.get("extraInfo") or {}
    text = str(inner).strip()
    trace = str(extra.get("py_callstack", "")).rstrip()
    last = text.splitlines()[-1] if text else (trace.splitlines()[-1] if trace else "")
    exc_type, sep, message = last.partition(": ")
    if not sep or " " in exc_type:
        exc_type, message = "", last
    try:
        stamp = float(extra["timestamp"]) if extra.get("timestamp") else None
    except (TypeError, ValueError):
        stamp = None
    return exc_type, message, trace, stamp


@dataclass(frozen=True)
class WorkerExit:
    """How torchrun's agent told a worker's end: its ranks, exit code (negative: killed by that signal), pid."""

    local_rank: int | None
    rank: int | None
    exit_code: int
    pid: int | None
    error_file: str = ""  # NO_ERROR_FILE when the worker left none, "" when the lines do not say

    @property
    def signal(self) -> int | None:
        return -self.exit_code if self.exit_code < 0 else None


def worker_exit(lines: list[str]) -> WorkerExit | None:
    """The failed worker torchrun's agent names last in these lines of its output (its root cause), if any.

    The summary's entries are read from their rank, exitcode and error_file lines; its root cause
    comes last. Without a summary, the agent's last `failed (exitcode: ...)` log line counts.
    """
    found: WorkerExit | None = None
    rank = local = None
    for line in lines:
        if m := _RANK_LINE.fullmatch(line):
            rank, local = int(m[1]), int(m[2])
        elif m := _EXIT_LINE.fullmatch(line):
            found = WorkerExit(local, rank, int(m[1]), int(m[2]))
            rank = local = None
        elif (m := _FILE_LINE.fullmatch(line)) and found is not None and not found.error_file:
            found = replace(found, error_file=m[1])
        elif m := _AGENT_LINE.search(line):
            found = WorkerExit(int(m[2]), None, int(m[1]), int(m[3]))
    return found


def _agent_told(s: SessionState) -> Failure | None:
    """A failed torchrun worker that left no error file, as its agent told it at the end of the node's log."""
    if s.mode != "torchrun" or not s.ended_badly:
        return None
    told = worker_exit(s.tail)
    if told is None or told.exit_code == 0 or told.error_file not in ("", NO_ERROR_FILE):
        return None  # a worker's error file, where there is one, tells more and is read instead
    if not told.error_file and any(w.local_rank == told.local_rank for w in s.worker_errors):
        return None
    # The summary's time has whole seconds in the host's unnamed time zone; the agent ends just after.
    return Failure(s.job, s.host, s.session, "worker", told.rank, s.node, told.local_rank, s.failed_at,
                   exit_code=None if told.signal else told.exit_code, signal=told.signal, file=s.log)


def _from_error(base: Failure, error: dict[str, Any] | None, file: str, when: float | None) -> Failure:
    exc_type, message, trace, stamp = parse_error(error)
    base.exc_type, base.message, base.traceback, base.file = exc_type, message, trace, file
    base.time = when or stamp or base.time
    return base


def _worker(s: SessionState, w: WorkerError) -> Failure:
    rank = s.ranks[w.local_rank] if w.local_rank is not None and 0 <= w.local_rank < len(s.ranks) else None
    base = Failure(s.job, s.host, s.session, "worker", rank, s.node, w.local_rank, None)
    return _from_error(base, w.error, w.path, w.mtime)


def collect(states: list[SessionState]) -> list[Failure]:
    """Every failure of the sessions' ranks, workers and torchrun agents, earliest first."""
    found: list[Failure] = []
    for s in states:
        found += [_worker(s, w) for w in s.worker_errors]
        told = _agent_told(s)
        if told:
            found.append(told)
        if not s.ended_badly:
            continue
        kind = "rank" if s.mode == "gpus" else "node"
        failure = Failure(s.job, s.host, s.session, kind, s.rank, s.node, None, s.failed_at, s.exit_code, s.signal)
        if s.error:  # file times are exact; the timestamp inside an error file has whole seconds
            failure = _from_error(failure, s.error, s.log.removesuffix(".log") + ".error.json", s.failed_at)
        found.append(failure)
    return sorted(found, key=lambda f: (f.time is None, f.time or 0.0, f.kind not in PRIMARY, f.rank or 0))


def first(failures: list[Failure]) -> Failure | None:
    """The likely root cause: the earliest failure of training code, else the earliest of any kind."""
    return next((f for f in failures if f.kind in PRIMARY), failures[0] if failures else None)


def describe(f: Failure) -> str:
    """How a failure ended, in a few words: the exception, else the exit code or signal."""
    if f.exc_type or f.message:
        return f"{f.exc_type}: {f.message}" if f.exc_type else f.message
    if f.signal:
        name = SIGNALS.get(f.signal)
        return f"killed by signal {f.signal}" + (f" (SIG{name})" if name else "")
    return f"exit {f.exit_code} (no error file)" if f.exit_code is not None else "failed (no error file)"


def as_json(job: str, failures: list[Failure]) -> str:
    root = first(failures)
    return json.dumps({"job": job, "first": root.as_json() if root else None,
                       "failures": [f.as_json() for f in failures]}, indent=2)


def report(job: str, failures: list[Failure]) -> None:
    """Print the first failure in full (with its traceback), then one line per other failure."""
    from datetime import datetime

    from . import ui

    root = first(failures)
    if root is None:
        ui.say(f"job {job}: no failures recorded.", "green")
        return

    def clock(t: float | None) -> str:
        return datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3] if t else "?"

    ui.say(f"job {job}: {ui.plural(len(failures), 'failure')}; first: {root.who} on {root.host} at {clock(root.time)}",
           "bold red")
    ui.say(f"  {describe(root)}")
    if root.traceback:
        ui.show_text(f"traceback of {root.who} on {root.host} ({root.file})", root.traceback)
    others = [f for f in failures if f is not root]
    if others:
        rows = [(f"{f.time - root.time:+.2f}s" if f.time and root.time else "?", f.host, f.who, describe(f))
                for f in others]
        ui.table("later failures", ("after first", "host", "who", "how"), rows,
                 key_columns=("after first", "host", "who"), free_columns=("how",))

