"""Start a planned job on its hosts: preflight, one payload per host, rollback, records.

A launch is three steps over the same connections: a read-only preflight on every host (so bad
hosts fail before any rank starts anywhere), the launch itself (one payload per host creating all
its sessions), and a rollback of every host if any host failed or a signal arrived, so a
half-started job never sits on the cluster holding GPUs and waiting for ranks that will never come.
Nothing here prints a table or exits: failures are LaunchErrors carrying each host's outcome, for
the `fab` tasks and the Python API alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import secrets
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import blocklist, records, tmux, ui
from .errors import LaunchError
from .executor import REMOTE_SHELL, Executor, Held, Outcome
from .hostfile import Host, gpus_from, hosts_from
from .plan import Plan, plan_gpus, plan_torchrun
from .scripts import EXISTS_CODE, kill_payload, launch_payload, preflight_payload
from .selection import Selection, pin_devices, select
from .spec import JobSpec, check_job_name, default_job_name, default_python, default_workdir


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
    hosts = gpus_from(spec.gpus) if mode == "gpus" else hosts_from(spec.hosts)
    # The selection (--include/--exclude/--num-*) is applied before planning, so ranks, WORLD_SIZE and
    # MASTER_ADDR are those of the hosts that remain, as if the file listed only them.
    world = select(mode, hosts, Selection.of(spec), spec.nproc_per_node)
    # After the selection, so --exclude/--include may still name a blocked host.
    world = dataclasses.replace(world, hosts=blocklist.skip(world.hosts))
    if world.nproc_per_node != spec.nproc_per_node:  # a number became each node's slots
        spec = dataclasses.replace(spec, nproc_per_node=world.nproc_per_node)
    if job is None:
        job = check_job_name(spec.name, "--job") if spec.name else default_job_name(spec.command)
    planner = plan_gpus if mode == "gpus" else plan_torchrun
    plan = planner(spec, world.hosts, job, spec.python or default_python(), spec.workdir or default_workdir(),
                   resolver(config))
    plan = pin_devices(plan, world, spec.env_sources)
    tmux.check_fits(plan)  # refused here, not after some hosts have started
    return plan


def python_to_check(plan: Plan) -> str | None:
    first = plan.sessions[0].argv[0]
    return first if plan.mode == "torchrun" or plan.command[0].endswith(".py") or plan.command[0] == "-m" else None


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
        self.shielded = False
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.shielded:
            self.shielded = True  # the first signal wins; later ones wait for the rollback
            raise Interrupted(signum)
        if signum == signal.SIGINT:
            ui.say("Still rolling back; the launch exits when every host is clean.", "yellow", stderr=True)

    def __enter__(self) -> Signals:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers (a launch from a worker thread)
        for signum in self.CAUGHT:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


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


@dataclass
class Launched:
    """A started job: its plan, each host's outcome and where the launch record went."""

    plan: Plan
    outcomes: dict[str, Outcome]
    record: Path | str
    run: str


def launch(config: Any, plan: Plan, spec: JobSpec, hostfile: str, *, replace: bool = False,
           rollback_on_failure: bool = True, preflight: bool = True) -> Launched:
    """Check, launch and (on failure or a signal) roll back a planned job; raise LaunchError unless all started.

    Without `preflight` the hosts are not checked first (the launch payload still refuses a host
    without tmux or the working directory, or where the job already runs, and rolls the rest back);
    `replace` still stops an old job. The first host is launched before the others: its lock decides
    between two launches of one name, so the loser is refused before it touches any other host.
    SIGINT, SIGTERM and SIGHUP roll the launch back and raise LaunchError with code 128+signal.
    """
    attempt = Attempt(plan, datetime.now().astimezone().isoformat(timespec="seconds"))
    with project_lock(plan.job), Signals() as signals:
        try:
            _start(config, attempt, spec, replace, rollback_on_failure, preflight)
            path = _save_record(plan, attempt, hostfile, spec)
            signals.shielded = True  # launched and recorded: a late signal no longer undoes it
        except Interrupted as exc:
            signals.shielded = True
            _roll_back_interrupted(config, attempt, spec, exc.signum)
    attempt.note("started")
    return Launched(plan, attempt.outcomes, path, attempt.run)


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
            raise LaunchError(f"{exc}; nothing was launched") from None
        except OSError as exc:
            raise LaunchError(f"cannot write {Path.cwd() / '.fablaunch'} ({exc.strerror or exc}): launch from "
                              "a writable directory (fab -r REPO works from anywhere); nothing was launched") from None
        yield


def _save_record(plan: Plan, attempt: Attempt, hostfile: str, spec: JobSpec) -> Path | str:
    """Keep the launch record; the job runs either way, so a failure to write it is said, not fatal."""
    try:
        return records.save(records.record(plan, attempt.launched, hostfile, attempt.run, spec))
    except OSError as exc:
        ui.say(f"Warning: the launch record could not be written ({exc.strerror or exc}); the job runs, but "
               f"status and stop here need --gpus/--hosts to find it.", "yellow", stderr=True)
        return "not written"


