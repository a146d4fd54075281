"""`fab errors`: every failure a job recorded, in the order it happened, the first one in full.

When one rank dies, the others die soon after of NCCL or rendezvous timeouts, and each of those later
failures has a traceback too. The root cause is almost always the earliest failure of a training
process, so failures are put in time order and a rank's (or torchrun worker's) own failure wins over
the torchrun agent's, whose error merely reports that a worker or the rendezvous went away.
Building the list is pure: it reads the `SessionState`s of one survey, so it is unit-tested without SSH.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from .survey import SessionState, WorkerError

# Processes that run training code, as opposed to torchrun's agent watching them.
PRIMARY = ("rank", "worker")


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
            return f"node {self.node} worker {self.local_rank}"
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


def _from_error(base: Failure, error: dict[str, Any] | None, file: str, when: float | None) -> Failure:
    exc_type, message, trace, stamp = parse_error(error)
    base.exc_type, base.message, base.traceback, base.file = exc_type, message, trace, file
    base.time = when or stamp or base.time
    return base


def _worker(s: SessionState, w: WorkerError) -> Failure:
    base = Failure(s.job, s.host, s.session, "worker", None, s.node, w.local_rank, None)
    return _from_error(base, w.error, w.path, w.mtime)


def collect(states: list[SessionState]) -> list[Failure]:
    """Every failure of the sessions' ranks, workers and torchrun agents, earliest first."""
    found: list[Failure] = []
    for s in states:
        found += [_worker(s, w) for w in s.worker_errors]
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
        return f"killed by signal {f.signal}"
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

    out = ui.console()
    out.print(f"job {job}: {len(failures)} failures; first: {root.who} on {root.host} at {clock(root.time)}",
              style="bold red", markup=False)
    out.print(f"  {describe(root)}", markup=False)
    if root.traceback:
        ui.show_text(f"traceback of {root.who} on {root.host} ({root.file})", root.traceback)
    others = [f for f in failures if f is not root]
    if others:
        rows = [(f"{f.time - root.time:+.2f}s" if f.time and root.time else "?", f.host, f.who, describe(f))
                for f in others]
        ui.table("later failures", ("after first", "host", "who", "how"), rows)

