"""`fab status`, `logs`, `attach`, `stop` and `wait`: see, follow, enter and tear down jobs.

Every task asks the hosts, not the local launch record: the record only says which hosts to ask, so
a second machine with just the host files sees and stops the same jobs. Hosts are asked in parallel,
one round trip each, and an unreachable host is reported by name and makes the exit code 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from invoke import Exit

from fablaunch import failures, records, survey, ui
from fablaunch.errors import UsageError
from fablaunch.executor import REMOTE_SHELL, Executor, Outcome
from fablaunch.hostfile import Host, parse_host, read_gpus, read_hosts
from fablaunch.scripts import kill_payload, sh
from fablaunch.spec import DEFAULT_PARALLEL, check_job_name
from fablaunch.survey import SessionState

from .flags import int_flag, parallel_flag, seconds_flag, task, usage_errors

TARGET_HELP = {
    "job": "Job name (default: every job of this project found on the hosts).",
    "hosts": "A hosts file naming hosts to ask (default ./hosts, if present, and the launch records' hosts).",
    "gpus": "A gpus file naming hosts to ask (default ./gpus, if present, and the launch records' hosts).",
    "parallel": "Hosts contacted at once (default 32).",
}


def targets(job: str | None, hosts: str | None, gpus: str | None) -> list[Host]:
    """The hosts to ask: those of the launch records here, plus those of the host files.

    Explicit files must exist; the default ./hosts and ./gpus are used when present. Without any
    of these there is nothing to ask, which is a usage error.
    """
    if job is not None:  # `--job ''` (an empty $JOB in a script) must never mean "every job"
        check_job_name(job, "--job")
    found: dict[str, Host] = {}
    recs = [r for r in [records.load(job)] if r] if job is not None else records.load_all()
    for rec in recs:
        for spec in rec.get("hosts", []):
            found.setdefault(spec, parse_host(spec, f"launch record of {rec['job']}"))
    for given, default, reader in ((hosts, "hosts", read_hosts), (gpus, "gpus", read_gpus)):
        path = Path(given or default)
        if given or path.exists():
            for host in reader(path):
                found.setdefault(host.spec, host)
    if not found:
        raise UsageError("--hosts/--gpus", "no host files here and no launch records: name the hosts to ask")
    return list(found.values())


class Survey:
    """The states of every session on the target hosts, plus the hosts that did not answer."""

    def __init__(self, states: list[SessionState], unreachable: dict[str, str]) -> None:
        self.states = states
        self.unreachable = unreachable

    def jobs(self) -> dict[str, list[SessionState]]:
        jobs: dict[str, list[SessionState]] = {}
        for state in sorted(self.states, key=_order):
            jobs.setdefault(state.job, []).append(state)
        return jobs


def _order(s: SessionState) -> tuple[str, int, int]:
    return (s.launched, s.rank if s.rank is not None else -1, s.node if s.node is not None else -1)


def take_survey(ex: Executor, hosts: list[Host], job: str | None) -> Survey:
    """Ask every host what its sessions are doing; unreachable hosts' recorded sessions are `unknown`."""
    outcomes = ex.run({h: (REMOTE_SHELL, survey.payload(h, job)) for h in hosts})
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
    return Survey(states, unreachable)


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
    return "exit 0" if s.state == "succeeded" else ""


def who(s: SessionState) -> str:
    return f"rank {s.rank}" if s.rank is not None else f"node {s.node}"


