"""`fab launch-gpus` and `fab launch-torchrun`: flags, help and printing over `fablaunch.launcher`.

The launch itself (preflight, one payload per host, rollback under failure and signals) is the
engine's, shared with the Python API; these tasks turn flags into a spec and results into tables.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from invoke import Exit

from fablaunch import launcher, ui
from fablaunch.errors import JobNotFound, LaunchError, UsageError
from fablaunch.executor import REMOTE_SHELL, Executor, Outcome
from fablaunch.jobs import watch
from fablaunch.plan import Plan, host_env
from fablaunch.scripts import describe, launch_payload, manifest, masked, session_script
from fablaunch.selection import Selection, spans, world_of
from fablaunch.spec import JobSpec, build_spec, parse_env

from .cli import command_argv
from .flags import int_flag, task, usage_error, usage_errors
from .sync import before_launch as sync_before_launch

COMMON_HELP = {
    "job": "Job name (default: the spec's job, else the script's name plus a timestamp).",
    "spec": "YAML job spec holding any of these options and the command; flags override it.",
    "python": "Interpreter for a command that is a .py script (default: `python` on this PATH).",
    "workdir": "Working directory on every host (default: the directory fab is called from).",
    "port": "MASTER_PORT / rendezvous port on the first host (default 5001; on Slurm 20000 + job id % 20000).",
    "master_addr": "Address the ranks reach the first host at (default: the first host as ssh resolves it).",
    "env": "KEY=VALUE set for every rank; repeatable. Values never appear on a command line.",
    "env_file": "File of KEY=VALUE lines set for every rank (default ./.fablaunch.env if present).",
    "forward_env": "Also carry this shell's variables starting with PREFIX to every rank (besides NCCL_, CUDA_, "
                   "TORCH_, PYTHON, UCX_, FI_, WANDB_, HF_); repeatable.",
    "no_forward_env": "Carry none of this shell's variables to the ranks.",
    "secret": "Mask this variable's value in --dry-run, like names with TOKEN, KEY, PASS...; repeatable.",
    "parallel": "Hosts contacted at once (default 32).",
    "replace": "Stop a running job of the same name first instead of refusing.",
    "rollback": "On a failed or interrupted launch, stop what started on the other hosts (default on).",
    "preflight": "Check every host first: reachable, interpreter, working directory, MASTER_PORT free on the "
                 "first host, no running job of this name (default on).",
    "dry_run": "Print every session, one session's script and a manifest (secrets masked); touch no host.",
    "verbose": "With --dry-run: every host's payload and every session's script.",
    "sync": "First copy this directory to every host's workdir, as `fab sync` does (.gitignore honoured, "
            "shared directories skipped); a host that fails stops the launch before anything starts.",
    "wait": "After launching, show the job live until it ends and exit like `fab wait`.",
    "follow": "After launching, stream every rank's output like `fab logs --follow`.",
    "slurm": "Run the job on Slurm instead of over ssh: sbatch a batch script (or, inside an allocation, srun "
             "it there); the Slurm flags below and the spec's `slurm:` section shape it.",
    "nodes": "With --slurm: how many nodes to run on (default: as many as the nodelist names, else 1; inside "
             "an allocation, all of its nodes).",
    "gpus_per_node": "With --slurm: GPUs per node; launch-gpus runs one task (rank) per GPU, launch-torchrun "
                     "that many workers (asked of Slurm as GRES where the partition has GPUs).",
    "partition": "With --slurm: the Slurm partition to run in.",
    "time": "With --slurm: the job's time limit, e.g. 4:00:00 or 2-00:00:00.",
    "account": "With --slurm: the Slurm account to charge.",
    "nodelist": "With --slurm: these nodes (node[1-3],gpu7) or the nodes of a hosts file.",
    "exclude": "Leave out these hosts, or GPUs of a host: node2@node1:0,1 (DeepSpeed's syntax; a host may be a "
               "range). With --slurm: Slurm's node list to avoid, no GPU indices.",
    "include": "Use only these hosts, or GPUs of a host: node1:0,1@node3 (DeepSpeed's syntax; a host may be a "
               "range). Not with --slurm.",
    "num_nodes": "Use only the first N hosts that remain after include/exclude.",
    "num_gpus": "Use only the first N GPUs (ranks) that remain, in rank order.",
    "sbatch_arg": "With --slurm: one more sbatch option, passed verbatim (`--sbatch-arg=--qos=high`); repeatable.",
    "logdir": "With --slurm: the directory every node shares for the job's files "
              "(default .fablaunch/slurm here).",
    "json": "Print the launch as JSON: each host's result and every session (with --wait: and how it ended; "
            "with --dry-run: each session's argv and environment, secrets masked).",
}


def _slurm_flags(slurm: bool, **flags: Any) -> dict[str, Any] | None:
    """The Slurm flags given, checked to come with --slurm; the spec's `slurm:` section fills the rest."""
    given = {k: v for k, v in flags.items() if v is not None}
    if given and not slurm:
        names = ", ".join("--" + k.replace("_", "-").removesuffix("s" if k == "sbatch_args" else "") for k in given)
        raise UsageError(names, "Slurm options need --slurm (without it the job runs over ssh on the host files)")
    return given or None


