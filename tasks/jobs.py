"""`fab status`, `logs`, `attach`, `stop` and `wait`: see, follow, enter and tear down jobs.

Every task asks the hosts, not the local launch record: the record only says which hosts to ask, so
a second machine with just the host files sees and stops the same jobs. Hosts are asked in parallel,
one round trip each, and an unreachable host is reported by name and makes the exit code 1.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from invoke import Exit

from fablaunch import failures, records, survey, ui
from fablaunch.errors import JobNotFound, UsageError
from fablaunch.executor import Executor
from fablaunch.hostfile import Host, parse_host
from fablaunch.jobs import (
    STOP_LOCK_WAIT,
    Stopped,
    Survey,
    after_launch,
    latest_job,
    order,
    ranks_text,
    select,
    show_logs,
    stop_job,
    take_survey,
    targets,
    watch,
    who,
)
from fablaunch.scripts import sh
from fablaunch.spec import DEFAULT_PARALLEL, check_job_name
from fablaunch.survey import SessionState

from .flags import int_flag, parallel_flag, seconds_flag, task, usage_errors

TARGET_HELP = {
    "job": "Job name (default: every job of this project found on the hosts).",
    "hosts": "A hosts file naming hosts to ask, or hosts inline: 'node[1-3]' (default ./hosts, if present, and "
             "the launch records' hosts).",
    "gpus": "A gpus file naming hosts to ask, or hosts inline: 'node[1-3]' (default ./gpus, if present, and "
            "the launch records' hosts).",
    "parallel": "Hosts contacted at once (default 32).",
}
KEEPER_HELP = ("Connect directly, not through the keeper of connections and shells kept between calls "
               "(fablaunch/keeper.py; FABLAUNCH_KEEPER=0 turns it off everywhere).")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    return f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


_STYLE = {"running": "cyan", "succeeded": "green", "failed": "red", "killed": "red", "lost": "yellow",
          "unknown": "magenta"}


def shown_state(s: SessionState) -> str:
    """The state as tables show it: a rank whose tmux session died under it is `running (detached)`."""
    return "running (detached)" if s.detached else s.state


def describe_end(s: SessionState) -> str:
    if s.state == "lost":
        return "exit unknown"
    if s.state == "failed":
        return f"exit {s.exit_code}"
    if s.state == "killed":
        return f"signal {s.signal}"
    if s.state in ("cancelled", "timeout", "node fail"):
        return f"{s.state} by Slurm"
    return "exit 0" if s.state == "succeeded" else ""




def _relaunched(job: str, states: list[SessionState]) -> str:
    """`, relaunch 2 (run R) without node3`: which run of a relaunched job is shown; nothing for a first launch."""
    rec = records.load(job) or {}
    again = rec.get("relaunch")
    if not again or not states or states[0].run != rec.get("run"):
        return ""
    dropped = f" without {', '.join(again.get('dropped') or {})}" if again.get("dropped") else ""
    return f", relaunch {again.get('count', '?')} (run {rec['run']}){dropped}"


def job_table(job: str, states: list[SessionState]) -> ui.TableSpec:
    """A table of one job's sessions: host, rank or node, state and exit are never squeezed.

    The last log line wraps in what is left (on its own line under the row where that is too little)
    and is shown whole, as every other cell, in plain output.

    In torchrun mode a node's row also shows its workers' global ranks (`4-5`; `4-5?` where assumed,
    no worker being alive to say) and its last line is its workers' newest, `[w1] ...` for worker 1.
    """
    mode = states[0].mode
    number = "rank" if mode == "gpus" else "node"
    numbers: tuple[str, ...] = (number,) if mode == "gpus" else (number, "ranks")
    rows = []
    for s in states:
        last = f"{s.last_line}  ({_age(s.log_age)} ago)" if s.last_line and s.log_age is not None else s.last_line
        which = ("" if s.rank is None else s.rank,) if mode == "gpus" else ("" if s.node is None else s.node,
                                                                              ranks_text(s))
        rows.append((s.host, s.session, *which, shown_state(s), describe_end(s), s.pid or "", _age(s.runtime), last))
    return ui.TableSpec(f"job {job} ({mode}{_relaunched(job, states)})",
                        ("host", "session", *numbers, "state", "exit", "pid", "run time", "last log line"), rows,
                        [_STYLE.get(s.state) for s in states], key_columns=("host", *numbers, "state", "exit"),
                        free_columns=("last log line",))


def summary(job: str, states: list[SessionState]) -> list[str]:
    """A job's summary line, and the first failure with its log tail and error message."""
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    line = f"job {job}: {ui.plural(len(states), 'session')}, " + ", ".join(f"{n} {st}" for st, n in counts.items())
    first = survey.first_failure(states)
    if first is None:
        return [line]
    message = survey.error_message(first.error)
    root = failures.first(failures.collect(states))
    if root and root.kind == "worker":  # torchrun: the worker (a global rank) and its own end, not its agent's echo
        lines = [f"{line}; first failure: {root.who} on {root.host}", f"  error: {failures.describe(root)}"]
        message = ""
    else:
        lines = [f"{line}; first failure: {who(first)} on {first.host} ({describe_end(first)})"]
    if message:
        lines.append(f"  error: {message}")
    lines += [f"  | {t}" for t in first.tail]
    return lines