def job_table(job: str, states: list[SessionState]) -> ui.TableSpec:
    """A table of one job's sessions: host, rank or node, state and exit are never squeezed.

    The last log line wraps in what is left (on its own line under the row where that is too little)
    and is shown whole, as every other cell, in plain output.
    """
    mode = states[0].mode
    number = "rank" if mode == "gpus" else "node"
    rows = []
    for s in states:
        last = f"{s.last_line}  ({_age(s.log_age)} ago)" if s.last_line else ""
        rows.append((s.host, s.session, s.rank if mode == "gpus" else s.node, shown_state(s), describe_end(s),
                     s.pid or "", _age(s.runtime), last))
    return ui.TableSpec(f"job {job} ({mode})",
                        ("host", "session", number, "state", "exit", "pid", "run time", "last log line"), rows,
                        [_STYLE.get(s.state) for s in states], key_columns=("host", number, "state", "exit"),
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
    lines = [f"{line}; first failure: {who(first)} on {first.host} ({describe_end(first)})"]
    message = survey.error_message(first.error)
    root = failures.first(failures.collect(states))
    if root and root.kind == "worker":  # torchrun: the worker's own exception, not its agent's echo
        message = f"{root.who} on {root.host}: {failures.describe(root)}"
    if message:
        lines.append(f"  error: {message}")
    lines += [f"  | {t}" for t in first.tail]
    return lines


def report(result: Survey) -> None:
    for job, states in result.jobs().items():
        ui.emit_table(job_table(job, states))
        for i, line in enumerate(summary(job, states)):
            ui.say(line, style="bold" if i == 0 else None)
    for host, why in result.unreachable.items():
        ui.say(f"{host}: unreachable ({why}); its sessions are unknown", "red")
    if not result.states and not result.unreachable:
        ui.say("No jobs of fablaunch found on the hosts.")


@task(help={**TARGET_HELP, "json": "Print a JSON list, one object per session, instead of tables."})
@usage_errors
def status(c, job=None, hosts=None, gpus=None, json_=False, parallel=None):
    """Show every session of a job (or of all jobs): state, exit code or signal, run time, last log line.

    States: running, succeeded, failed (exit code), killed (signal), lost (session gone without an exit
    record), unknown (host unreachable). Names the first rank to fail, with its log tail and error.
    """
    host_list = targets(job, hosts, gpus)
    with Executor(c.config, parallel_flag(parallel), deadline=20) as ex:
        result = take_survey(ex, host_list, job)
    if json_:
        print(json.dumps([s.as_json() for s in sorted(result.states, key=_order)], indent=2))
    else:
        report(result)
    if result.unreachable:
        raise Exit(f"fablaunch: unreachable: {', '.join(result.unreachable)}", code=1)


def latest_job(ex: Executor, hosts: list[Host]) -> str:
    """The most recently launched job: from the records here, else from the hosts."""
    recs = records.load_all()
    if recs:
        return recs[-1]["job"]
    states = take_survey(ex, hosts, None).states
    if not states:
        raise UsageError("--job", "no launch records here and no jobs found on the hosts")
    return max(states, key=lambda s: s.launched).job


def logs_payload(states: list[SessionState], lines: int, follow: bool, job: str) -> str:
    """Print (or follow) a host's logs, each line prefixed with its file's key and a tab."""
    files = []
    for s in states:
        files.append((s.session, s.log))
        if s.mode == "torchrun":
            files.append((f"{s.session}/", s.log.removesuffix(".log") + ".torchrun/*/attempt_*/*/std*.log"))
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
    from fablaunch.tmux import list_command

    body += [f"  {list_command(job)} | grep -q . || {{ sleep 1; exit 0; }}",
             f"  printf '{survey.SEP}\\n' || exit 0", "  sleep 1", "done"]
    return "\n".join([*emit, *body, ""])


class LinePrinter:
    """Prints `[host who] line` for keyed lines from many hosts at once, one whole line at a time."""

    def __init__(self, states: list[SessionState]) -> None:
        self.who = {s.session: (s.host, who(s)) for s in states}
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        if line.startswith(survey.SEP) or "\t" not in line:
            return
        key, _, text = line.partition("\t")
        session, _, sub = key.partition("/")
        host, name = self.who.get(session, ("?", session))
        if sub:  # torchrun worker file: attempt_0/1/stderr.log -> worker 1 stderr
            parts = sub.split("/")
            name += f" worker {parts[-2]} {parts[-1].removesuffix('.log')}" if len(parts) >= 2 else f" {sub}"
        with self.lock:
            sys.stdout.write(f"[{host} {name}] {text.rstrip(chr(10))}\n")
            sys.stdout.flush()


def show_logs(ex: Executor, hosts: list[Host], job: str, ranks: list[int], only_hosts: list[str], lines: int,
              follow: bool) -> None:
    """Print (or follow) the logs of a job's selected sessions from every host at once."""
    result = take_survey(ex, hosts, job)
    states = [s for s in result.states if s.job == job and s.state != "unknown"
              and (not ranks or (s.rank if s.rank is not None else s.node) in ranks)
              and (not only_hosts or s.host in only_hosts)]
    if not states:
        raise UsageError("--job", f"no logs of job {job} found on the hosts"
                         + (f" (unreachable: {', '.join(result.unreachable)})" if result.unreachable else ""))
    printer = LinePrinter(states)
    by_host = {h.spec: h for h in hosts}
    per_host: dict[str, list[SessionState]] = {}
    for s in states:
        per_host.setdefault(s.host, []).append(s)

    def one(spec: str) -> Outcome:
        return ex.run_one(by_host[spec], REMOTE_SHELL, logs_payload(per_host[spec], lines, follow, job), printer)

    threads = [threading.Thread(target=one, args=(spec,), daemon=True) for spec in per_host]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
    for host, why in result.unreachable.items():
        ui.say(f"{host}: unreachable ({why}); its logs are not shown", "red", stderr=True)


@task(
    help={**TARGET_HELP, "job": "Job name (default: the job launched last from here).",
          "rank": "Only this rank (per-GPU jobs) or node (torchrun jobs); repeatable.",
          "host": "Only sessions on this host; repeatable.", "tail": "Lines per file (default 50).",
          "follow": "Keep streaming from every host until Ctrl-C or the job ends."},
    iterable=["rank", "host"],
)
@usage_errors
def logs(c, job=None, rank=None, host=None, tail=None, follow=False, hosts=None, gpus=None, parallel=None):
    """Print the ranks' output, each line prefixed with host and rank, from the per-rank log files.

    In torchrun mode, torchrun's own per-worker files are shown too. Works after the sessions ended
    and after `fab stop`: logs are files on the hosts, not tmux scrollback.
    """
    host_list = targets(job, hosts, gpus)
    ranks = [int_flag(r, "--rank") for r in rank or []]
    with Executor(c.config, parallel_flag(parallel), deadline=20, patient=follow) as ex, \
            contextlib.suppress(KeyboardInterrupt):
        show_logs(ex, host_list, job or latest_job(ex, host_list), ranks, list(host or []),
                  int_flag(tail, "--tail", 50) or 0, follow)


@task(help={"job": "Job name (default: the job launched last from here).",
            "rank": "Attach to this rank's session (per-GPU jobs) or node's (torchrun jobs).",
            "host": "Attach to the first session of the job on this host.",
            "hosts": TARGET_HELP["hosts"], "gpus": TARGET_HELP["gpus"]})
@usage_errors
def attach(c, rank=None, host=None, job=None, hosts=None, gpus=None):
    """Open an interactive terminal in one session of a job (tmux attach over ssh -t; detach with C-b d).

    If that session has ended, says so and points to `fab logs`.
    """
    if rank is None and host is None:
        raise UsageError("--rank/--host", "say which session: --rank N or --host HOST")
    number = int_flag(rank, "--rank")
    host_list = targets(job, hosts, gpus)
    with Executor(c.config, DEFAULT_PARALLEL, deadline=20) as ex:
        job = job or latest_job(ex, host_list)
        result = take_survey(ex, host_list, job)
    matches = [s for s in result.states if s.job == job
               and (number is None or (s.rank if s.rank is not None else s.node) == number)
               and (host is None or s.host == host)]
    if not matches:
        raise UsageError("--rank/--host", f"job {job} has no such session"
                         + (f" (unreachable: {', '.join(result.unreachable)})" if result.unreachable else ""))
    target = matches[0]
    if target.state != "running":
        raise Exit(f"fablaunch: {target.session} on {target.host} has ended ({target.state} {describe_end(target)}); "
                   f"see its output with: fab logs --job {job} --rank {number if number is not None else target.node}",
                   code=1)
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


def stop_job(ex: Executor, hosts: list[Host], job: str | None, grace: float) -> tuple[list[tuple[Any, ...]], int]:
    """Stop a job (or all jobs) on every host; return table rows and how many hosts are not clean."""
    outcomes = ex.run({h: (REMOTE_SHELL, kill_payload(job, h, grace)) for h in hosts})
    rows: list[tuple[Any, ...]] = []
    bad = 0
    for host in hosts:
        o = outcomes[host.spec]
        fields = dict(f.split("=", 1) for f in o.stdout.split() if "=" in f) if o.ok else {}
        if not o.ok or "left" not in fields:
            rows.append((host.spec, "", "", "", f"unreachable: {o.why()}" if not o.reached else o.why()))
            bad += 1
            continue
        found, left, sessions = int(fields["found"]), int(fields["left"]), int(fields["sessions"])
        if left:
            result = f"{ui.plural(left, 'process')} survived SIGKILL"
            bad += 1
        else:
            result = "stopped" if found or sessions else "nothing to stop"
        rows.append((host.spec, fields.get("jobs", ""), found, sessions, result))
    return rows, bad


STOP_LOCK_WAIT = 300.0  # seconds a stop waits for a launch of the same job from this project to finish


@contextlib.contextmanager
def after_launch(job: str) -> Any:
    """Wait until no launch of `job` from this project is in progress, and keep new ones out meanwhile.

    Stopping while a launch is still reaching its hosts would stop the hosts it has reached and
    then let the rest start. A directory where the lock cannot be written cannot launch either.
    """
    try:
        with records.lock(job):
            yield
            return
    except records.Busy as exc:
        ui.say(f"Waiting for the launch of {job} in progress (pid {exc.pid}) to finish before stopping it...",
               "yellow", stderr=True)
    except OSError:
        yield
        return
    try:
        with records.lock(job, wait=STOP_LOCK_WAIT):
            yield
    except records.Busy as exc:
        raise Exit(f"fablaunch: {exc} for over {STOP_LOCK_WAIT:g}s; nothing was stopped", code=1) from None


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
            "yes": "With --all: do not ask for confirmation."})