def _selection(slurm: bool, include: str | None, exclude: str | None, num_nodes: Any, num_gpus: Any) -> dict[str, Any]:
    """The selection flags of an ssh launch; with --slurm, which reads no host file, only --exclude (sbatch's).

    One --exclude serves both: over ssh it is DeepSpeed's host[:gpus]@... filter, with --slurm the node
    list sbatch avoids, so GPU indices there are refused rather than passed to Slurm as node names.
    """
    if not slurm:
        return {"include": include, "exclude": exclude, "num_nodes": int_flag(num_nodes, "--num-nodes", minimum=1),
                "num_gpus": int_flag(num_gpus, "--num-gpus", minimum=1)}
    given = [f for f, v in (("--include", include), ("--num-nodes", num_nodes), ("--num-gpus", num_gpus)) if v]
    if given:
        raise UsageError(", ".join(given), "select from host files, which --slurm does not read: "
                                           "use --nodelist, --nodes and --gpus-per-node")
    if exclude is not None and ":" in exclude:
        raise UsageError("--exclude", f"{exclude!r}: GPU indices are for launches over ssh; with --slurm, "
                                      "--exclude is Slurm's list of nodes to avoid (node[1-3],gpu7)")
    return {}


def _spec(spec: str | None, env: list[str] | None, secret: list[str] | None = None, **flags: Any) -> JobSpec:
    for name in ("port", "parallel", "max_restarts"):
        flags[name] = int_flag(flags.get(name), f"--{name.replace('_', '-')}")
    flags["forward_env"] = flags.get("forward_env") or None
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


def variable_rows(spec: JobSpec, plan: Plan) -> list[dict[str, str]]:
    """The user's variables every rank gets, each with where it came from (a host's own last), secrets masked."""
    rows = [{"variable": k, "value": masked(k, v, plan.secrets, quote=False), "from": spec.env_sources.get(k, "spec"),
             "hosts": "all"} for k, v in spec.env.items()]
    for host in plan.hosts:
        for k, v in host_env(spec, host).items():
            rows.append({"variable": k, "value": masked(k, v, plan.secrets, quote=False), "from": "host_env",
                         "hosts": host.spec})
    return rows


def show_variables(spec: JobSpec, plan: Plan) -> None:
    """The dry run's table of variables and their sources: forwarded, env file, spec, --env, per host."""
    rows = variable_rows(spec, plan)
    if rows:
        ui.table("Variables (besides fablaunch's and the rank contract; later sources win)",
                 ("variable", "value", "from", "hosts"), [tuple(r.values()) for r in rows],
                 key_columns=("variable", "from"), free_columns=("value", "hosts"))


