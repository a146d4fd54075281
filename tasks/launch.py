"""`fab launch-gpus` and `fab launch-torchrun`: flags, help and printing over `fablaunch.launcher`.

The launch itself (preflight, one payload per host, rollback under failure and signals) is the
engine's, shared with the Python API; these tasks turn flags into a spec and results into tables.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from invoke import Exit

from fablaunch import launcher, ui
from fablaunch.errors import LaunchError, UsageError
from fablaunch.executor import REMOTE_SHELL, Executor, Outcome
from fablaunch.plan import Plan
from fablaunch.scripts import describe, launch_payload, manifest, masked, session_script
from fablaunch.spec import JobSpec, build_spec, parse_env

from .flags import int_flag, task, usage_error, usage_errors

COMMON_HELP = {
    "job": "Job name (default: the spec's job, else the script's name plus a timestamp).",
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
    "dry_run": "Print every session, one session's script and a manifest (secrets masked); touch no host.",
    "verbose": "With --dry-run: every host's payload and every session's script.",
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


def _make_plan(c: Any, mode: str, spec: JobSpec) -> tuple[Plan, str]:
    """Plan the job; any UsageError becomes exit 2 with nothing touched."""
    try:
        plan = launcher.make_plan(c.config, mode, spec)
    except UsageError as exc:
        raise usage_error(exc) from None
    return plan, spec.gpus if mode == "gpus" else spec.hosts


def dry_run(plan: Plan, launched: str, verbose: bool = False) -> None:
    """Show what a launch would do, secret-looking values masked: every session in a table, one session's
    script and one host's manifest in full (`verbose`: every host's payload and every script)."""
    ui.say(f"Dry run of job {plan.job} ({plan.mode}, {ui.plural(len(plan.sessions), 'session')} on "
           f"{ui.plural(len(plan.hosts), 'host')}); nothing is touched.")
    run = "<run id>"
    ui.table("Sessions", ("host", "session", "who", "command"),
             [(s.host.spec, s.name, describe(s), " ".join(masked("", arg, plan.secrets) for arg in s.argv))
              for s in plan.sessions],
             key_columns=("host", "session", "who"), free_columns=("command",))
    first = plan.sessions[0]
    if verbose:
        for host in plan.hosts:
            how = "local bash" if host.is_local else f"ssh {host.spec}"
            ui.show_text(f"{host.spec}: `{REMOTE_SHELL}` via {how}, with this on its stdin",
                         launch_payload(plan, plan.on(host), launched, readable=True, run=run))
    for session in plan.sessions if verbose else [first]:
        ui.show_text(f"{session.host.spec}: {session.script} (tmux session {session.name})",
                     session_script(plan, session, launched, mask=True, run=run))
    ui.show_text(f"{first.host.spec}: {first.dir}/manifest.json",
                 manifest(plan, plan.on(first.host), launched, run))
    if not verbose:
        ui.say("The other sessions' scripts differ only in their rank variables; --verbose shows every script "
               "and every host's payload.")


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
                wait: bool, follow: bool, preflight: bool = True, verbose: bool = False) -> None:
    """Launch, then optionally follow the logs and/or wait for the end, as the flags ask."""
    plan = launch(c, mode, spec, replace, rollback_on_failure, dry, preflight, verbose)
    if dry or not (wait or follow):
        return
    from .jobs import say_unreachable, show_logs, wait_for

    hosts = list(plan.hosts)
    try:
        with Executor(c.config, spec.parallel, deadline=20, patient=follow) as ex:
            if follow:  # until the job ends, then the same summary and exit code as --wait
                say_unreachable(show_logs(ex, hosts, plan.job, [], [], 50, True))
            code = wait_for(c, ex, hosts, plan.job, None, False)
    except KeyboardInterrupt:
        raise Exit(f"fablaunch: interrupted; job {plan.job} keeps running (fab stop --job {plan.job})",
                   code=130) from None
    if code:
        raise Exit(code=code)


def launch(c: Any, mode: str, spec: JobSpec, replace: bool, rollback_on_failure: bool, dry: bool,
           preflight: bool = True, verbose: bool = False) -> Plan:
    """Plan and launch (or, `dry`, only show) a job; print each host's result; raise Exit unless all started."""
    plan, hostfile = _make_plan(c, mode, spec)
    if dry:
        dry_run(plan, datetime.now().astimezone().isoformat(timespec="seconds"), verbose)
        return plan
    try:
        done = launcher.launch(c.config, plan, spec, hostfile, replace=replace,
                               rollback_on_failure=rollback_on_failure, preflight=preflight)
    except LaunchError as exc:
        if exc.outcomes:
            _results_table(exc.title, plan, exc.outcomes, exc.notes)
        raise Exit(f"fablaunch: {exc}", code=exc.code) from None
    _results_table(f"Launched {plan.job}: {ui.plural(len(plan.sessions), 'session')} on "
                   f"{ui.plural(len(plan.hosts), 'host')}", plan, done.outcomes)
    ui.say(f"Logs: {plan.sessions[0].dir.rsplit('/', 1)[0]}/<host>/ on each host; record: {done.record}")
    return plan


@task(
    help={**COMMON_HELP, "gpus": "File listing one host per GPU, in rank order (default ./gpus)."},
    iterable=["env", "secret"],
)
@usage_errors
def launch_gpus(c, gpus=None, job=None, spec=None, python=None, workdir=None, port=None, master_addr=None,
                env=None, parallel=None, replace=False, rollback=True, dry_run=False, wait=False, follow=False,
                preflight=True, verbose=False, secret=None):
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
    launch_then(c, "gpus", job_spec, replace, rollback, dry_run, wait, follow, preflight, verbose)


@task(
    help={
        **COMMON_HELP,
        "hosts": "File listing one node per line, optionally with ` slots=N` (default ./hosts).",
        "nproc_per_node": "Workers per node for torchrun (default: the host's slots, else `gpu`).",
        "max_restarts": "torchrun --max-restarts: restarts of the whole worker group on failure.",
    },
    iterable=["env", "secret"],
)
@usage_errors
def launch_torchrun(c, hosts=None, job=None, spec=None, python=None, workdir=None, port=None, master_addr=None,
                    env=None, parallel=None, nproc_per_node=None, max_restarts=None, replace=False, rollback=True,
                    dry_run=False, wait=False, follow=False, preflight=True, verbose=False, secret=None):
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
    launch_then(c, "torchrun", job_spec, replace, rollback, dry_run, wait, follow, preflight, verbose)