def _roll_back_interrupted(config: Any, attempt: Attempt, spec: JobSpec, signum: int) -> None:
    """Undo this launch everywhere after a signal, then exit 128+signal."""
    plan, name = attempt.plan, signal.Signals(signum).name
    ui.say(f"{name}: rolling back every host.", "yellow", stderr=True)
    if attempt.executor is not None:
        attempt.executor.cancel()  # hosts still writing files stop at the payload's guard, before any session
    with Executor(config, spec.parallel, deadline=30) as ex:
        undone = rollback(ex, plan, list(plan.hosts), attempt.run)
    dirty = [host for host, o in undone.items() if not o.ok or " left=0 " not in o.stdout]
    attempt.note(f"rolled back after {name}" + (f"; not verified on {', '.join(dirty)}" if dirty else ""))
    if dirty:
        raise LaunchError(f"launch interrupted by {name}; rollback could not be verified on {', '.join(dirty)}: "
                          f"run `fab stop --job {plan.job}`", 128 + signum)
    raise LaunchError(f"launch interrupted by {name}; nothing of the job is left running", 128 + signum)


def _start(config: Any, attempt: Attempt, spec: JobSpec, replace: bool, rollback_on_failure: bool,
           preflight: bool) -> None:
    """Check the hosts and start every session: the first host first, then the rest at once."""
    plan = attempt.plan
    with Executor(config, spec.parallel, deadline=30) as ex:
        attempt.executor = ex
        held = _preflight(ex, plan, replace) if preflight else {}
        if replace and not preflight:
            stop_running(ex, plan)
        payloads = {h.spec: launch_payload(plan, plan.on(h), attempt.launched, run=attempt.run, checked=bool(held))
                    for h in plan.hosts}
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
                raise LaunchError(f"job {plan.job} is already running or being launched on {first.spec} "
                                  f"({outcomes[first.spec].why()}); nothing was launched")
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
        attempt.note(f"failed on {', '.join(h.spec for h in failed)}"
                     + ("; rolled back" if rollback_on_failure else "; the rest kept running"))
        raise LaunchError(f"{len(failed)} of {ui.plural(len(plan.hosts), 'host')} failed to launch job {plan.job}"
                          + ("; the rest was rolled back" if rollback_on_failure else "; the rest keeps running"),
                          title=f"Launch of {plan.job} failed", outcomes=dict(outcomes), notes=note)


def _preflight(ex: Executor, plan: Plan, replace: bool) -> dict[str, Held]:
    """Check every host before any rank starts anywhere; stop an old job first with --replace.

    The fast subset of `fab doctor`: reachable, tmux, working directory, interpreter, MASTER_PORT free
    on the master (only there: the other hosts never bind it) and no job of this name. With --replace
    the old job may be what holds the port, so the master's port is checked once it is stopped.
    Returns the hosts' shells, held open for the launch payload.
    """
    python = python_to_check(plan)
    master = plan.hosts[0]
    held = ex.hold({h: (REMOTE_SHELL, preflight_payload(plan, python, check_port=h == master and not replace,
                                                        held=True, host=h)) for h in plan.hosts})
    outcomes = {spec: h.outcome for spec, h in held.items()}
    try:
        _refuse_failed(plan, outcomes)
        running = [h for h in plan.hosts if "exists:" in outcomes[h.spec].stdout]
        if running and not replace:
            names = ", ".join(h.spec for h in running)
            raise LaunchError(f"job {plan.job} is already running on {names}; "
                              "stop it, pick another --job, or pass --replace. Nothing was launched.", 2)
        if running:
            stop_running(ex, plan)
        if replace:
            again = ex.run({master: (REMOTE_SHELL, preflight_payload(plan, python, check_port=True, host=master))})
            _refuse_failed(plan, {**outcomes, **again})
    except BaseException:
        ex.release(held, {})  # end the waiting shells unused
        raise
    return held


def _refuse_failed(plan: Plan, outcomes: dict[str, Outcome]) -> None:
    """Raise LaunchError (with every host's outcome) if any host failed the preflight."""
    bad = {s: o for s, o in outcomes.items() if not o.ok}
    if bad:
        raise LaunchError(f"{len(bad)} of {ui.plural(len(plan.hosts), 'host')} cannot run job {plan.job}; "
                   "nothing was launched",
                          title=f"Preflight of {plan.job} failed: nothing was launched", outcomes=dict(outcomes),
                          passed="ready; not launched")


def stop_running(ex: Executor, plan: Plan) -> None:
    """Stop the running job of this name everywhere (--replace), and say so; LaunchError unless verified gone."""
    stopped = rollback(ex, plan, list(plan.hosts))
    found = {s: int(m.group(1)) for s, o in stopped.items() if (m := re.search(r"found=(\d+)", o.stdout))}
    if any(found.values()):
        ui.say(f"--replace: stopped the running job {plan.job}: "
               + ", ".join(f"{ui.plural(n, 'process')} on {s}" for s, n in found.items() if n), "yellow", stderr=True)
    left = [s for s, o in stopped.items() if not o.ok or " left=0 " not in o.stdout]
    if left:
        raise LaunchError(f"could not stop the running job {plan.job} on {', '.join(left)}")
