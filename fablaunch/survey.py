"""Find out what the jobs on a host are doing, in one read-only round trip.

A host is the source of truth for its jobs: tagged tmux sessions say what still runs, and each job
directory holds a manifest, exit records, logs and TORCHELASTIC error files that outlive sessions,
tmux servers and `fab stop`. The survey payload dumps all of it with a handful of processes per job
(no loop of `cat`s), and `parse` turns the dump into one `SessionState` per session. Parsing is pure
so the state rules (running, succeeded, failed, killed, lost) are unit-tested without a cluster.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

from . import tmux
from .hostfile import Host
from .plan import JOBS_DIR, RemotePath
from .scripts import SESSION_VAR, sh

# Starts a section line in a payload's output. The random part is new in every fab process, so
# nothing a rank prints (logs, error files, command lines) can start a section or forge a record.
SEP = "\x1e" + secrets.token_hex(8)
TAIL_LINES = 5  # at least 5: a torchrun node log's last 5 lines name a signalled worker (failures.worker_exit)


# States a session cannot leave; the others (running, unknown) may still change.
# States of a session that has ended; the last three are Slurm's word for a task it ended itself.
ENDED = frozenset({"succeeded", "failed", "killed", "lost", "cancelled", "timeout", "node fail"})
BAD_ENDS = frozenset({"failed", "killed", "cancelled", "timeout", "node fail"})


@dataclass
class WorkerError:
    """A TORCHELASTIC error file one torchrun worker wrote (its traceback under `@record`)."""

    local_rank: int | None
    attempt: int | None
    path: str
    mtime: float | None
    error: dict[str, Any]


@dataclass
class WorkerLog:
    """One torchrun worker's stdout or stderr log (newest attempt), as the survey saw it."""

    local_rank: int
    stream: str  # stdout or stderr
    path: str
    mtime: float | None
    tail: list[str]


@dataclass
class SessionState:
    """What one session of a job is doing, as `fab status` and `--json` report it."""

    job: str
    mode: str
    host: str
    session: str
    rank: int | None
    node: int | None
    state: str  # running, succeeded, failed, killed, lost, unknown
    exit_code: int | None = None
    signal: int | None = None
    pid: int | None = None
    started: float | None = None
    ended: float | None = None
    runtime: float | None = None
    log: str = ""
    last_line: str = ""
    log_age: float | None = None
    detached: bool = False  # running, but its tmux session (or server) is gone
    tail: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    error_time: float | None = None
    launched: str = ""
    # torchrun mode: the error files torchrun's workers left (local_rank, attempt, path, mtime, content).
    worker_errors: list[WorkerError] = field(default_factory=list)
    # torchrun mode: the global rank of each of the node's workers, by local rank (ranks[local] = global),
    # and where that came from: "torchrun" (the RANK torchrun gave a live worker) or "assumed" (see fill_ranks).
    ranks: list[int] = field(default_factory=list)
    ranks_source: str = ""
    backend: str = "ssh"  # ssh (a tmux session on a host) or slurm (a task of a Slurm job)
    run: str = ""  # the launch that wrote its manifest (a relaunch is a new run of the same job)
    slurm_job: str | None = None
    # torchrun mode: the node's workers' stdout/stderr logs of its newest attempt, with their last lines.
    worker_logs: list[WorkerLog] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("tail")
        data.pop("worker_errors")
        data.pop("worker_logs")
        return data

    def rank_of(self, local_rank: int) -> int | None:
        """The global rank of this torchrun node's worker `local_rank`, if known."""
        return self.ranks[local_rank] if 0 <= local_rank < len(self.ranks) else None

    def local_of(self, rank: int) -> int | None:
        """The local rank of this torchrun node's worker with global rank `rank`, if it is one of them."""
        return self.ranks.index(rank) if rank in self.ranks else None

    @property
    def ended_badly(self) -> bool:
        return self.state in BAD_ENDS

    @property
    def failed_at(self) -> float | None:
        """When it failed: its error file is written at the exception, before a slow exit."""
        times = [t for t in (self.error_time, self.ended) if t]
        return min(times) if times else None