FOLD_AFTER = 86400.0  # finished jobs that ended longer ago than this are folded into one line
def ended_before(states: list[SessionState], cutoff: float) -> bool:
    """Whether every session of a job has ended, the last of them before `cutoff`."""
    return all(s.state in survey.ENDED for s in states) and survey.last_end(states) < cutoff


def report(result: Survey, only: set[str] | None = None, fold: bool = False, now: float | None = None) -> None:
    """Print each job, newest first: `only` these jobs (None: all), finished ones older than a day as one line."""
    jobs = sorted(result.jobs().items(), key=lambda item: item[1][0].launched, reverse=True)
    others = [job for job, _ in jobs if only is not None and job not in only]
    folded = []
    cutoff = (now if now is not None else time.time()) - FOLD_AFTER
    for job, states in jobs:
        if job in others:
            continue
        if fold and ended_before(states, cutoff):
            folded.append(job)
            continue
        ui.emit_table(job_table(job, states))
        for i, line in enumerate(summary(job, states)):
            ui.say(line, style="bold" if i == 0 else None)
    if folded:
        ui.say(f"{ui.plural(len(folded), 'finished job')} older than a day: {', '.join(folded[:8])}"
               f"{', ...' if len(folded) > 8 else ''} (fab status --all shows them; fab prune forgets them)")
    if others:
        ui.say(f"{ui.plural(len(others), 'other job')} on these hosts, not launched from this directory: "
               f"{', '.join(others[:8])}{', ...' if len(others) > 8 else ''} (fab status --all shows them)")
    for host, why in result.unreachable.items():
        ui.say(f"{host}: unreachable ({why}); its sessions are unknown", "red")
    if not result.states and not result.unreachable:
        ui.say("No jobs of fablaunch found on the hosts.")


@task(help={**TARGET_HELP, "json": "Print a JSON list, one object per session, instead of tables.",
            "job": "Job name (default: the jobs launched from this directory, newest first).",
            "all": "Every job on the hosts, other projects' and long-finished ones too.",
            "no_keeper": KEEPER_HELP})
@usage_errors
def status(c, job=None, hosts=None, gpus=None, json_=False, parallel=None, all_=False, no_keeper=False):
    """Show every session of this project's jobs (or of one job): state, exit code or signal, run time, last log line.

    States: running, succeeded, failed (exit code), killed (signal), lost (session gone without an exit
    record), unknown (host unreachable). Names the first rank to fail, with its log tail and error.
    Finished jobs that ended over a day ago are folded into one line, and jobs not launched from this
    directory are only counted; --all shows everything.
    """
    host_list = targets(job, hosts, gpus)
    with Executor(c.config, parallel_flag(parallel), deadline=20, keeper=not no_keeper) as ex:
        result = take_survey(ex, host_list, job)
    recorded = {r["job"] for r in records.load_all()}
    only = None if all_ or job is not None or not recorded else recorded
    if json_:
        print(json.dumps([s.as_json() for s in sorted(result.states, key=order) if only is None or s.job in only],
                         indent=2))
    else:
        report(result, only, fold=not all_ and job is None)
    if result.unreachable:
        raise Exit(f"fablaunch: unreachable: {', '.join(result.unreachable)}", code=1)


