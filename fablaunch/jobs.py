"""A job's sessions on its hosts: find the hosts, survey them, follow logs, stop, wait for the end.

Everything asks the hosts, not the local launch record: the record only says which hosts to ask, so
a second machine with just the host files sees and stops the same jobs. Hosts are asked in parallel,
one round trip each; a host that does not answer is reported by name, never a traceback. The `fab`
tasks and the Python API both stand on these functions.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import records, slurm, survey, tmux, ui
from .errors import JobNotFound, UsageError
from .executor import REMOTE_SHELL, Executor, Outcome
from .hostfile import Host, gpus_from, hosts_from, parse_host
from .scripts import kill_payload, sh
from .spec import check_job_name
from .survey import SessionState


def targets(job: str | None, hosts: str | None, gpus: str | None) -> list[Host]:
    """The hosts to ask: those of the launch records here, plus those of the host files.

    Explicit files must exist (or be hosts written inline, `node[1-3]`); the default ./hosts and
    ./gpus are used when present. Without any of these there is nothing to ask, which is a usage error.
    """
    if job is not None:  # `--job ''` (an empty $JOB in a script) must never mean "every job"
        check_job_name(job, "--job")
    found: dict[str, Host] = {}
    recs = [r for r in [records.load(job)] if r] if job is not None else records.load_all()
    for rec in recs:
        for spec in rec.get("hosts", []):
            found.setdefault(spec, parse_host(spec, f"launch record of {rec['job']}"))
    for given, default, reader in ((hosts, "hosts", hosts_from), (gpus, "gpus", gpus_from)):
        if given or Path(default).exists():
            for host in reader(given or default):
                found.setdefault(host.spec, host)
    if not found and not any(job is None or r["job"] == job for r in slurm.slurm_records()):
        raise UsageError("--hosts/--gpus", "no host files here and no launch records: name the hosts to ask")
    return list(found.values())


class Survey:
    """The states of every session on the target hosts, plus the hosts that did not answer."""

    def __init__(self, states: list[SessionState], unreachable: dict[str, str]) -> None:
        self.states = states
        self.unreachable = unreachable

    def jobs(self) -> dict[str, list[SessionState]]:
        jobs: dict[str, list[SessionState]] = {}
        for state in sorted(self.states, key=order):
            jobs.setdefault(state.job, []).append(state)
        return jobs


def order(s: SessionState) -> tuple[str, int, int]:
    return (s.launched, s.rank if s.rank is not None else -1, s.node if s.node is not None else -1)


class Backend(Protocol):
    """What differs between running a job's sessions in tmux over ssh and as tasks of a Slurm job.

    The plan's contract, the per-rank files and everything read from them (states, first failure,
    logs) are shared; a backend only says how its sessions' states are read, how they are stopped,
    and where their files can be read from.
    """

    name: str  # what SessionState.backend says of its sessions

    def survey(self, job: str | None) -> Survey: ...

    def stop(self, job: str | None, grace: float, on_progress: Callable[[str, str], Any] | None) -> list[Stopped]:
        ...

    def files_host(self, state: SessionState) -> Host | None: ...

    def on_nodes(self, payload_for: Callable[[Host], str], read_only: bool = False) -> dict[str, Outcome]:
        """Run a payload on every node the job may run on (each node's own); Outcomes by node.

        `read_only`: the payload changes nothing (it may go through the keeper, see Executor.run_one).
        """
        ...

    def alive(self, job: str) -> str:
        """A shell test, run where the job's files are read, that fails once the job has nothing left running."""
        ...


class SshBackend:
    """Sessions in tmux on the hosts of host files and launch records, reached over ssh."""

    name = "ssh"

    def __init__(self, ex: Executor, hosts: list[Host]) -> None:
        self.ex, self.hosts = ex, hosts

    def survey(self, job: str | None) -> Survey:
        return _ssh_survey(self.ex, self.hosts, job)

    def stop(self, job: str | None, grace: float, on_progress: Callable[[str, str], Any] | None) -> list[Stopped]:
        return _ssh_stop(self.ex, self.hosts, job, grace, on_progress)

    def files_host(self, state: SessionState) -> Host | None:
        return next((h for h in self.hosts if h.spec == state.host), None)

    def on_nodes(self, payload_for: Callable[[Host], str], read_only: bool = False) -> dict[str, Outcome]:
        return self.ex.run({h: (REMOTE_SHELL, payload_for(h)) for h in self.hosts}, read_only=read_only)

    def alive(self, job: str) -> str:
        return f"{tmux.list_command(job)} | grep -q ."


class SlurmBackend:
    """This project's Slurm jobs: tasks of a Slurm job, their files in a directory every node shares."""

    name = "slurm"

    def __init__(self, recs: list[dict[str, Any]], deadline: float = slurm.COMMAND_DEADLINE) -> None:
        self.recs = recs  # the launch records of the jobs asked about (see backends)
        self.deadline = deadline

    def survey(self, job: str | None) -> Survey:
        states: list[SessionState] = []
        failed: dict[str, str] = {}
        for rec in self.recs:
            try:
                states += slurm.survey_job(rec)
            except slurm.SlurmError as exc:
                failed[f"slurm job {rec['slurm_job']}"] = str(exc)
        survey.fill_ranks(states)
        return Survey(states, failed)

    def stop(self, job: str | None, grace: float, on_progress: Callable[[str, str], Any] | None) -> list[Stopped]:
        return [slurm_stop(rec, grace, on_progress) for rec in self.recs]

    def files_host(self, state: SessionState) -> Host | None:
        return LOCAL  # the shared directory, read here

    def on_nodes(self, payload_for: Callable[[Host], str], read_only: bool = False) -> dict[str, Outcome]:
        """Through a step of each running job (`srun --overlap`); a job not running is one failed Outcome."""
        found: dict[str, Outcome] = {}
        for rec in self.recs:
            try:
                found.update(slurm.on_nodes(rec, payload_for, deadline=self.deadline))
            except slurm.SlurmError as exc:
                found[f"slurm job {rec['slurm_job']}"] = Outcome(LOCAL, error=exc.message)
        return found

    def alive(self, job: str) -> str:
        return " || ".join(slurm.alive_test(str(r["slurm_job"])) for r in self.recs if r["job"] == job) or "false"


LOCAL = parse_host("localhost", "fablaunch")


def backends(ex: Executor, hosts: list[Host], job: str | None) -> list[Backend]:
    """The backends a job (every job: None) may run on: its hosts over ssh, and this project's Slurm jobs.

    A job this project launched on Slurm is Slurm's alone: the host files' hosts are not asked about it.
    """
    recs = [r for r in slurm.slurm_records() if job is None or r["job"] == job]
    found: list[Backend] = [SshBackend(ex, hosts)] if hosts and not (job is not None and recs) else []
    if recs:
        found.append(SlurmBackend(recs, deadline=ex.deadline or slurm.COMMAND_DEADLINE))
    return found


def take_survey(ex: Executor, hosts: list[Host], job: str | None) -> Survey:
    """What every session of a job (every job: None) is doing, on every backend it may run on."""
    states: list[SessionState] = []
    unreachable: dict[str, str] = {}
    for backend in backends(ex, hosts, job):
        result = backend.survey(job)
        states += result.states
        unreachable.update(result.unreachable)
    return Survey(current(states), unreachable)


def current(states: list[SessionState]) -> list[SessionState]:
    """Leave out sessions of an earlier run of a job this project launched again (`fab relaunch`).

    A host a relaunch left out keeps the files of the run before; the launch record here names the
    run that is the job now, and only its sessions (or sessions of jobs without a record) count.
    """
    runs = {r["job"]: str(r.get("run") or "") for r in records.load_all() if r.get("backend") != "slurm"}
    return [s for s in states if not (s.backend == "ssh" and s.run and runs.get(s.job) and s.run != runs[s.job])]


def _ssh_survey(ex: Executor, hosts: list[Host], job: str | None) -> Survey:
    """Ask every host what its sessions are doing; unreachable hosts' recorded sessions are `unknown`."""
    outcomes = ex.run({h: (REMOTE_SHELL, survey.payload(h, job)) for h in hosts}, read_only=True)
    states: list[SessionState] = []
    unreachable: dict[str, str] = {}
    for host in hosts:
        outcome = outcomes[host.spec]
        if outcome.ok:
            states += survey.parse(host, outcome.stdout)
            continue
        unreachable[host.spec] = outcome.why()
        recs = [r for r in [records.load(job)] if r] if job is not None else records.load_all()
        for rec in recs:
            for s in rec.get("sessions", []):
                if s["host"] == host.spec:
                    states.append(SessionState(rec["job"], rec["mode"], host.spec, s["session"],
                                               s["rank"] if rec["mode"] == "gpus" else None, s["node"], "unknown",
                                               log=s["log"], launched=rec.get("launched", "")))
    survey.fill_ranks(states)
    return Survey(states, unreachable)


def latest_job(ex: Executor, hosts: list[Host]) -> str:
    """The most recently launched job: from the records here, else from the hosts."""
    recs = records.load_all()
    if recs:
        return recs[-1]["job"]
    states = take_survey(ex, hosts, None).states
    if not states:
        raise UsageError("--job", "no launch records here and no jobs found on the hosts")
    return max(states, key=lambda s: s.launched).job


@dataclass
class Pick:
    """Which logs of one session `fab logs` shows: its own log, and in torchrun mode which workers'."""

    state: SessionState
    node_log: bool = True
    workers: list[int] | None = None  # torchrun local ranks; None: every worker


def ranks_text(s: SessionState) -> str:
    """A torchrun node's workers' global ranks, `4-5`, with `?` where they are assumed (survey.fill_ranks)."""
    return survey.span(s.ranks) + ("?" if s.ranks and s.ranks_source != "torchrun" else "")


def select(job: str, states: list[SessionState], ranks: list[int], nodes: list[int]) -> list[Pick]:
    """The logs `fab logs --rank N --node K` shows of a job's sessions (`states`: all of the job's).

    `--node K` is a session's node (every worker of a torchrun node, its session log too); `--rank N`
    is a global rank: a per-GPU session, or the one torchrun worker with that rank (its files only).
    A rank or node the job does not have is a UsageError naming the ones it has.
    """
    torchrun = bool(states) and states[0].mode == "torchrun"
    known_nodes = sorted({s.node for s in states if s.node is not None})
    for k in nodes:
        if k not in known_nodes:
            raise UsageError("--node", f"job {job} has no node {k}: its nodes are {survey.span(known_nodes) or 'none'}")
    known_ranks = sorted({r for s in states for r in (s.ranks if torchrun else [s.rank] if s.rank is not None else [])})
    for n in ranks:
        if n in known_ranks:
            continue
        if torchrun and not known_ranks:
            raise UsageError("--rank", f"job {job}: no torchrun worker has started yet, so its global ranks are "
                                       "unknown; --node K shows a node's logs")
        what = "its global ranks (torchrun workers)" if torchrun else "its ranks"
        raise UsageError("--rank", f"job {job} has no rank {n}: {what} are {survey.span(known_ranks) or 'none'}"
                         + ("; --node K picks a node" if torchrun else ""))
    picks = []
    for s in states:
        if (not ranks and not nodes) or s.node in nodes or (not torchrun and s.rank in ranks):
            picks.append(Pick(s))
        elif torchrun and (mine := [s.ranks.index(n) for n in ranks if n in s.ranks]):
            picks.append(Pick(s, node_log=False, workers=mine))
    return picks


def logs_payload(picks: list[Pick], lines: int, follow: bool, alive: str = "false") -> str:
    """Print (or follow) a host's logs, each line prefixed with its file's key and a tab.

    Following stops once the shell test `alive` (the backend's: any session of the job left) fails.
    """
    files = []
    for p in picks:
        s = p.state
        if p.node_log:
            files.append((s.session, s.log))
        if s.mode == "torchrun":
            for worker in ["*"] if p.workers is None else [str(w) for w in p.workers]:
                files.append((f"{s.session}/", s.log.removesuffix(".log") + f".torchrun/*/attempt_*/{worker}/std*.log"))
    emit = ["emit() { sed -u \"s|^|$1\t|\"; }"]
    if not follow:
        body = []
        for key, path in files:
            glob = path.endswith("std*.log")
            target = f"{sh(path.split('*')[0])}{path[len(path.split('*')[0]):]}" if glob else sh(path)
            body.append(f"for f in {target}; do [ -f \"$f\" ] && tail -n {lines} \"$f\" | "
                        f"emit {sh(key)}\"${{f#{sh(path.split('*')[0]) if glob else sh(path)}}}\"; done")
        return "\n".join([*emit, *body, ""])
    # Follow: tail every file (picking up torchrun's per-rank files as they appear), send a heartbeat so
    # a closed connection is noticed, and stop once this host has no live session of the job.
    body = ["declare -A seen; pids=''", "cleanup() { [ -z \"$pids\" ] || kill $pids 2>/dev/null; }",
            "trap 'cleanup; exit 0' EXIT HUP INT TERM PIPE", "while :; do"]
    for key, path in files:
        prefix = path.split("*")[0]
        target = f"{sh(prefix)}{path[len(prefix):]}"
        body += [f"  for f in {target}; do",
                 "    [ -f \"$f\" ] && [ -z \"${seen[$f]:-}\" ] || continue; seen[$f]=1",
                 # tail itself must be the background job ($!): killing only its reader would leave
                 # tail waiting forever on a log that no longer grows.
                 f"    tail -n {lines} -F \"$f\" 2>/dev/null > >(emit {sh(key)}\"${{f#{sh(prefix)}}}\") &",
                 "    pids=\"$pids $!\"",
                 "  done"]
    body += [f"  {{ {alive}; }} || {{ sleep 1; exit 0; }}",
             f"  printf '{survey.SEP}\\n' || exit 0", "  sleep 1", "done"]
    return "\n".join([*emit, *body, ""])


class LinePrinter:
    """Writes `[host who] line` for keyed lines from many hosts at once, one whole line at a time.

    `write` is where the lines go: stdout for `fab logs`, a list for the Python API's `Job.logs`.
    """

    def __init__(self, states: list[SessionState], write: Callable[[str], Any] | None = None) -> None:
        self.who = {s.session: (s.host, who(s)) for s in states}
        self.states = {s.session: s for s in states}
        self.lock = threading.Lock()
        self.write = write or _stdout

    def __call__(self, line: str) -> None:
        if line.startswith(survey.SEP) or "\t" not in line:
            return
        key, _, text = line.partition("\t")
        session, _, sub = key.partition("/")
        host, name = self.who.get(session, ("?", session))
        if sub:  # torchrun worker file: <run>/attempt_0/1/stderr.log -> rank 5 (worker 1) stderr
            parts = sub.split("/")
            name += f" {self.worker(session, parts[-2])} {parts[-1].removesuffix('.log')}" if len(parts) >= 2 \
                else f" {sub}"
        with self.lock:
            self.write(f"[{host} {name}] {text.rstrip(chr(10))}\n")


    def worker(self, session: str, local: str) -> str:
        """`rank 5 (worker 1)`: a torchrun worker's global rank and local rank (`rank 5?` if assumed)."""
        s = self.states.get(session)
        rank = s.rank_of(int(local)) if s is not None and local.isdigit() else None
        if s is None or rank is None:
            return f"worker {local}"
        return f"rank {rank}{'' if s.ranks_source == 'torchrun' else '?'} (worker {local})"


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()



def show_logs(ex: Executor, hosts: list[Host], job: str, ranks: list[int], only_hosts: list[str], lines: int,
              follow: bool, write: Callable[[str], Any] | None = None,
              nodes: list[int] | None = None) -> dict[str, str]:
    """Print (or follow) the logs of a job's selected sessions from every host at once.

    `ranks` are global ranks (a per-GPU session, or one torchrun worker), `nodes` node numbers (a
    whole torchrun node: its session log and every worker's); see `select`. Lines go to `write`
    (default stdout); returns the hosts that could not be asked, with why.
    """
    told = False
    while True:
        result = take_survey(ex, hosts, job)
        mine = [s for s in result.states if s.job == job]
        picks = [p for p in select(job, mine, ranks, nodes or [])
                 if p.state.state != "unknown" and p.state.log and (not only_hosts or p.state.host in only_hosts)]
        # A Slurm job that has not started has no sessions yet: following waits for them.
        waiting = [s for s in mine if not s.log and s.state in ("pending", "running")]
        if picks or not follow or not waiting:
            break
        if not told:
            told = True
            ui.say(f"job {job} has not started yet ({waiting[0].last_line}): waiting for it", stderr=True)
        time.sleep(1.0)
    if not picks:
        raise UsageError("--job", f"no logs of job {job} found on the hosts"
                         + (f" (unreachable: {', '.join(result.unreachable)})" if result.unreachable else ""))
    printer = LinePrinter([p.state for p in picks], write)
    readers = {b.name: b for b in backends(ex, hosts, job)}
    by_host: dict[str, Host] = {}
    per_host: dict[str, list[Pick]] = {}
    for p in picks:  # each session's files are read where its backend says they are
        backend = readers.get(p.state.backend)
        reader = backend.files_host(p.state) if backend else None
        if reader is not None:
            by_host[reader.spec] = reader
            per_host.setdefault(reader.spec, []).append(p)

    def one(spec: str) -> Outcome:
        backend = readers[per_host[spec][0].state.backend]
        return ex.run_one(by_host[spec], REMOTE_SHELL,
                          logs_payload(per_host[spec], lines, follow, backend.alive(job)), printer,
                          read_only=not follow)

    threads = [threading.Thread(target=one, args=(spec,), daemon=True) for spec in per_host]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
    return result.unreachable


STOP_LOCK_WAIT = 300.0  # seconds a stop waits for a launch of the same job from this project to finish


@contextlib.contextmanager
def after_launch(job: str, wait: float = STOP_LOCK_WAIT,
                 on_wait: Callable[[str, int | None], Any] | None = None) -> Iterator[None]:
    """Wait until no launch of `job` from this project is in progress, and keep new ones out meanwhile.

    Stopping while a launch is still reaching its hosts would stop the hosts it has reached and then
    let the rest start. `on_wait(job, pid)` is told when there is a launch to wait for; records.Busy
    after `wait` seconds. A directory where the lock cannot be written cannot launch either, so there
    the stop goes ahead without it.
    """
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(records.lock(job))
        except records.Busy as exc:
            if on_wait:
                on_wait(job, exc.pid)
            stack.enter_context(records.lock(job, wait=wait))
        except OSError:
            pass
        yield


CLEAN = ("stopped", "nothing to stop")  # a stop's per-host results that leave nothing of the job behind
HOW_ENDED = {"INT": "exited on SIGINT", "TERM": "needed SIGTERM", "KILL": "KILL needed",
             "survived": "survived SIGKILL"}


@dataclass
class Stopped:
    """What a stop did on one host: processes found, sessions removed, how each session's processes ended."""

    host: str
    jobs: str = ""
    processes: int | None = None
    sessions: int | None = None
    result: str = ""
    ends: tuple[tuple[str, str], ...] = ()  # (session marker NAME@HOST, INT / TERM / KILL / survived)

    @property
    def clean(self) -> bool:
        return self.result in CLEAN

    def ended(self, job: str | None = None) -> str:
        """How the sessions ended, grouped: `rank 0, 1: exited on SIGINT; rank 2: KILL needed`."""
        groups: dict[str, list[str]] = {}
        for marker, how in self.ends:
            groups.setdefault(how, []).append(session_who(marker.rsplit("@", 1)[0], job))
        return "; ".join(f"{', '.join(whos)}: {HOW_ENDED.get(how, how)}"
                         for how, whos in sorted(groups.items(), key=lambda g: list(HOW_ENDED).index(g[0])
                                                 if g[0] in HOW_ENDED else 9))

    def as_json(self, job: str | None = None) -> dict[str, Any]:
        return {"host": self.host, "jobs": self.jobs or None, "processes": self.processes,
                "sessions": self.sessions, "result": self.result,
                "ended": [{"session": m.rsplit("@", 1)[0], "who": session_who(m.rsplit("@", 1)[0], job),
                           "how": HOW_ENDED.get(how, how)} for m, how in self.ends]}


def session_who(session: str, job: str | None = None) -> str:
    """`rank 3` / `node 1` for a session of `job` (its name is JOB-rank-N or JOB-node-K), else the name."""
    if job and session.startswith(f"{job}-"):
        kind, _, number = session[len(job) + 1:].partition("-")
        if kind in ("rank", "node") and number.isdigit():
            return f"{kind} {number}"
    return session


def stop_progress(line: str) -> str | None:
    """A stop payload's progress line (`sent INT 4`, `remain INT 2`) in words; None for other lines."""
    words = line.split()
    if len(words) != 3 or words[0] not in ("sent", "remain") or not words[2].isdigit():
        return None
    sig, n = f"SIG{words[1]}", int(words[2])
    if words[0] == "sent":
        return f"{sig} to {ui.plural(n, 'process')}"
    return f"all gone after {sig}" if n == 0 else f"{ui.plural(n, 'process')} left after {sig}"


def stop_job(ex: Executor, hosts: list[Host], job: str | None, grace: float,
             on_progress: Callable[[str, str], Any] | None = None) -> list[Stopped]:
    """Stop a job (or all jobs) on every backend; one Stopped per host (per Slurm job), hosts in order.

    `on_progress(host, text)` is told each signal sent and what is left after it, as it happens.
    """
    done: list[Stopped] = []
    for backend in backends(ex, hosts, job):
        done += backend.stop(job, grace, on_progress)
    return done


def slurm_stop(rec: dict[str, Any], grace: float, on_progress: Callable[[str, str], Any] | None) -> Stopped:
    """Stop one Slurm job and say how each of its sessions ended, from their exit records."""
    where = f"slurm {'allocation' if rec.get('step_name') else 'job'} {rec['slurm_job']}"
    try:
        did = slurm.stop(rec, grace, on_progress)
        states = slurm.survey_job(rec)
    except slurm.SlurmError as exc:
        return Stopped(where, rec["job"], result=str(exc))
    phases = [(name, at) for name, at in did["phases"] if name != "cancel"]  # signals went to running tasks
    ends = tuple((f"{s.session}@{s.host}", end) for s in states
                 if phases and (s.rank, s.node) != (None, None) and (end := _slurm_end(s, phases)))
    return Stopped(where, rec["job"], None, len(states) if did["phases"] else 0, did["result"], ends)


def _slurm_end(s: SessionState, phases: list[tuple[str, float]]) -> str | None:
    """How a Slurm task ended during a stop: by the signal its record names, else by when it ended.

    A rank that handles SIGINT and exits with a code of its own still ended on SIGINT; one with no
    record was killed with its task; one that ended before the stop began is not the stop's doing.
    """
    if s.state == "killed" and s.signal in (2, 15, 9):
        return {2: "INT", 15: "TERM", 9: "KILL"}[s.signal]
    if s.state not in ("succeeded", "failed", "killed"):
        return "KILL" if s.state in survey.ENDED else None
    if s.ended is None or s.ended < phases[0][1] - 1.0:
        return None
    return ([name for name, at in phases if at <= s.ended] or [phases[0][0]])[-1]  # within 1s before: skew


def _ssh_stop(ex: Executor, hosts: list[Host], job: str | None, grace: float,
              on_progress: Callable[[str, str], Any] | None = None) -> list[Stopped]:
    def line(spec: str, text: str) -> None:
        said = stop_progress(text)
        if said and on_progress:
            on_progress(spec, said)

    outcomes = ex.run({h: (REMOTE_SHELL, kill_payload(job, h, grace)) for h in hosts}, on_line=line)
    done = []
    for host in hosts:
        o = outcomes[host.spec]
        lines = o.stdout.splitlines() if o.ok else []
        last = lines[-1] if lines and lines[-1].startswith("found=") else ""
        fields = dict(f.split("=", 1) for f in last.split() if "=" in f)
        if "left" not in fields:
            done.append(Stopped(host.spec, result=f"unreachable: {o.why()}" if not o.reached else o.why()))
            continue
        ends = tuple((w[1], w[2]) for w in (ln.split() for ln in lines) if len(w) == 3 and w[0] == "ended")
        found, left, sessions = int(fields["found"]), int(fields["left"]), int(fields["sessions"])
        if left:
            result = f"{ui.plural(left, 'process')} survived SIGKILL"
        else:
            result = "stopped" if found or sessions else "nothing to stop"
        done.append(Stopped(host.spec, fields.get("jobs", ""), found, sessions, result, ends))
    return done


def exit_code_of(failure: SessionState) -> int:
    """The exit code `wait` gives for a failed job: the rank's own code, or 1 for a signal."""
    return failure.exit_code if failure.state == "failed" and failure.exit_code else 1


def end_code(states: list[SessionState]) -> int:
    """The exit code `fab wait` gives for a job whose sessions all ended: 0, the first failure's, or 1 if lost."""
    failure = survey.first_failure(states)
    if failure:
        return exit_code_of(failure)
    return 1 if any(s.state == "lost" for s in states) else 0


def watch(ex: Executor, hosts: list[Host], job: str, timeout: float | None = None, fail_fast: bool = False,
          interval: float = 2.0, on_update: Callable[[list[SessionState]], Any] | None = None,
          on_fail_fast: Callable[[SessionState], Any] | None = None) -> tuple[int, list[SessionState]]:
    """Survey a job until every session ended; return (the exit code `fab wait` gives, the last states).

    124 after `timeout` seconds (the job keeps running). With `fail_fast`, the first failure stops
    the rest of the job at once. A job that is on no host is a UsageError at once, never a wait.
    """
    start = time.monotonic()
    result = take_survey(ex, hosts, job)
    if not any(s.job == job for s in result.states):
        where = ui.plural(len(hosts), "host")
        if result.unreachable:
            raise JobNotFound(job, f"job {job} not found on the reachable hosts ({where}; unreachable: "
                                   f"{', '.join(result.unreachable)})")
        raise UsageError("--job", f"no job {job} on the hosts ({where}); `fab status` lists the jobs there")
    while True:
        states = [s for s in result.states if s.job == job]
        if states and on_update:
            on_update(states)
        running = [s for s in states if s.state not in survey.ENDED]
        failure = survey.first_failure(states)
        if failure and fail_fast and running:
            if on_fail_fast:
                on_fail_fast(failure)
            stop_job(ex, hosts, job, 10.0)
            states = [s for s in take_survey(ex, hosts, job).states if s.job == job]
            return end_code(states), states
        if states and not running:
            return end_code(states), states
        if timeout is not None and time.monotonic() - start > timeout:
            return 124, states
        time.sleep(interval)
        result = take_survey(ex, hosts, job)


def who(s: SessionState) -> str:
    """`rank N` (per-GPU jobs) or `node K` (torchrun jobs); a Slurm job none of whose tasks started: its id."""
    if s.rank is None and s.node is None:
        return f"slurm job {s.slurm_job}" if s.slurm_job else s.session
    return f"rank {s.rank}" if s.rank is not None else f"node {s.node}"