def payload(host: Host, job: str | None, files_in: str | None = None) -> str:
    """Dump this host's tagged sessions, live processes and job files; `job` None means every job.

    `files_in` reads only the job files under that directory, every node's (a Slurm job's shared
    directory): what runs there is Slurm's to say, and this machine's tmux and /proc know nothing of it.
    """
    if files_in is None:
        glob = f"{sh(RemotePath(JOBS_DIR))}/{sh(job) if job is not None else '*'}/{sh(host.label)}/manifest.json"
    else:
        glob = f"{sh(files_in)}/{sh(job) if job is not None else '*'}/*/manifest.json"
    live = [] if files_in is not None else [
        'printf "%sTMUX\\n" "$sep"',
        tmux.list_command(job, host.spec),
        # Which session each live process belongs to: a rank outlives a killed tmux server.
        'printf "%sPROCS\\n" "$sep"',
        # RANK and LOCAL_RANK too: the global rank torchrun gave each live worker (parse keeps those of
        # processes that carry a session marker of ours).
        f"grep -Hasxz -E -- {sh('(' + SESSION_VAR + '=[A-Za-z0-9_.@+=-]+|RANK=[0-9]+|LOCAL_RANK=[0-9]+)')} "
        "/proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'",
    ]
    return "\n".join([
        f"sep=$'{SEP}'",
        'printf "%sNOW %s\\n" "$sep" "$(date +%s.%N)"',
        *live,
        f"for m in {glob}; do",
        '  [ -f "$m" ] || continue',
        '  d=${m%/manifest.json}',
        '  printf "%sMANIFEST %s\\n" "$sep" "$d"; cat "$m"; echo',
        '  set -- "$d"/*.exit "$d"/*.error.json',
        '  [ -e "$1" ] || shift',
        '  awk -v s="$sep" \'FNR==1{print s "FILE " FILENAME} {print}\' "$@" 2>/dev/null </dev/null',
        '  printf "%sMTIMES\\n" "$sep"; stat -c "%n %Y" "$d"/*.log 2>/dev/null',
        # One section per log: tail's own `==> file <==` headers could be printed by a rank.
        '  for f in "$d"/*.log; do [ -f "$f" ] || continue',
        f'    printf "%sTAIL %s\\n" "$sep" "$f"; tail -n {TAIL_LINES} "$f" 2>/dev/null; echo',
        "  done",
        "  # torchrun's workers write their own error files under the node's --log-dir.",
        '  printf "%sERRTIMES\\n" "$sep"; find "$d" -name "*error.json" -printf "%p %T@\\n"',
        '  find "$d" -path "*.torchrun/*" -name error.json -exec awk -v s="$sep" '
        '\'FNR==1{print s "FILE " FILENAME} {print}\' {} + </dev/null',
        # Each torchrun node's workers' logs, newest attempt only (<log dir>/<run>/attempt_<A>/<local>/):
        # their times, then one section per file, as for the session logs.
        '  for n in "$d"/*.torchrun; do [ -d "$n" ] || continue',
        '    a=$(ls -td -- "$n"/*/attempt_*/ 2>/dev/null | head -n 1); [ -n "$a" ] || continue',
        '    printf "%sWTIMES %s\\n" "$sep" "$n"',
        '    find "$a" -mindepth 2 -maxdepth 2 -name "std*.log" -printf "%p %T@\\n" 2>/dev/null',
        '    for f in "$a"*/stdout.log "$a"*/stderr.log; do [ -f "$f" ] || continue',
        f'      printf "%sWTAIL %s\\n" "$sep" "$f"; tail -n {TAIL_LINES} "$f" 2>/dev/null; echo',
        "    done",
        "  done",
        "done",
        "exit 0",
        "",
    ])


def sections(text: str) -> list[tuple[str, str, list[str]]]:
    """Split a payload's output at its `SEP KIND ARG` lines into (kind, arg, lines), in order."""
    sections: list[tuple[str, str, list[str]]] = []
    for line in text.split("\n"):
        if line.startswith(SEP):
            kind, _, arg = line[len(SEP):].partition(" ")
            sections.append((kind, arg, []))
        elif sections:
            sections[-1][2].append(line)
    return sections