@task(
    help={**TARGET_HELP, "job": "Job name (default: the job launched last from here).",
          "rank": "Only this global rank: a per-GPU session, or the one torchrun worker with that RANK; repeatable.",
          "node": "Only this node: its session (torchrun: the agent's log and every worker's); repeatable.",
          "host": "Only sessions on this host; repeatable.", "tail": "Lines per file (default 50).",
          "follow": "Keep streaming from every host until Ctrl-C or the job ends.", "no_keeper": KEEPER_HELP},
    iterable=["rank", "node", "host"],
)
@usage_errors
def logs(c, job=None, rank=None, node=None, host=None, tail=None, follow=False, hosts=None, gpus=None,
         parallel=None, no_keeper=False):
    """Print the ranks' output, each line prefixed with host and rank, from the per-rank log files.

    In torchrun mode, torchrun's own per-worker files are shown too, prefixed with both numbers:
    `[host node 2 rank 5 (worker 1) stdout]` is global rank 5, local rank 1 of node 2 (`rank 5?`:
    assumed as node*nproc + local rank, no live worker having said). --rank is always a global rank,
    --node a node; one the job does not have is an error naming those it has. Works after the
    sessions ended and after `fab stop`: logs are files on the hosts, not tmux scrollback.
    """
    host_list = targets(job, hosts, gpus)
    ranks = [int_flag(r, "--rank") for r in rank or []]
    nodes = [int_flag(k, "--node") for k in node or []]
    with Executor(c.config, parallel_flag(parallel), deadline=20, patient=follow, keeper=not no_keeper) as ex:
        unreachable = show_logs(ex, host_list, job or latest_job(ex, host_list), [r for r in ranks if r is not None],
                                list(host or []), int_flag(tail, "--tail", 50) or 0, follow,
                                nodes=[k for k in nodes if k is not None])
    say_unreachable(unreachable)


def say_unreachable(unreachable: dict[str, str]) -> None:
    for name, why in unreachable.items():
        ui.say(f"{name}: unreachable ({why}); its logs are not shown", "red", stderr=True)


@task(help={"job": "Job name (default: the job launched last from here).",
            "rank": "Attach to this global rank's session (a torchrun job: the node running that worker).",
            "node": "Attach to this node's session (a torchrun node's agent; in per-GPU jobs its first rank).",
            "host": "Attach to the first session of the job on this host.",
            "hosts": TARGET_HELP["hosts"], "gpus": TARGET_HELP["gpus"]})
@usage_errors
def attach(c, rank=None, node=None, host=None, job=None, hosts=None, gpus=None):
    """Open an interactive terminal in one session of a job (tmux attach over ssh -t; detach with C-b d).

    If that session has ended, says so and points to `fab logs`.
    """
    if rank is None and node is None and host is None:
        raise UsageError("--rank/--node/--host", "say which session: --rank N, --node K or --host HOST")
    number, node_number = int_flag(rank, "--rank"), int_flag(node, "--node")
    host_list = targets(job, hosts, gpus)
    with Executor(c.config, DEFAULT_PARALLEL, deadline=20, keeper=True) as ex:
        job = job or latest_job(ex, host_list)
        result = take_survey(ex, host_list, job)
    mine = [s for s in result.states if s.job == job]
    picks = select(job, mine, [] if number is None else [number], [] if node_number is None else [node_number])
    matches = [p.state for p in picks if (host is None or p.state.host == host)
               and (node_number is None or p.state.node == node_number)]
    if not matches:
        raise UsageError("--rank/--node/--host", f"job {job} has no such session"
                         + (f" (unreachable: {', '.join(result.unreachable)})" if result.unreachable else ""))
    target = matches[0]
    if target.state != "running":
        flag = f"--rank {number}" if number is not None else f"--node {target.node}"
        raise Exit(f"fablaunch: {target.session} on {target.host} has ended ({target.state} {describe_end(target)}); "
                   f"see its output with: fab logs --job {job} {flag}", code=1)
    if target.backend == "slurm":  # no tmux there: an interactive shell on the rank's node, in the job itself
        ui.say(f"{who(target)} runs on {target.host} in slurm job {target.slurm_job}: opening a shell there "
               "(srun --overlap --pty); its output is in `fab logs`", stderr=True)
        argv = ["srun", f"--jobid={target.slurm_job}", "--overlap", "--pty", f"--nodelist={target.host}",
                "--nodes=1", "--ntasks=1", "bash", "-i"]
        os.execvp(argv[0], argv)
    if target.mode == "torchrun" and number is not None:
        ui.say(f"rank {number} is a worker of node {target.node}: attaching to that node's torchrun session",
               stderr=True)
    tmux_cmd = f"tmux attach-session -t {sh('=' + target.session)}"
    h = parse_host(target.host, "session host")
    if h.is_local:
        argv = ["bash", "-c", tmux_cmd]
    else:
        argv = ["ssh", "-t"]
        # `fab -S FILE` lands in the private _runtime_ssh_path; ssh_config_path is the config file's key.
        ssh_config = getattr(c.config, "_runtime_ssh_path", None) or c.config.get("ssh_config_path")
        if ssh_config:
            argv += ["-F", ssh_config]
        for key in c.config.connect_kwargs.get("key_filename") or []:
            argv += ["-i", key]
        argv += [*(["-p", str(h.port)] if h.port else []), *(["-l", h.user] if h.user else []), h.name, tmux_cmd]
    os.execvp(argv[0], argv)