def _host_rows(plan: Plan, outcomes: dict[str, Outcome], note: dict[str, str] | None = None,
               passed: str = "started") -> list[dict[str, Any]]:
    """Each host's part of a launch: sessions, seconds and result (`passed`, or why not)."""
    rows = []
    for host in plan.hosts:
        o = outcomes.get(host.spec)
        result = "not attempted" if o is None else passed if o.ok else o.why()
        if note and host.spec in note:
            result = f"{result}; {note[host.spec]}"
        rows.append({"host": host.spec, "sessions": len(plan.on(host)),
                     "seconds": None if o is None else round(o.seconds, 2), "result": result,
                     "ok": o is not None and o.ok})
    return rows


def _results_table(title: str, plan: Plan, outcomes: dict[str, Outcome], note: dict[str, str] | None = None,
                   passed: str = "started") -> None:
    rows = _host_rows(plan, outcomes, note, passed)
    ui.table(title, ("host", "sessions", "seconds", "result"),
             [(r["host"], r["sessions"], "" if r["seconds"] is None else f"{r['seconds']:.2f}", r["result"])
              for r in rows],
             ["green" if r["ok"] else "red" for r in rows],
             key_columns=("host", "sessions", "seconds"), free_columns=("result",))


def _plan_json(plan: Plan, outcomes: dict[str, Outcome] | None = None, passed: str = "started",
               **extra: Any) -> dict[str, Any]:
    """A launch (or, without outcomes, a dry run) as `--json` prints it; secrets masked in a dry run."""
    data: dict[str, Any] = {"job": plan.job, "mode": plan.mode, **extra}
    if outcomes is not None:
        rows = _host_rows(plan, outcomes, extra.get("notes"), passed)
        data["hosts"] = [{k: v for k, v in r.items() if k != "ok"} for r in rows]
    data["sessions"] = [{"host": s.host.spec, "session": s.name, "rank": s.rank, "node": s.node,
                         "log": str(s.log),
                         **({} if outcomes is not None else {
                             "argv": [masked("", a, plan.secrets, quote=False) for a in s.argv],
                             "env": {k: masked(k, v, plan.secrets, quote=False) for k, v in s.env}})}
                        for s in plan.sessions]
    return data


def launch_slurm(c: Any, mode: str, spec: JobSpec, dry: bool, wait: bool, follow: bool, as_json: bool) -> None:
    """Submit the job to Slurm (or, `dry`, show its batch script); then wait or follow as over ssh."""
    from fablaunch import slurm

    if Selection.of(spec):
        keys = ", ".join(k for k, v in vars(Selection.of(spec)).items() if v is not None)
        raise usage_error(UsageError(f"spec keys {keys}", "select from host files, which --slurm does not read: "
                                                          "use its slurm: section (nodelist, exclude, nodes)"))
    try:
        p = slurm.plan(spec, mode, slurm.allocation())
        if dry:
            files = slurm.submit(p, dry=True)
            if as_json:
                print(json.dumps({"job": p.job, "mode": mode, "backend": "slurm", "dry_run": True, **files}, indent=2))
                return
            ui.say(f"Dry run of job {p.job} on Slurm ({mode}, {ui.plural(p.nodes, 'node')} x "
                   f"{ui.plural(p.tasks_per_node, 'task')}); nothing is written or submitted.")
            if p.allocation:
                ui.show_text(f"{p.dir}/step.sh (mode 0600; run here, detached: a step of allocation {p.allocation})",
                             files["script"])
            else:
                ui.show_text(f"{p.dir}/job.sbatch (mode 0600; sbatch --parsable "
                             f"{' '.join(p.sbatch_args) + ' ' if p.sbatch_args else ''}{p.dir}/job.sbatch)",
                             files["script"])
            ui.show_text(f"{p.dir}/task.sh (each task)", files["task"])
            ui.show_text(f"{p.dir}/env.sh (mode 0600, secrets masked)", files["env"])
            return
        with launcher.project_lock(p.job):
            rec = slurm.submit(p)
    except UsageError as exc:
        raise usage_error(exc) from None
    except LaunchError as exc:
        raise Exit(f"fablaunch: {exc}", code=exc.code) from None
    launched = {"job": p.job, "mode": mode, "backend": "slurm", "slurm_job": rec["slurm_job"], "dir": p.dir,
                "nodes": p.nodes, "tasks_per_node": p.tasks_per_node}
    if rec.get("step_name"):
        launched["step"] = rec["step_name"]
    if not as_json:
        shape = f"{ui.plural(p.nodes, 'node')} x {ui.plural(p.tasks_per_node, 'task')}"
        ui.say(f"Started job {p.job} as step {rec['step_name']} of Slurm allocation {rec['slurm_job']} ({shape}); "
               f"files in {p.dir}" if rec.get("step_name") else
               f"Submitted job {p.job} to Slurm as job {rec['slurm_job']} ({shape}); files in {p.dir}")
    _after_launch(c, p.job, [], spec.parallel, launched, wait, follow, as_json)