def _tail(lines: list[str]) -> list[str]:
    """A log's last lines as a terminal showed them (after any `\r`), blank lines dropped."""
    return [x for x in (t.rsplit("\r", 1)[-1] for t in lines) if x.strip()]


_PROC = re.compile(r"/proc/(\d+)/environ:" + SESSION_VAR + r"=(\S+)")
_RANK_VAR = re.compile(r"/proc/(\d+)/environ:(RANK|LOCAL_RANK)=(\d+)")
_WORKER_LOG = re.compile(r"(\d+)/(stdout|stderr)\.log")


def _stamps(lines: list[str]) -> dict[str, float]:
    """`PATH SECONDS` lines (stat or find output) as {path: seconds}; malformed lines are skipped."""
    stamps = {}
    for line in lines:
        path, _, stamp = line.rpartition(" ")
        value = as_float(stamp)
        if path and value is not None:
            stamps[path] = value
    return stamps


def _session_from_tmux(line: str) -> dict[str, str] | None:
    fields = line.split(tmux.FIELD_SEP)
    return dict(zip(tmux.FIELDS, fields, strict=True)) if len(fields) == len(tmux.FIELDS) else None


def parse(host: Host, text: str) -> list[SessionState]:
    """Turn one host's dump into session states (sessions without files are reported too).

    Nothing in the dump is trusted to be well-formed: a manifest or record that does not parse is
    skipped, never fatal, so one damaged job directory cannot hide every other job.
    """
    now = 0.0
    live: dict[str, dict[str, str]] = {}
    procs: dict[str, list[int]] = {}
    rank_vars: dict[int, dict[str, int]] = {}  # pid -> RANK, LOCAL_RANK
    worker_times: dict[str, float] = {}
    worker_tails: dict[str, list[str]] = {}
    states: list[SessionState] = []
    files: dict[str, str] = {}
    mtimes: dict[str, float] = {}
    error_times: dict[str, float] = {}
    tails: dict[str, list[str]] = {}
    manifests: list[tuple[str, dict[str, Any]]] = []
    for kind, arg, lines in sections(text):
        if kind == "NOW":
            now = as_float(arg) or 0.0
        elif kind == "TMUX":
            for line in lines:
                info = _session_from_tmux(line)
                if info:
                    live[info["session_name"]] = info
        elif kind == "PROCS":
            for line in lines:
                m = _PROC.fullmatch(line)
                if m and m.group(2).endswith(f"@{host.label}"):
                    procs.setdefault(m.group(2).removesuffix(f"@{host.label}"), []).append(int(m.group(1)))
                elif r := _RANK_VAR.fullmatch(line):
                    rank_vars.setdefault(int(r.group(1)), {})[r.group(2)] = int(r.group(3))
        elif kind == "MANIFEST":
            manifest = _json("\n".join(lines))
            if manifest is not None:
                manifests.append((arg, manifest))
        elif kind == "FILE":
            files[arg] = "\n".join(lines)
        elif kind == "MTIMES":
            mtimes.update(_stamps(lines))
        elif kind == "ERRTIMES":
            error_times.update(_stamps(lines))
        elif kind == "TAIL":
            tails[arg] = _tail(lines)
        elif kind == "WTIMES":
            worker_times.update(_stamps(lines))
        elif kind == "WTAIL":
            worker_tails[arg] = _tail(lines)
    seen: set[str] = set()
    for directory, manifest in manifests:
        for entry in manifest.get("sessions", []) if isinstance(manifest.get("sessions"), list) else []:
            try:
                state = _state(manifest, entry, live.get(entry["session"]), procs.get(entry["session"], []),
                               files, directory, now)
            except (KeyError, TypeError, ValueError, AttributeError):
                continue  # a damaged manifest entry: skip it, keep the rest
            base = f"{directory}/{state.session.removeprefix(f'{state.job}-')}"
            state.worker_errors = _worker_errors(f"{base}.torchrun/", files, error_times)
            state.error_time = error_times.get(f"{base}.error.json") if state.error else None
            tail = tails.get(state.log, [])
            state.tail, state.last_line = tail, tail[-1] if tail else ""
            if state.log in mtimes:
                state.log_age = max(0.0, now - mtimes[state.log])
            if state.mode == "torchrun":
                state.worker_logs = _worker_logs(f"{base}.torchrun/", worker_tails, worker_times)
                _worker_view(state, [rank_vars[p] for p in procs.get(state.session, []) if p in rank_vars], now)
            states.append(state)
            seen.add(state.session)
    for name, info in live.items():
        if name not in seen:  # a tagged session whose files are gone: still ours, still running
            states.append(SessionState(info["@fablaunch_job"], info["@fablaunch_mode"], host.spec, name,
                                       as_int(info["@fablaunch_rank"]), as_int(info["@fablaunch_node"]), "running",
                                       pid=as_int(info["pane_pid"]), started=as_float(info["session_created"])))
    return states


