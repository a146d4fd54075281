"""`fab launch-gpus` and `fab launch-torchrun`: start a job on every host at once.

A launch is three steps over the same connections: a read-only preflight on every host (so bad
hosts fail before any rank starts anywhere), the launch itself (one payload per host creating all
its sessions), and a rollback of every host if any host failed or the user pressed Ctrl-C, so a
half-started job never sits on the cluster holding GPUs and waiting for ranks that will never come.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from invoke import Exit

from fablaunch import records, tmux, ui
from fablaunch.errors import UsageError
from fablaunch.executor import REMOTE_SHELL, Executor, Held, Outcome
from fablaunch.hostfile import Host, read_gpus, read_hosts
from fablaunch.plan import Plan, plan_gpus, plan_torchrun
from fablaunch.scripts import EXISTS_CODE, kill_payload, launch_payload, preflight_payload, session_script
from fablaunch.spec import (
    JobSpec,
    build_spec,
    check_job_name,
    default_job_name,
    default_python,
    default_workdir,
    parse_env,
)

from .flags import int_flag, task, usage_error

COMMON_HELP = {
    "job": "Job name (default: the spec's name, else the script's name plus a timestamp).",
    "spec": "YAML job spec holding any of these options and the command; flags override it.",
    "python": "Interpreter for a command that is a .py script (default: `python` on this PATH).",
    "workdir": "Working directory on every host (default: the directory fab is called from).",
    "port": "MASTER_PORT / rendezvous port on the first host (default 5001).",
    "master_addr": "Address the ranks reach the first host at (default: the first host as ssh resolves it).",
    "env": "KEY=VALUE set for every rank; repeatable. Values never appear on a command line.",
    "secret": "Mask this variable's value in --dry-run, like names with TOKEN, KEY, PASS...; repeatable.",
    "parallel": "Hosts contacted at once (default 32).",
    "replace": "Stop a running job of the same name first instead of refusing.",
    "rollback": "On a failed or interrupted launch, stop what started on the other hosts (default on).",
    "preflight": "Check every host first: reachable, interpreter, working directory, MASTER_PORT free on the "
                 "first host, no running job of this name (default on).",
    "dry_run": "Print each host's scripts and remote commands (secrets masked); touch no host.",
    "wait": "After launching, show the job live until it ends and exit like `fab wait`.",
    "follow": "After launching, stream every rank's output like `fab logs --follow`.",
}


def command_argv() -> list[str]:
    """The tokens after `--`, exactly as the shell passed them (see cli.Executor)."""
    import sys

    argv = sys.argv
    return argv[argv.index("--") + 1:] if "--" in argv else []


def _spec(spec: str | None, env: list[str] | None, secret: list[str] | None = None, **flags: Any) -> JobSpec:
    for name in ("port", "parallel", "max_restarts"):
        flags[name] = int_flag(flags.get(name), f"--{name.replace('_', '-')}")
    return build_spec(spec, command_argv(), env=parse_env(env or []) or None, secrets=secret, **flags)


def resolver(config: Any) -> Callable[[Host], str]:
    """Resolve a host to the address ssh would connect to (HostName from ssh_config)."""

    def resolve(host: Host) -> str:
        if host.is_local:
            return host.name
        from fabric import Connection

        return Connection(host.name, user=host.user, port=host.port, config=config).host

    return resolve


def make_plan(config: Any, mode: str, spec: JobSpec, job: str | None = None) -> Plan:
    """Read the spec's host file for this mode and plan the job; bad input raises UsageError.

    `job` overrides the spec's (checked) name or the default one, for callers that only plan.
    """
    hostfile = spec.gpus if mode == "gpus" else spec.hosts
    hosts = read_gpus(Path(hostfile)) if mode == "gpus" else read_hosts(Path(hostfile))
    if job is None:
        job = check_job_name(spec.name, "--job") if spec.name else default_job_name(spec.command)
    planner = plan_gpus if mode == "gpus" else plan_torchrun
    plan = planner(spec, hosts, job, spec.python or default_python(), spec.workdir or default_workdir(),
                   resolver(config))
    tmux.check_fits(plan)  # refused here, not after some hosts have started
    return plan


def _make_plan(c: Any, mode: str, spec: JobSpec) -> tuple[Plan, str]:
    """Plan the job; any UsageError becomes exit 2 with nothing touched."""
    try:
        plan = make_plan(c.config, mode, spec)
    except UsageError as exc:
        raise usage_error(exc) from None
    return plan, spec.gpus if mode == "gpus" else spec.hosts


def _python_to_check(plan: Plan) -> str | None:
    first = plan.sessions[0].argv[0]
    return first if plan.mode == "torchrun" or plan.command[0].endswith(".py") or plan.command[0] == "-m" else None


def dry_run(plan: Plan, launched: str) -> None:
    """Show what a launch would run on every host, secret-looking values masked."""
    ui.say(f"Dry run of job {plan.job} ({plan.mode}, {ui.plural(len(plan.sessions), 'session')} on "
           f"{ui.plural(len(plan.hosts), 'host')}); nothing is touched.")
    for host in plan.hosts:
        how = "local bash" if host.is_local else f"ssh {host.spec}"
        sessions = plan.on(host)
        ui.show_text(f"{host.spec}: `{REMOTE_SHELL}` via {how}, with this on its stdin",
                     launch_payload(plan, sessions, launched, readable=True))
        for session in sessions:
            ui.show_text(f"{host.spec}: {session.script} (tmux session {session.name})",
                         session_script(plan, session, launched, mask=True))


def rollback(ex: Executor, plan: Plan, hosts: list[Host], run: str | None = None) -> dict[str, Outcome]:
    """Stop whatever of the job started on these hosts (only this launch's part of it, given `run`)."""
    return ex.run({h: (REMOTE_SHELL, kill_payload(plan.job, h, grace=2, run=run)) for h in hosts})


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived during a launch; carries the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """Turn SIGINT, SIGTERM and SIGHUP into Interrupted while a launch runs, and hold them off later.

    A closed laptop lid (SIGHUP), a CI timeout (SIGTERM) and Ctrl-C must all roll a launch back,
    not just Ctrl-C; and a second Ctrl-C while the rollback runs must not cut the rollback short.
    """

    CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: list[int] = []
        self.shielded = False
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if not self.shielded:
            self.shielded = True  # the first signal wins; later ones wait for the rollback
            raise Interrupted(signum)
        if signum == signal.SIGINT:
            ui.say("Still rolling back; the launch exits when every host is clean.", "yellow", stderr=True)

    def __enter__(self) -> Signals:
        for signum in self.CAUGHT:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _results_table(title: str, plan: Plan, outcomes: dict[str, Outcome], note: dict[str, str] | None = None) -> None:
    rows, styles = [], []
    for host in plan.hosts:
        o = outcomes.get(host.spec)
        if o is None:
            result, seconds = "not attempted", ""
        else:
            result, seconds = ("started" if o.ok else o.why()), f"{o.seconds:.2f}"
        if note and host.spec in note:
            result = f"{result}; {note[host.spec]}"
        rows.append((host.spec, len(plan.on(host)), seconds, result))
        styles.append("green" if o is not None and o.ok else "red")
    ui.table(title, ("host", "sessions", "seconds", "result"), rows, styles,
             key_columns=("host", "sessions", "seconds"), free_columns=("result",))


def launch_then(c: Any, mode: str, spec: JobSpec, replace: bool, rollback_on_failure: bool, dry: bool,
                wait: bool, follow: bool, preflight: bool = True) -> None:
    """Launch, then optionally follow the logs and/or wait for the end, as the flags ask."""
    plan = launch(c, mode, spec, replace, rollback_on_failure, dry, preflight)
    if dry or not (wait or follow):
        return
    from .jobs import show_logs, wait_for

    hosts = list(plan.hosts)
    with Executor(c.config, spec.parallel, deadline=20, patient=follow) as ex:
        if follow:
            try:
                show_logs(ex, hosts, plan.job, [], [], 50, True)
            except KeyboardInterrupt:
                if not wait:
                    return
        code = wait_for(c, ex, hosts, plan.job, None, False) if wait else 0
    if code:
        raise Exit(code=code)


@dataclass
class Attempt:
    """One launch in progress: what its rollback, its results table and the project history need."""

    plan: Plan
    launched: str
    run: str = field(default_factory=lambda: secrets.token_hex(6))
    executor: Executor | None = None
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def note(self, outcome: str) -> None:
        """Keep a line of what this launch did in the project's history; never fatal (a full disk)."""
        with contextlib.suppress(OSError):
            records.note({"job": self.plan.job, "run": self.run, "launched": self.launched, "mode": self.plan.mode,
                          "hosts": [h.spec for h in self.plan.hosts], "outcome": outcome})


def launch(c: Any, mode: str, spec: JobSpec, replace: bool, rollback_on_failure: bool, dry: bool,
           preflight: bool = True) -> Plan:
    """Plan, check, launch and (on failure or a signal) roll back a job; raise Exit unless every session started.

    Without `preflight` the hosts are not checked first (the launch payload still refuses a host
    without tmux or the working directory, or where the job already runs, and rolls the rest back);
    `replace` still stops an old job. The first host is launched before the others: its lock decides
    between two launches of one name, so the loser is refused before it touches any other host.
    """
    plan, hostfile = _make_plan(c, mode, spec)
    attempt = Attempt(plan, datetime.now().astimezone().isoformat(timespec="seconds"))
    if dry:
        dry_run(plan, attempt.launched)
        return plan
    with project_lock(plan.job), Signals() as signals:
        try:
            _start(c, attempt, spec, replace, rollback_on_failure, preflight)
            path = _save_record(plan, attempt, hostfile)
            signals.shielded = True  # launched and recorded: a late signal no longer undoes it
        except Interrupted as exc:
            signals.shielded = True
            _roll_back_interrupted(c, attempt, spec, exc.signum)
    attempt.note("started")
    _results_table(f"Launched {plan.job}: {ui.plural(len(plan.sessions), 'session')} on "
                   f"{ui.plural(len(plan.hosts), 'host')}", plan, attempt.outcomes)
    ui.say(f"Logs: {plan.sessions[0].dir.rsplit('/', 1)[0]}/<host>/ on each host; record: {path}")
    return plan


@contextlib.contextmanager
def project_lock(job: str) -> Iterator[None]:
    """This project's lock on a job for a whole launch; exit 1 at once if it is held or cannot be made.

    The lock and the launch record live in ./.fablaunch: a directory where they cannot be written
    (read-only, full) would launch a job that no later command here could find, so nothing starts.
    """
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(records.lock(job))
        except records.Busy as exc:
            raise Exit(f"fablaunch: {exc}; nothing was launched", code=1) from None
        except OSError as exc:
            raise Exit(f"fablaunch: cannot write {Path.cwd() / '.fablaunch'} ({exc.strerror or exc}): launch from "
                       "a writable directory (fab -r REPO works from anywhere); nothing was launched", code=1) from None
        yield


def _save_record(plan: Plan, attempt: Attempt, hostfile: str) -> Path | str:
    """Keep the launch record; the job runs either way, so a failure to write it is said, not fatal."""
    try:
        return records.save(records.record(plan, attempt.launched, hostfile, attempt.run))
    except OSError as exc:
        ui.say(f"Warning: the launch record could not be written ({exc.strerror or exc}); the job runs, but "
               f"status and stop here need --gpus/--hosts to find it.", "yellow", stderr=True)
        return "not written"


def _roll_back_interrupted(c: Any, attempt: Attempt, spec: JobSpec, signum: int) -> None:
    """Undo this launch everywhere after a signal, then exit 128+signal."""
    plan, name = attempt.plan, signal.Signals(signum).name
    ui.say(f"{name}: rolling back every host.", "yellow", stderr=True)
    if attempt.executor is not None:
        attempt.executor.cancel()  # hosts still writing files stop at the payload's guard, before any session
    with Executor(c.config, spec.parallel, deadline=30) as ex:
        undone = rollback(ex, plan, list(plan.hosts), attempt.run)
    dirty = [host for host, o in undone.items() if not o.ok or " left=0 " not in o.stdout]
    attempt.note(f"rolled back after {name}" + (f"; not verified on {', '.join(dirty)}" if dirty else ""))
    if dirty:
        raise Exit(f"fablaunch: launch interrupted by {name}; rollback could not be verified on {', '.join(dirty)}: "
                   f"run `fab stop --job {plan.job}`", code=128 + signum)
    raise Exit(f"fablaunch: launch interrupted by {name}; nothing of the job is left running", code=128 + signum)


def _start(c: Any, attempt: Attempt, spec: JobSpec, replace: bool, rollback_on_failure: bool,
           preflight: bool) -> None:
    """Check the hosts and start every session: the first host first, then the rest at once."""
    plan = attempt.plan
    with Executor(c.config, spec.parallel, deadline=30) as ex:
        attempt.executor = ex
        held = _preflight(ex, plan, replace) if preflight else {}
        if replace and not preflight:
            _stop_running(ex, plan)
        payloads = {h.spec: launch_payload(plan, plan.on(h), attempt.launched, run=attempt.run) for h in plan.hosts}
        first, rest = plan.hosts[0], plan.hosts[1:]
        outcomes = attempt.outcomes
        with ui.progress(f"launching {plan.job}", len(plan.hosts)) as advance:
            if held:  # the shells that ran the checks run the launch too: one remote shell per host
                outcomes |= ex.release({first.spec: held[first.spec]}, payloads, on_done=advance)
            else:
                outcomes |= ex.run({first: (REMOTE_SHELL, payloads[first.spec])}, on_done=advance, patient=True)
            if outcomes[first.spec].exit_code == EXISTS_CODE:
                if held:
                    ex.release({h.spec: held[h.spec] for h in rest}, {})  # end the waiting shells unused
                attempt.note("refused: already running or being launched")
                raise Exit(f"fablaunch: job {plan.job} is already running or being launched on {first.spec} "
                           f"({outcomes[first.spec].why()}); nothing was launched", code=1)
            if held:
                outcomes |= ex.release({h.spec: held[h.spec] for h in rest}, payloads, on_done=advance)
            else:
                outcomes |= ex.run({h: (REMOTE_SHELL, payloads[h.spec]) for h in rest}, on_done=advance,
                                   patient=True)
        failed = [h for h in plan.hosts if not outcomes[h.spec].ok]
        if not failed:
            return
        note = {}
        if rollback_on_failure:
            # A host cut off mid-payload (a deadline) may have started sessions before it was cut.
            touched = [h for h in plan.hosts if outcomes[h.spec].reached or outcomes[h.spec].started]
            undone = rollback(ex, plan, touched, attempt.run)
            note = {host: "rolled back" if o.ok else f"rollback failed: {o.why()}"
                    for host, o in undone.items() if outcomes[host].ok}
        _results_table(f"Launch of {plan.job} failed", plan, outcomes, note)
        attempt.note(f"failed on {', '.join(h.spec for h in failed)}"
                     + ("; rolled back" if rollback_on_failure else "; the rest kept running"))
        raise Exit(f"fablaunch: {len(failed)} of {ui.plural(len(plan.hosts), 'host')} failed to launch job {plan.job}"
                   + ("; the rest was rolled back" if rollback_on_failure else "; the rest keeps running"),
                   code=1)


def _preflight(ex: Executor, plan: Plan, replace: bool) -> dict[str, Held]:
    """Check every host before any rank starts anywhere; stop an old job first with --replace.

    The fast subset of `fab doctor`: reachable, tmux, working directory, interpreter, MASTER_PORT free
    on the master (only there: the other hosts never bind it) and no job of this name. With --replace
    the old job may be what holds the port, so the master's port is checked once it is stopped.
    Returns the hosts' shells, held open for the launch payload.
    """
    python = _python_to_check(plan)
    master = plan.hosts[0]
    held = ex.hold({h: (REMOTE_SHELL, preflight_payload(plan, python, check_port=h == master and not replace,
                                                        held=True, host=h)) for h in plan.hosts})
    outcomes = {spec: h.outcome for spec, h in held.items()}
    try:
        _refuse_failed(plan, outcomes)
        running = [h for h in plan.hosts if "exists:" in outcomes[h.spec].stdout]
        if running and not replace:
            names = ", ".join(h.spec for h in running)
            raise Exit(f"fablaunch: job {plan.job} is already running on {names}; "
                       "stop it, pick another --job, or pass --replace. Nothing was launched.", code=2)
        if running:
            _stop_running(ex, plan)
        if replace:
            again = ex.run({master: (REMOTE_SHELL, preflight_payload(plan, python, check_port=True, host=master))})
            _refuse_failed(plan, {**outcomes, **again})
    except BaseException:
        ex.release(held, {})  # end the waiting shells unused
        raise
    return held


def _refuse_failed(plan: Plan, outcomes: dict[str, Outcome]) -> None:
    """Show the preflight's results and exit 1 if any host failed it."""
    bad = {s: o for s, o in outcomes.items() if not o.ok}
    if bad:
        _results_table(f"Preflight of {plan.job} failed: nothing was launched", plan, outcomes)
        raise Exit(f"fablaunch: {len(bad)} of {ui.plural(len(plan.hosts), 'host')} cannot run job {plan.job}; "
                   "nothing was launched", code=1)


def _stop_running(ex: Executor, plan: Plan) -> None:
    """Stop the running job of this name everywhere (--replace); exit 1 unless verified gone."""
    stopped = rollback(ex, plan, list(plan.hosts))
    left = [s for s, o in stopped.items() if not o.ok or " left=0 " not in o.stdout]
    if left:
        raise Exit(f"fablaunch: could not stop the running job {plan.job} on {', '.join(left)}", code=1)


@task(
    help={**COMMON_HELP, "gpus": "File listing one host per GPU, in rank order (default ./gpus)."},
    iterable=["env", "secret"],
)
def launch_gpus(c, gpus=None, job=None, spec=None, python=None, workdir=None, port=None, master_addr=None,
                env=None, parallel=None, replace=False, rollback=True, dry_run=False, wait=False, follow=False,
                preflight=True, secret=None):
    """Start one tmux session per line of the gpus file, each a rank with the torchrun environment.

    Usage: fab launch-gpus [flags] -- train.py --your --args. Every rank gets RANK, LOCAL_RANK,
    WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK/NODE_RANK, MASTER_ADDR/PORT, OMP_NUM_THREADS=1 and its
    own TORCHELASTIC_ERROR_FILE; logs and exit codes are kept per rank on each host.
    """
    try:
        job_spec = _spec(spec, env, secret, gpus=gpus, name=job, python=python, workdir=workdir, port=port,
                         master_addr=master_addr, parallel=parallel)
    except UsageError as exc:
        raise usage_error(exc) from None
    launch_then(c, "gpus", job_spec, replace, rollback, dry_run, wait, follow, preflight)


@task(
    help={
        **COMMON_HELP,
        "hosts": "File listing one node per line, optionally with ` slots=N` (default ./hosts).",
        "nproc_per_node": "Workers per node for torchrun (default: the host's slots, else `gpu`).",
        "max_restarts": "torchrun --max-restarts: restarts of the whole worker group on failure.",
    },
    iterable=["env", "secret"],
)
def launch_torchrun(c, hosts=None, job=None, spec=None, python=None, workdir=None, port=None, master_addr=None,
                    env=None, parallel=None, nproc_per_node=None, max_restarts=None, replace=False, rollback=True,
                    dry_run=False, wait=False, follow=False, preflight=True, secret=None):
    """Start torchrun on every node of the hosts file (one tmux session each), meeting at c10d rendezvous.

    Usage: fab launch-torchrun [flags] -- train.py --your --args. The first host serves the
    rendezvous; each node runs --nproc-per-node workers with logs under its own job directory.
    """
    try:
        job_spec = _spec(spec, env, secret, hosts=hosts, name=job, python=python, workdir=workdir, port=port,
                         master_addr=master_addr, parallel=parallel,
                         nproc_per_node=nproc_per_node, max_restarts=max_restarts)
    except UsageError as exc:
        raise usage_error(exc) from None
    launch_then(c, "torchrun", job_spec, replace, rollback, dry_run, wait, follow, preflight)