def _waiting(job: str, pid: int | None) -> None:
    ui.say(f"Waiting for the launch of {job} in progress (pid {pid}) to finish before stopping it...", "yellow",
           stderr=True)


def confirm(question: str) -> bool:
    """Ask a yes/no question on the terminal; False when nobody answers yes."""
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


@task(help={**TARGET_HELP,
            "job": "Job name (default: every job launched from this directory, as its launch records say).",
            "grace": "Seconds between SIGINT and SIGTERM, for training code to save (default 10).",
            "all": "Stop every fablaunch job on the hosts, other projects' too (asks first on a terminal).",
            "yes": "With --all: do not ask for confirmation.",
            "json": "Print a JSON list, one object per host and job, instead of a table."})
@usage_errors
def stop(c, job=None, grace=None, hosts=None, gpus=None, parallel=None, all_=False, yes=False, json_=False):
    """Stop a job everywhere: SIGINT, then SIGTERM and SIGKILL to every process of it, then its sessions.

    Without --job, stops the jobs launched from this directory (its launch records) and names them;
    every fablaunch job on the hosts needs --all. Processes are found by a marker every process of the
    job inherits (DataLoader workers, setsid'd children and ranks whose tmux server died included);
    nothing else is touched. A launch of the job in progress here is waited for first. Logs, exit
    records and error files are kept. Exits 1 if a process survived or a host was unreachable.
    """
    if job is not None and all_:
        raise UsageError("--job/--all", "give one: --job NAME stops one job, --all stops every job")
    if job is not None:  # before anything, a lock file included, is made from the name
        check_job_name(job, "--job")
    grace_s = seconds_flag(grace, "--grace", 10.0) or 0.0
    if all_:
        host_list = targets(None, hosts, gpus)
        if sys.stdin.isatty() and not yes and not confirm(
                f"Stop every fablaunch job, of any project, on {ui.plural(len(host_list), 'host')} "
                f"({', '.join(h.spec for h in host_list[:8])}{', ...' if len(host_list) > 8 else ''})?"):
            raise Exit("fablaunch: nothing was stopped", code=1)
        with Executor(c.config, parallel_flag(parallel), deadline=grace_s + 20) as ex:
            done = stop_job(ex, host_list, None, grace_s, None if json_ else _progress(len(host_list)))
        return _report_stop("every job", [(None, d) for d in done], json_)
    names = [job] if job is not None else [r["job"] for r in records.load_all()]
    if not names:
        raise UsageError("--job", "no job was launched from this directory (no launch records in "
                         f"{records.RECORDS_DIR}): name one with --job, or stop every job on the hosts with --all")
    if job is None and not json_:
        ui.say(f"Stopping the jobs launched from this directory: {', '.join(names)}")
    stopped: list[tuple[str | None, Stopped]] = []
    with Executor(c.config, parallel_flag(parallel), deadline=grace_s + 20) as ex:
        for name in names:
            host_list = targets(name, hosts, gpus)
            try:
                with after_launch(name, on_wait=_waiting):
                    done = stop_job(ex, host_list, name, grace_s, None if json_ else _progress(len(host_list)))
            except records.Busy as exc:
                raise Exit(f"fablaunch: {exc} for over {STOP_LOCK_WAIT:g}s; nothing was stopped", code=1) from None
            stopped += [(name, d) for d in done]
    return _report_stop(job or ", ".join(names), stopped, json_)


def _progress(hosts: int) -> Callable[[str, str], None]:
    """Stop's progress lines on stderr (`node1: SIGINT to 4 processes`), so a long grace is not silence.

    With many hosts only what goes beyond SIGINT is told: one line per host would drown the table.
    """
    lock = threading.Lock()

    def told(host: str, text: str) -> None:
        if hosts > 8 and "SIGINT" in text:
            return
        with lock:
            ui.say(f"  {host}: {text}", "dim", stderr=True)

    return told