def _state(manifest: dict[str, Any], entry: dict[str, Any], live: dict[str, str] | None, pids: list[int],
           files: dict[str, str], directory: str, now: float) -> SessionState:
    """One session's state from its manifest entry, tmux, its live processes and its files.

    An exit record counts only if this run wrote it (its run id matches the manifest's): a rank of
    an earlier run that outlived its tmux server writes to the same path when it finally ends.
    """
    mode = str(manifest["mode"])
    job = str(manifest["job"])
    session = str(entry["session"])
    base = f"{directory}/{session.removeprefix(f'{job}-')}"
    state = SessionState(job, mode, str(entry["host"]), session,
                         as_int(str(entry["rank"])) if mode == "gpus" else None, as_int(str(entry["node"])), "lost",
                         launched=str(manifest.get("launched", "")), log=f"{base}.log",
                         run=str(manifest.get("run", "")))
    record = _json(files.get(f"{base}.exit"))
    if record is not None and record.get("run", "") != manifest.get("run", ""):
        record = None
    error_text = files.get(f"{base}.error.json")
    if error_text:
        state.error = _json(error_text) or {"raw": error_text[:2000]}
    if live:
        state.pid = as_int(live["pane_pid"])
        state.started = as_float(live["session_created"])
    code = record.get("exit_code") if record else None
    if record is not None and isinstance(code, int) and not isinstance(code, bool):
        state.started = state.started or as_float(str(record.get("start_time"))) or None
        state.ended = as_float(str(record.get("end_time"))) or None
        if code > 128:
            state.state, state.signal, state.exit_code = "killed", code - 128, None
        else:
            state.state, state.exit_code = ("succeeded" if code == 0 else "failed"), code
    elif live:
        state.state = "running"
    elif pids:  # its tmux session (or server) died under it, but the rank runs on
        state.state, state.detached, state.pid = "running", True, min(pids)
        state.started = as_float(str(record.get("start_time"))) if record else None
    end = state.ended or (now if state.state == "running" else None)
    if state.started and end:
        state.runtime = max(0.0, end - state.started)
    return state


def _worker_errors(prefix: str, files: dict[str, str], times: dict[str, float]) -> list[WorkerError]:
    """Error files under a node's torchrun log dir: <run>/attempt_<A>/<local rank>/error.json."""
    found = []
    for path, text in files.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        local = as_int(parts[-2]) if len(parts) >= 2 else None
        attempt = as_int(parts[-3].removeprefix("attempt_")) if len(parts) >= 3 else None
        found.append(WorkerError(local, attempt, path, times.get(path), _json(text) or {"raw": text[:2000]}))
    return sorted(found, key=lambda w: (w.mtime or 0, w.path))


def _worker_logs(prefix: str, tails: dict[str, list[str]], times: dict[str, float]) -> list[WorkerLog]:
    """A node's workers' logs: <log dir>/<run>/attempt_<A>/<local rank>/stdout.log|stderr.log."""
    found = []
    for path in sorted(set(tails) | set(times)):
        if not path.startswith(prefix):
            continue
        m = _WORKER_LOG.search(path)
        if m and path.endswith(m.group(0)) and path[:-len(m.group(0))].endswith("/"):
            found.append(WorkerLog(int(m.group(1)), m.group(2), path, times.get(path), tails.get(path, [])))
    return sorted(found, key=lambda w: (w.local_rank, w.stream != "stdout"))