def launch_then(c: Any, mode: str, spec: JobSpec, replace: bool, rollback_on_failure: bool, dry: bool,
                wait: bool, follow: bool, preflight: bool = True, verbose: bool = False, as_json: bool = False,
                sync: bool = False) -> None:
    """Launch, then optionally follow the logs and/or wait for the end, as the flags ask."""
    if as_json and follow:
        raise usage_error(UsageError("--json/--follow", "--follow streams the ranks' output, which is not JSON: "
                                                        "use --wait --json for the end as JSON"))
    plan, launched = launch(c, mode, spec, replace, rollback_on_failure, dry, preflight, verbose, as_json, sync)
    if dry:
        if as_json:
            print(json.dumps(launched, indent=2))
        return
    _after_launch(c, plan.job, list(plan.hosts), spec.parallel, launched, wait, follow, as_json)


def _after_launch(c: Any, job: str, hosts: list[Any], parallel: int, launched: dict[str, Any], wait: bool,
                  follow: bool, as_json: bool) -> None:
    """Print the launch as JSON, or follow and/or wait for the end, as the flags ask."""
    if not (wait or follow):
        if as_json:
            print(json.dumps(launched, indent=2))
        return
    from .jobs import say_unreachable, show_logs, wait_for

    try:
        with Executor(c.config, parallel, deadline=20, patient=follow) as ex:
            if as_json:
                code, states = watch(ex, hosts, job)
                print(json.dumps({**launched, "exit_code": code, "sessions": [s.as_json() for s in states]},
                                 indent=2))
            else:
                if follow:  # until the job ends, then the same summary and exit code as --wait
                    say_unreachable(show_logs(ex, hosts, job, [], [], 50, True))
                code = wait_for(c, ex, hosts, job, None, False)
    except KeyboardInterrupt:
        raise Exit(f"fablaunch: interrupted; job {job} keeps running (fab stop --job {job})", code=130) from None
    except JobNotFound as exc:
        raise Exit(f"fablaunch: {exc}", code=1) from None
    if code:
        raise Exit(code=code)