def _report_stop(what: str, stopped: list[tuple[str | None, Stopped]], as_json: bool = False) -> None:
    bad = sum(1 for _, d in stopped if not d.clean)
    if as_json:
        print(json.dumps([{**d.as_json(job), **({"jobs": job} if job else {})} for job, d in stopped], indent=2))
    elif all(d.result == "nothing to stop" for _, d in stopped):
        ui.say(f"Nothing to stop for {what} on {ui.plural(len({d.host for _, d in stopped}), 'host')}.")
    else:
        ui.table(f"Stop {what}", ("host", "jobs", "processes", "sessions", "how they ended", "result"),
                 [(d.host, job or d.jobs, "" if d.processes is None else d.processes,
                   "" if d.sessions is None else d.sessions, d.ended(job), d.result) for job, d in stopped],
                 ["green" if d.clean else "red" for _, d in stopped],
                 key_columns=("host", "processes", "sessions"), free_columns=("jobs", "how they ended", "result"))
    if bad:
        raise Exit(f"fablaunch: {ui.plural(bad, 'host')} not verified clean", code=1)


def wait_for(c: Any, ex: Executor, hosts: list[Host], job: str, timeout: float | None, fail_fast: bool,
             interval: float = 2.0) -> int:
    """Watch a job live until every session ended; print how it ended; return the exit code `fab wait` gives."""

    def stopping(failure: SessionState) -> None:
        live.stop()
        ui.say(f"{who(failure)} on {failure.host} failed ({describe_end(failure)}): stopping the rest "
               "(--fail-fast).", "red", stderr=True)

    with ui.live(stderr=True) as live:  # shows nothing where stderr is not a terminal
        try:
            code, states = watch(ex, hosts, job, timeout, fail_fast, interval,
                                 on_update=lambda states: live.update(job_table(job, states), refresh=True),
                                 on_fail_fast=stopping)
        except JobNotFound as exc:
            raise Exit(f"fablaunch: {exc}", code=1) from None
    if states:
        ui.emit_table(job_table(job, states))
    if code == 124:
        ui.say(f"Timed out after {timeout:g}s; job {job} keeps running.", "yellow")
        return code
    for line in summary(job, states):
        ui.say(line)
    return code


@task(help={"job": "Job name (default: the job launched last from here).",
            "timeout": "Give up after this many seconds with exit code 124, leaving the job running.",
            "fail_fast": "As soon as one rank fails, stop the rest instead of waiting out NCCL timeouts.",
            "hosts": TARGET_HELP["hosts"], "gpus": TARGET_HELP["gpus"], "parallel": TARGET_HELP["parallel"],
            "json": "Print a JSON object at the end (job, exit_code, sessions as in status --json), no live view.",
            "no_keeper": KEEPER_HELP})
@usage_errors
def wait(c, job=None, timeout=None, fail_fast=False, hosts=None, gpus=None, parallel=None, json_=False,
         no_keeper=False):
    """Show a job live until every rank has ended; exit 0 if all succeeded, else the first failure's code.

    A rank killed by a signal gives 1; --timeout gives 124.
    """
    host_list = targets(job, hosts, gpus)
    limit = seconds_flag(timeout, "--timeout")
    with Executor(c.config, parallel_flag(parallel), deadline=30, keeper=not no_keeper) as ex:
        name = job or latest_job(ex, host_list)
        if json_:
            try:
                code, states = watch(ex, host_list, name, limit, fail_fast)
            except JobNotFound as exc:
                raise Exit(f"fablaunch: {exc}", code=1) from None
            print(json.dumps({"job": name, "exit_code": code, "sessions": [s.as_json() for s in states]}, indent=2))
        else:
            code = wait_for(c, ex, host_list, name, limit, fail_fast)
    if code:
        raise Exit(code=code)


@task(name="errors", help={**TARGET_HELP, "job": "Job name (default: the job launched last from here).",
                           "json": "Print JSON: the job, its first failure and every failure in time order."})
@usage_errors
def errors_(c, job=None, json_=False, hosts=None, gpus=None, parallel=None):
    """Show a job's failures in time order: the first in full with its traceback, then one line per other.

    Reads every rank's TORCHELASTIC error file (and torchrun's per-worker ones) and exit record on the
    hosts. The first failure of training code is usually the root cause; later ones are its echoes.
    Exits 1 if a host could not be asked (its failures are missing).
    """
    host_list = targets(job, hosts, gpus)
    with Executor(c.config, parallel_flag(parallel), deadline=20, keeper=True) as ex:
        name = job or latest_job(ex, host_list)
        result = take_survey(ex, host_list, name)
    found = failures.collect([s for s in result.states if s.job == name])
    if json_:
        print(failures.as_json(name, found))
    else:
        failures.report(name, found)
    if result.unreachable:
        raise Exit(f"fablaunch: unreachable, failures there unknown: {', '.join(result.unreachable)}", code=1)