def _worker_view(state: SessionState, live: list[dict[str, int]], now: float) -> None:
    """A torchrun node's last line (its newest worker log's, `[wL] ...`), log age and workers' global ranks.

    torchrun gives each node's workers consecutive global ranks in local rank order, so one live
    worker's RANK and LOCAL_RANK fix the whole node's. With no live worker they stay unknown here
    (fill_ranks assumes them across the job).
    """
    written = [w for w in state.worker_logs if w.tail]
    if written:
        newest = max(written, key=lambda w: (w.mtime or 0.0, w.stream == "stderr"))
        state.last_line = f"[w{newest.local_rank}] {newest.tail[-1]}"
        state.log_age = max(0.0, now - newest.mtime) if newest.mtime is not None else None
    workers = 1 + max((w.local_rank for w in state.worker_logs), default=-1)
    for env in live:
        if "RANK" in env and "LOCAL_RANK" in env and env["RANK"] >= env["LOCAL_RANK"]:
            workers = max(workers, env["LOCAL_RANK"] + 1)
            first = env["RANK"] - env["LOCAL_RANK"]
            state.ranks, state.ranks_source = list(range(first, first + workers)), "torchrun"
            return


def fill_ranks(states: list[SessionState]) -> None:
    """Give every torchrun node of a job whose ranks are unknown (no live worker) assumed global ranks.

    ASSUMED, not read: torchrun 2.13 writes no global rank into its log dir (only <run>/attempt_<A>/
    <local rank>/), and its c10d rendezvous numbers nodes by sorting (hostname, agent pid), not by
    our node index. So a node with no live worker gets node-index order: the workers counted on
    the nodes before it (their newest attempt's log dirs), the same count as the others where
    unknown, i.e. node*nproc + local rank when every node has the same nproc. `ranks_source` says so.
    """
    jobs: dict[str, list[SessionState]] = {}
    for s in states:
        if s.mode == "torchrun" and s.node is not None:
            jobs.setdefault(s.job, []).append(s)
    for nodes in jobs.values():
        nodes.sort(key=lambda s: s.node or 0)
        counts = [len(s.ranks) or 1 + max((w.local_rank for w in s.worker_logs), default=-1) for s in nodes]
        usual = max(counts, default=0)
        offset = 0
        for s, count in zip(nodes, counts, strict=True):
            count = count or usual
            if not s.ranks and count:
                s.ranks, s.ranks_source = list(range(offset, offset + count)), "assumed"
            offset = max(offset + count, s.ranks[-1] + 1 if s.ranks else 0)


def span(ranks: list[int]) -> str:
    """Ranks as a short text: `4-5`, `3`, `0,2`; empty when unknown."""
    if ranks and ranks == list(range(ranks[0], ranks[0] + len(ranks))):
        return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def error_message(error: dict[str, Any] | None) -> str:
    """The one-line message of a TORCHELASTIC error file (`@record` writes a nested dict)."""
    if not error:
        return ""
    message = error.get("message", error.get("raw", ""))
    if isinstance(message, dict):
        message = message.get("message", "")
    return str(message).strip().splitlines()[-1] if str(message).strip() else ""


def last_end(states: list[SessionState]) -> float:
    """When the last of these sessions ended (or started, where no end was recorded); 0 if unknown."""
    return max((s.ended or s.started or 0.0 for s in states), default=0.0)


def first_failure(states: list[SessionState]) -> SessionState | None:
    """The session that failed first across the whole job (by end time): usually the root cause."""
    failed = [s for s in states if s.ended_badly]
    return min(failed, key=lambda s: (s.failed_at or float("inf"), s.rank if s.rank is not None else s.node or 0),
               default=None)


def _json(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def as_int(text: str | None) -> int | None:
    """An integer field of a dump, or None when it is empty or not a number."""
    return int(text) if text and text.lstrip("-").isdigit() else None


def as_float(text: str | None) -> float | None:
    """A number field of a dump, or None when it is empty or not a number."""
    try:
        return float(text) if text else None
    except ValueError:
        return None