@usage_errors
def stop(c, job=None, grace=None, hosts=None, gpus=None, parallel=None, all_=False, yes=False):
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
            rows, bad = stop_job(ex, host_list, None, grace_s)
        return _report_stop("every job", rows, bad)
    names = [job] if job is not None else [r["job"] for r in records.load_all()]
    if not names:
        raise UsageError("--job", "no job was launched from this directory (no launch records in "
                         f"{records.RECORDS_DIR}): name one with --job, or stop every job on the hosts with --all")
    if job is None:
        ui.say(f"Stopping the jobs launched from this directory: {', '.join(names)}")
    rows: list[tuple[Any, ...]] = []
    bad = 0
    with Executor(c.config, parallel_flag(parallel), deadline=grace_s + 20) as ex:
        for name in names:
            with after_launch(name):
                job_rows, job_bad = stop_job(ex, targets(name, hosts, gpus), name, grace_s)
            rows += [(r[0], name, *r[2:]) for r in job_rows]
            bad += job_bad
    return _report_stop(job or ", ".join(names), rows, bad)


def _report_stop(what: str, rows: list[tuple[Any, ...]], bad: int) -> None:
    if all(r[-1] == "nothing to stop" for r in rows):
        ui.say(f"Nothing to stop for {what} on {ui.plural(len({r[0] for r in rows}), 'host')}.")
        return
    ui.table(f"Stop {what}", ("host", "jobs", "processes", "sessions", "result"), rows,
             ["green" if r[-1] in ("stopped", "nothing to stop") else "red" for r in rows],
             key_columns=("host", "processes", "sessions"), free_columns=("jobs", "result"))
    if bad:
        raise Exit(f"fablaunch: {ui.plural(bad, 'host')} not verified clean", code=1)