def launch(c: Any, mode: str, spec: JobSpec, replace: bool, rollback_on_failure: bool, dry: bool,
           preflight: bool = True, verbose: bool = False, as_json: bool = False,
           sync: bool = False) -> tuple[Plan, dict[str, Any]]:
    """Plan and launch (or, `dry`, only show) a job; print each host's result; raise Exit unless all started.

    Returns the plan and what `--json` prints for it (`as_json`: nothing else goes to stdout, and a
    failed launch prints its per-host results as JSON before its exit code).
    """
    plan, hostfile = _make_plan(c, mode, spec)
    selected = _selected(plan, spec, as_json)
    if dry:
        if not as_json:
            dry_run(plan, datetime.now().astimezone().isoformat(timespec="seconds"), verbose)
            show_variables(spec, plan)
            if sync:
                ui.say("--sync: a launch would first copy this directory to the hosts; `fab sync --dry-run` "
                       "shows what would be copied.")
        return plan, _plan_json(plan, dry_run=True, master_addr=plan.master_addr, master_port=plan.port,
                                variables=variable_rows(spec, plan), **selected)
    if sync:
        selected["sync"] = sync_before_launch(c, plan, spec.parallel, as_json)
    try:
        done = launcher.launch(c.config, plan, spec, hostfile, replace=replace,
                               rollback_on_failure=rollback_on_failure, preflight=preflight)
    except LaunchError as exc:
        if as_json:
            print(json.dumps(_plan_json(plan, exc.outcomes, exc.passed, error=str(exc), notes=exc.notes), indent=2))
        elif exc.outcomes:
            _results_table(exc.title, plan, exc.outcomes, exc.notes, exc.passed)
        raise Exit(f"fablaunch: {exc}", code=exc.code) from None
    if not as_json:
        _results_table(f"Launched {plan.job}: {ui.plural(len(plan.sessions), 'session')} on "
                       f"{ui.plural(len(plan.hosts), 'host')}", plan, done.outcomes)
        ui.say(f"Logs: {plan.sessions[0].dir.rsplit('/', 1)[0]}/<host>/ on each host; record: {done.record}")
    return plan, _plan_json(plan, done.outcomes, run=done.run, record=str(done.record), **selected)


def _selected(plan: Plan, spec: JobSpec, as_json: bool) -> dict[str, Any]:
    """Show the world a selection leaves before anything starts; returns it for --json (nothing without one).

    Which hosts remain, in which order, decides every rank and MASTER_ADDR, so a launch that
    selects says what it will start instead of leaving it to be read off the sessions.
    """
    selection = Selection.of(spec)
    if not selection:
        return {}
    world = world_of(plan)
    if not as_json:
        size = "decided by torchrun" if world["world_size"] is None else world["world_size"]
        per_host = "ranks" if plan.mode == "gpus" else "workers"
        ui.table(f"World after {selection.flags()}: WORLD_SIZE {size} on {ui.plural(len(plan.hosts), 'host')}, "
                 f"MASTER_ADDR {world['master_addr']}", ("host", "node", per_host, "gpus"),
                 [(h["host"], h["node"], spans(h["ranks"]) if plan.mode == "gpus" else h["workers"], h["gpus"])
                  for h in world["hosts"]], key_columns=("host", "node"), free_columns=(per_host, "gpus"))
    return {"selection": {k: v for k, v in vars(selection).items() if v is not None}, "world": world}