def exit_code_of(failure: SessionState) -> int:
    """The exit code `wait` gives for a failed job: the rank's own code, or 1 for a signal."""
    return failure.exit_code if failure.state == "failed" and failure.exit_code else 1


def wait_for(c: Any, ex: Executor, hosts: list[Host], job: str, timeout: float | None, fail_fast: bool,
             interval: float = 2.0) -> int:
    """Watch a job live until every session ended; return the exit code `fab wait` should give."""
    start = time.monotonic()
    first = take_survey(ex, hosts, job)
    if not any(s.job == job for s in first.states):
        where = ui.plural(len(hosts), "host")
        if first.unreachable:
            where += f"; unreachable: {', '.join(first.unreachable)}"
            raise Exit(f"fablaunch: job {job} not found on the reachable hosts ({where})", code=1)
        raise UsageError("--job", f"no job {job} on the hosts ({where}); `fab status` lists the jobs there")
    result = first
    with ui.live(stderr=True) as live:  # shows nothing where stderr is not a terminal
        while True:
            states = [s for s in result.states if s.job == job]
            if states:
                live.update(job_table(job, states), refresh=True)
            running = [s for s in states if s.state in ("running", "unknown")]
            failure = survey.first_failure(states)
            if failure and fail_fast and running:
                live.stop()
                ui.say(f"{who(failure)} on {failure.host} failed ({describe_end(failure)}): stopping the rest "
                       "(--fail-fast).", "red", stderr=True)
                stop_job(ex, hosts, job, 10.0)
                result = take_survey(ex, hosts, job)
                states = [s for s in result.states if s.job == job]
                break
            if states and not running:
                break
            if timeout is not None and time.monotonic() - start > timeout:
                live.stop()
                if states:
                    ui.emit_table(job_table(job, states))
                ui.say(f"Timed out after {timeout:g}s; job {job} keeps running.", "yellow")
                return 124
            time.sleep(interval)
            result = take_survey(ex, hosts, job)
    ui.emit_table(job_table(job, states))
    for line in summary(job, states):
        ui.say(line)
    lost = [s for s in states if s.state == "lost"]
    failure = survey.first_failure(states)
    if failure:
        return exit_code_of(failure)
    return 1 if lost else 0


@task(help={"job": "Job name (default: the job launched last from here).",
            "timeout": "Give up after this many seconds with exit code 124, leaving the job running.",
            "fail_fast": "As soon as one rank fails, stop the rest instead of waiting out NCCL timeouts.",
            "hosts": TARGET_HELP["hosts"], "gpus": TARGET_HELP["gpus"], "parallel": TARGET_HELP["parallel"]})
@usage_errors
def wait(c, job=None, timeout=None, fail_fast=False, hosts=None, gpus=None, parallel=None):
    """Show a job live until every rank has ended; exit 0 if all succeeded, else the first failure's code.

    A rank killed by a signal gives 1; --timeout gives 124.
    """
    host_list = targets(job, hosts, gpus)
    with Executor(c.config, parallel_flag(parallel), deadline=30) as ex:
        name = job or latest_job(ex, host_list)
        code = wait_for(c, ex, host_list, name, seconds_flag(timeout, "--timeout"), fail_fast)
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
    with Executor(c.config, parallel_flag(parallel), deadline=20) as ex:
        name = job or latest_job(ex, host_list)
        result = take_survey(ex, host_list, name)
    found = failures.collect([s for s in result.states if s.job == name])
    if json_:
        print(failures.as_json(name, found))
    else:
        failures.report(name, found)
    if result.unreachable:
        raise Exit(f"fablaunch: unreachable, failures there unknown: {', '.join(result.unreachable)}", code=1)