@task(
    help={**COMMON_HELP, "gpus": "File listing one host per GPU, in rank order (default ./gpus), or hosts "
                                 "inline: 'node[1-2] slots=2' (see README)."},
    iterable=["env", "secret", "sbatch_arg", "forward_env"],
)
@usage_errors
def launch_gpus(c, gpus=None, job=None, spec=None, python=None, workdir=None, port=None, master_addr=None,
                env=None, parallel=None, replace=False, rollback=True, dry_run=False, wait=False, follow=False,
                preflight=True, verbose=False, secret=None, json_=False, slurm=False, nodes=None, gpus_per_node=None,
                partition=None, time=None, account=None, nodelist=None, exclude=None, sbatch_arg=None, logdir=None,
                env_file=None, forward_env=None, no_forward_env=False, include=None, num_nodes=None, num_gpus=None,
                sync=False):
    """Start one tmux session per line of the gpus file, each a rank with the torchrun environment.

    Usage: fab launch-gpus [flags] -- train.py --your --args. Every rank gets RANK, LOCAL_RANK,
    WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK/NODE_RANK, MASTER_ADDR/PORT, OMP_NUM_THREADS=1 and its
    own TORCHELASTIC_ERROR_FILE; logs and exit codes are kept per rank on each host.
    """
    try:
        job_spec = _spec(spec, env, secret, gpus=gpus, name=job, python=python, workdir=workdir, port=port,
                         master_addr=master_addr, parallel=parallel,
                         slurm=_slurm_flags(slurm, nodes=nodes, gpus_per_node=gpus_per_node, partition=partition,
                                            time=time, account=account, nodelist=nodelist,
                                            exclude=exclude if slurm else None,
                                            sbatch_args=sbatch_arg or None, logdir=logdir),
                         env_file=env_file, forward_env=forward_env, no_forward_env=no_forward_env,
                         **_selection(slurm, include, exclude, num_nodes, num_gpus))
    except UsageError as exc:
        raise usage_error(exc) from None
    if slurm and sync:
        raise UsageError("--sync", "a Slurm job runs in a directory every node shares: there is nothing to copy")
    if slurm:
        return launch_slurm(c, "gpus", job_spec, dry_run, wait, follow, json_)
    launch_then(c, "gpus", job_spec, replace, rollback, dry_run, wait, follow, preflight, verbose, json_, sync)


@task(
    help={
        **COMMON_HELP,
        "hosts": "File listing one node per line, optionally with ` slots=N` (default ./hosts), or nodes "
                 "inline: 'node[1-4] slots=8' (see README).",
        "nproc_per_node": "Workers per node for torchrun (default: the host's slots, else `gpu`).",
        "max_restarts": "torchrun --max-restarts: restarts of the whole worker group on failure.",
    },
    iterable=["env", "secret", "sbatch_arg", "forward_env"],
)
@usage_errors
def launch_torchrun(c, hosts=None, job=None, spec=None, python=None, workdir=None, port=None, master_addr=None,
                    env=None, parallel=None, nproc_per_node=None, max_restarts=None, replace=False, rollback=True,
                    dry_run=False, wait=False, follow=False, preflight=True, verbose=False, secret=None,
                    json_=False, slurm=False, nodes=None, gpus_per_node=None, partition=None, time=None, account=None,
                nodelist=None, exclude=None, sbatch_arg=None, logdir=None, env_file=None, forward_env=None,
                no_forward_env=False, include=None, num_nodes=None, num_gpus=None, sync=False):
    """Start torchrun on every node of the hosts file (one tmux session each), meeting at c10d rendezvous.

    Usage: fab launch-torchrun [flags] -- train.py --your --args. The first host serves the
    rendezvous; each node runs --nproc-per-node workers with logs under its own job directory.
    """
    try:
        job_spec = _spec(spec, env, secret, hosts=hosts, name=job, python=python, workdir=workdir, port=port,
                         master_addr=master_addr, parallel=parallel,
                         nproc_per_node=nproc_per_node, max_restarts=max_restarts,
                         slurm=_slurm_flags(slurm, nodes=nodes, gpus_per_node=gpus_per_node, partition=partition,
                                            time=time, account=account, nodelist=nodelist,
                                            exclude=exclude if slurm else None,
                                            sbatch_args=sbatch_arg or None, logdir=logdir),
                         env_file=env_file, forward_env=forward_env, no_forward_env=no_forward_env,
                         **_selection(slurm, include, exclude, num_nodes, num_gpus))
    except UsageError as exc:
        raise usage_error(exc) from None
    if slurm and sync:
        raise UsageError("--sync", "a Slurm job runs in a directory every node shares: there is nothing to copy")
    if slurm:
        return launch_slurm(c, "torchrun", job_spec, dry_run, wait, follow, json_)
    launch_then(c, "torchrun", job_spec, replace, rollback, dry_run, wait, follow, preflight, verbose, json_,
                sync)
