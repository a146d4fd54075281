"""Slurm as a second backend: the same job, env contract and per-rank files through sbatch, srun and scancel.

On a Slurm cluster the nodes are Slurm's to choose and ssh to them is often not allowed, so the
plan cannot name hosts: it names how many nodes and tasks, and a batch script maps Slurm's own
numbering (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, the job's node list) onto the torchrun
environment contract that `launch-gpus` sets over ssh. Every task writes the same files as an ssh
session (log, placeholder-then-final exit record, error file, a manifest per node) into a directory
every node shares, so status, wait, logs and errors read them with the ssh backend's own survey
parser, and Slurm's job state says what the files cannot (pending and why, cancelled, timeout,
node failure). Secrets live in a 0600 file the batch script sources, never in sbatch or srun argv.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import records, survey
from .errors import LaunchError, UsageError
from .plan import DEFAULT_ENV, TAG_VAR, check_user_env, program, torchrun_argv
from .scripts import RUN_VAR, SESSION_VAR, masked, recorded_run, sh
from .spec import JobSpec, check_job_name, default_job_name, default_python, default_workdir
from .survey import SessionState

BACKEND = "slurm"
DEFAULT_LOGDIR = Path(".fablaunch") / "slurm"  # under the submit directory, which the nodes share
COMMAND_DEADLINE = 30.0  # seconds any one Slurm client command may take (a slurmctld that hangs)
PORT_BASE, PORT_SPAN = 20000, 20000  # MASTER_PORT from the job id when no --port: two jobs on a node differ
_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|\d+-\d+|UNLIMITED|INFINITE")
_NODES = re.compile(r"[A-Za-z0-9_.,\[\]-]+")
_PARTITION = re.compile(r"[A-Za-z0-9_.-]+")

# Slurm job states (squeue %T / scontrol JobState) and what status calls a rank that has no exit record then.
ENDED_STATES = {"COMPLETED": "succeeded", "FAILED": "failed", "CANCELLED": "cancelled", "TIMEOUT": "timeout",
                "NODE_FAIL": "node fail", "PREEMPTED": "cancelled", "OUT_OF_MEMORY": "failed",
                "BOOT_FAIL": "node fail", "DEADLINE": "timeout", "SPECIAL_EXIT": "failed"}
WAITING_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED"}


class SlurmError(Exception):
    """A Slurm command failed or is missing: what was run and what it said."""

    def __init__(self, command: list[str], message: str) -> None:
        super().__init__(f"{command[0]}: {message}")
        self.command = command
        self.message = message


@dataclass(frozen=True)
class SlurmPlan:
    """A job as Slurm will run it: counts instead of hosts, and the files every task writes."""

    job: str
    mode: str  # gpus (one task per GPU) or torchrun (one torchrun per node)
    nodes: int
    tasks_per_node: int
    command: tuple[str, ...]
    python: str
    workdir: str
    port: int | None  # None: derived from the job id at run time
    env: tuple[tuple[str, str], ...]
    secrets: frozenset[str]
    logdir: str  # absolute; the job's files are in logdir/job
    options: tuple[tuple[str, str], ...]  # sbatch options fablaunch writes (partition, time, ...)
    sbatch_args: tuple[str, ...] = ()
    nproc_per_node: str = ""
    gpus_per_node: int | None = None  # asked of Slurm as GRES where the partition has GPUs
    max_restarts: int | None = None
    torchrun_args: tuple[str, ...] = ()

    @property
    def dir(self) -> str:
        return f"{self.logdir}/{self.job}"

    def sessions_on(self, node: int) -> list[tuple[str, int | None]]:
        """The (stem, rank) of each session the node runs: per-GPU ranks in block order, or its torchrun."""
        if self.mode == "torchrun":
            return [(f"node-{node}", None)]
        first = node * self.tasks_per_node
        return [(f"rank-{r}", r) for r in range(first, first + self.tasks_per_node)]


def plan(spec: JobSpec, mode: str) -> SlurmPlan:
    """Check the Slurm options and plan the job; bad input is a UsageError naming the flag."""
    opts = dict(spec.slurm)
    nodes = _count(opts.get("nodes"), "--nodes")
    nodelist = opts.get("nodelist")
    if nodelist is not None and os.path.isfile(nodelist):  # a hosts file: those nodes
        from .hostfile import read_hosts

        nodelist = ",".join(dict.fromkeys(h.name for h in read_hosts(Path(nodelist))))
    if nodes is None:
        nodes = len(_expand(nodelist)) if nodelist else 1
    gpus = _count(opts.get("gpus_per_node"), "--gpus-per-node")
    per_node = gpus or 1
    name = check_job_name(spec.name, "--job") if spec.name else default_job_name(spec.command)
    check_user_env(spec.env)
    options: list[tuple[str, str]] = []
    for key, flag, pattern in (("partition", "--partition", _PARTITION), ("time", "--time", _TIME),
                               ("account", "--account", _PARTITION), ("exclude", "--exclude", _NODES)):
        value = opts.get(key)
        if value is None:
            continue
        if not pattern.fullmatch(str(value)):
            raise UsageError(flag, f"{value!r} is not a valid Slurm {key}")
        options.append((key, str(value)))
    if nodelist is not None:
        if not _NODES.fullmatch(nodelist):
            raise UsageError("--nodelist", f"{nodelist!r} is not a Slurm node list (node1,node[2-3]) or hosts file")
        options.append(("nodelist", nodelist))
    sbatch_args = tuple(str(a) for a in opts.get("sbatch_args") or ())
    for arg in sbatch_args:
        if not arg.startswith("-") or "\n" in arg or "\0" in arg:
            raise UsageError("--sbatch-arg", f"{arg!r} is not an sbatch option (`--sbatch-arg=--qos=high`)")
    logdir = os.path.abspath(os.path.expanduser(opts.get("logdir") or str(DEFAULT_LOGDIR)))
    if mode == "torchrun":
        nproc = spec.nproc_per_node or (str(gpus) if gpus else "gpu")
        per_node = 1
    else:
        nproc = ""
    return SlurmPlan(name, mode, nodes, per_node, tuple(spec.command), spec.python or default_python(),
                     spec.workdir or default_workdir(), spec.port if spec.port_given else None,
                     tuple(spec.env.items()), frozenset(spec.secrets), logdir, tuple(options), sbatch_args,
                     nproc, gpus, spec.max_restarts, tuple(spec.torchrun_args))


def _count(value: Any, flag: str) -> int | None:
    if value is None:
        return None
    text = str(value)
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 100_000:
        raise UsageError(flag, f"must be a whole number from 1 up, not {text!r}")
    return int(text)


def _expand(nodelist: str) -> list[str]:
    """A node list's names (`node[1-3],gpu7`), for counting; Slurm itself expands it at run time."""
    names = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", nodelist):
        m = re.fullmatch(r"(.*)\[([^\]]*)\]", part)
        if not m:
            names.append(part)
            continue
        for item in m.group(2).split(","):
            lo, _, hi = item.partition("-")
            if lo.isdigit() and (not hi or hi.isdigit()):
                names += [f"{m.group(1)}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return names


# --- the scripts ----------------------------------------------------------------------------------------------


def batch_script(p: SlurmPlan, launched: str, gres: bool = False) -> str:
    """The batch script sbatch runs on the first node: find the master, write manifests, start the tasks."""
    directives = [f"--job-name={p.job}", f"--nodes={p.nodes}", f"--ntasks-per-node={p.tasks_per_node}",
                  f"--output={p.dir}/slurm-%j.out", "--open-mode=append", f"--chdir={p.workdir}"]
    directives += [f"--{key}={value}" for key, value in p.options]
    if gres and p.gpus_per_node:
        directives.append(f"--gres=gpu:{p.gpus_per_node}")
    sessions = " ".join(f"{stem}:{'null' if rank is None else rank}" for stem, rank in p.sessions_on(0))
    port = str(p.port) if p.port is not None else f"$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))"
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH {sh(d)}" for d in directives),
        f"# fablaunch job {p.job} ({p.mode}), written {launched}. fab status/logs/wait/stop read the files",
        "# beside this script; the variables are in env.sh (mode 0600), never on a command line.",
        f"dir={sh(p.dir)}",
        'set -a; . "$dir/env.sh" || exit 1; set +a',
        'mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        "# The first node's address as Slurm knows it: a NodeName need not resolve.",
        'addr=$(scontrol show node "${nodes[0]}" | grep -o "NodeAddr=[^ ]*" | head -n 1)',
        'export MASTER_ADDR=${addr#NodeAddr=}; [ -n "$MASTER_ADDR" ] || MASTER_ADDR=${nodes[0]}',
        f"export MASTER_PORT={port}",
        f'export {RUN_VAR}="$SLURM_JOB_ID"',
        f"launched={sh(launched)}",
        "# One manifest per node, as over ssh: which sessions that node runs, for status from anywhere.",
        'for i in "${!nodes[@]}"; do',
        '  n=${nodes[$i]}; mkdir -p "$dir/$n" || exit 1',
        "  entries=",
        f"  for s in {sessions}; do",
        "    stem=${s%%:*}; rank=${s#*:}",
        *_shift_session(p),
        '    entries+="${entries:+, }{\\"session\\": \\"$FABLAUNCH_JOB-$stem\\", \\"host\\": \\"$n\\", '
        '\\"rank\\": $rank, \\"node\\": $i}"',
        "  done",
        '  printf \'{"job": "%s", "run": "%s", "mode": "%s", "launched": "%s", "slurm_job": "%s", '
        '"sessions": [%s]}\\n\' "$FABLAUNCH_JOB" "$SLURM_JOB_ID" '
        f'{sh(p.mode)} "$launched" "$SLURM_JOB_ID" "$entries" > "$dir/$n/manifest.json"',
        "done",
        "# Each task maps Slurm's numbering onto the torchrun contract (task.sh). Block distribution:",
        "# node K runs ranks K*T .. K*T+T-1, as a gpus file lists a host once per GPU in rank order.",
        f"exec srun --kill-on-bad-exit=0 --distribution=block --ntasks-per-node={p.tasks_per_node} "
        'bash "$dir/task.sh"',
        "",
    ])


def _shift_session(p: SlurmPlan) -> list[str]:
    """Node i's sessions from node 0's template: rank + i*T, node-0 -> node-i."""
    if p.mode == "torchrun":
        return ['    stem=node-$i']
    return [f"    rank=$(( rank + i * {p.tasks_per_node} )); stem=rank-$rank"]


def env_file(p: SlurmPlan, mask: bool = False) -> str:
    """The job's variables (the user's and fablaunch's own), sourced by the batch script: mode 0600."""
    env = {**DEFAULT_ENV, **dict(p.env), "FABLAUNCH_JOB": p.job}
    return "".join(f"{k}={masked(k, v, p.secrets) if mask else sh(v)}\n" for k, v in env.items())


def task_script(p: SlurmPlan) -> str:
    """What each Slurm task runs: the torchrun contract from SLURM_*, the command, its log and exit record."""
    if p.mode == "torchrun":
        stem = "node-$SLURM_NODEID"
        contract = ['export TORCHELASTIC_ERROR_FILE="$d/$stem.error.json"']
        ours = torchrun_argv(p.python, f"{p.job}-$SLURM_JOB_ID", "$MASTER_ADDR:$MASTER_PORT", "$SLURM_NNODES",
                             p.nproc_per_node, "$d/$stem.torchrun", p.max_restarts, p.torchrun_args, p.command)
        command = " ".join([*(_word(a) for a in ours), *(sh(a) for a in p.command)])
    else:
        stem = "rank-$SLURM_PROCID"
        contract = [
            "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS",
            f"export LOCAL_WORLD_SIZE={p.tasks_per_node} GROUP_RANK=$SLURM_NODEID NODE_RANK=$SLURM_NODEID",
            "export GROUP_WORLD_SIZE=$SLURM_NNODES ROLE_RANK=$SLURM_PROCID ROLE_WORLD_SIZE=$SLURM_NTASKS",
            'export TORCHELASTIC_ERROR_FILE="$d/$stem.error.json"',
        ]
        command = " ".join(sh(a) for a in program(p.command, p.python))
    return "\n".join([
        "#!/bin/bash",
        f"# One task of fablaunch job {p.job} under Slurm: the torchrun environment from Slurm's numbering.",
        f"dir={sh(p.dir)}; node=${{SLURMD_NODENAME:-$(hostname -s)}}; d=$dir/$node; stem={stem}",
        'mkdir -p "$d"',
        *contract,
        'export FABLAUNCH_HOST="$node"',
        f'export {TAG_VAR}="$FABLAUNCH_JOB@$node" {SESSION_VAR}="$FABLAUNCH_JOB-$stem@$node"',
        'log="$d/$stem.log"; exit_file="$d/$stem.exit"',
        *recorded_run(command, p.workdir, '"$node"'),
        "",
    ])


def _word(arg: str) -> str:
    """One of fablaunch's own torchrun arguments, whose $VARIABLES (safe names, no quotes) bash expands."""
    return f'"{arg}"' if "$" in arg else sh(arg)


# --- Slurm's commands -----------------------------------------------------------------------------------------


def run(command: list[str], stdin: str | None = None, deadline: float = COMMAND_DEADLINE) -> str:
    """Run one Slurm client command with a deadline; its stdout, or SlurmError with what it said."""
    if shutil.which(command[0]) is None:
        raise SlurmError(command, "not found: is this a Slurm login node (PATH, SLURM_CONF)?")
    try:
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=deadline,
                              errors="replace")
    except subprocess.TimeoutExpired:
        raise SlurmError(command, f"no answer within {deadline:g}s (is slurmctld up?)") from None
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()
        raise SlurmError(command, "; ".join(said[-3:]))
    return done.stdout


def _has_gpus(p: SlurmPlan) -> bool:
    """Whether the partition's nodes have GPUs as GRES: then the job asks for them, else for none."""
    partition = dict(p.options).get("partition")
    try:
        out = run(["sinfo", "-h", "-o", "%G", *(["-p", partition] if partition else [])])
    except SlurmError:
        return False
    return "gpu" in out


def submit(p: SlurmPlan, *, dry: bool = False) -> dict[str, Any]:
    """Write the job's files and submit it (or, inside an allocation, run its step there); its launch record.

    Bad Slurm options are refused by `sbatch --test-only` before anything is submitted (UsageError).
    """
    launched = datetime.now().astimezone().isoformat(timespec="seconds")
    gres = _has_gpus(p)
    script = batch_script(p, launched, gres)
    if dry:
        return {"script": script, "task": task_script(p), "env": env_file(p, mask=True)}
    try:  # Slurm checks the options (partition, nodes, time, account) before anything is written or submitted
        run(["sbatch", "--test-only", *p.sbatch_args], stdin=script)
    except SlurmError as exc:
        raise UsageError("--slurm", f"Slurm refuses the job: {exc.message}") from None
    d = Path(p.dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        for name, text, mode in (("env.sh", env_file(p), 0o600), ("job.sbatch", script, 0o600),
                                 ("task.sh", task_script(p), 0o644)):
            path = d / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(path, mode)
    except OSError as exc:
        raise LaunchError(f"cannot write the job's files in {d}: {exc.strerror or exc}; nothing was submitted") \
            from None
    argv = ["sbatch", "--parsable", *p.sbatch_args, str(d / "job.sbatch")]
    try:
        out = run(argv)
    except SlurmError as exc:
        raise LaunchError(f"sbatch failed: {exc.message}") from None
    job_id = out.strip().split(";")[0]
    rec = {"job": p.job, "backend": BACKEND, "run": job_id, "slurm_job": job_id, "mode": p.mode,
           "launched": launched, "hosts": [], "logdir": p.logdir, "nodes": p.nodes,
           "tasks_per_node": p.tasks_per_node, "command": list(p.command), "workdir": p.workdir,
           "script": str(d / "job.sbatch")}
    records.save(rec)
    return rec


# --- reading a job's state ------------------------------------------------------------------------------------


@dataclass
class JobInfo:
    """Slurm's view of one job (scontrol show job), or `gone` once it aged out of slurmctld's memory."""

    job_id: str
    state: str = ""  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, ...
    reason: str = ""

    @property
    def gone(self) -> bool:
        return not self.state

    @property
    def waiting(self) -> bool:
        return self.state in WAITING_STATES

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES or self.gone


def job_info(job_id: str) -> JobInfo:
    """Slurm's state of a job; an unknown id (aged out) is `gone`, other failures raise SlurmError."""
    try:
        out = run(["scontrol", "show", "job", "-o", job_id])
    except SlurmError as exc:
        if "Invalid job id" in exc.message:
            return JobInfo(job_id)
        raise
    fields: dict[str, str] = {m.group(1): m.group(2) for m in re.finditer(r"(\w+)=(\S*)", out.strip())}
    return JobInfo(job_id, fields.get("JobState", ""), fields.get("Reason", ""))


def survey_job(rec: dict[str, Any]) -> list[SessionState]:
    """Every session of a Slurm job: its files read from the shared directory, merged with Slurm's state."""
    from .hostfile import parse_host

    info = job_info(str(rec["slurm_job"]))
    here = parse_host("localhost", "slurm")
    try:
        out = subprocess.run(["bash", "-s"], input=survey.payload(here, rec["job"], rec["logdir"]),
                             capture_output=True, text=True, errors="replace", timeout=COMMAND_DEADLINE).stdout
    except subprocess.TimeoutExpired:
        out = ""
    states = [s for s in survey.parse(here, out) if s.job == rec["job"]]
    launched = str(rec.get("launched", ""))
    for s in states:
        s.launched, s.backend, s.slurm_job = launched, BACKEND, str(rec["slurm_job"])
        if s.state == "lost":  # no final exit record: Slurm says whether it runs or how it was ended
            if info.state == "RUNNING" or info.state in ("COMPLETING", "SUSPENDED", "STOPPED"):
                s.state = "running"
            elif info.ended:
                s.state = ENDED_STATES.get(info.state, "lost")
                if s.state == "succeeded":
                    s.state = "lost"
    if not states:  # nothing started yet: one line for the whole job, with Slurm's reason
        state = "pending" if info.waiting else "running" if info.state == "RUNNING" else \
            ENDED_STATES.get(info.state, "lost")
        states = [SessionState(rec["job"], rec.get("mode", "gpus"), "(slurm)", f"{rec['job']} (slurm job "
                               f"{rec['slurm_job']})", None, None, state, launched=launched,
                               last_line=f"{info.state} ({info.reason})" if info.reason not in ("", "None")
                               else info.state, backend=BACKEND, slurm_job=str(rec["slurm_job"]))]
    return states


def slurm_records() -> list[dict[str, Any]]:
    """This project's launch records of Slurm jobs."""
    return [r for r in records.load_all() if r.get("backend") == BACKEND]


# --- stopping -------------------------------------------------------------------------------------------------


def stop(rec: dict[str, Any], grace: float, on_progress: Callable[[str, str], Any] | None = None) -> dict[str, Any]:
    """SIGINT to every task, `grace` seconds, then SIGTERM, then Slurm's own cancel (SIGKILL after KillWait).

    Returns what was done: how each session ended (from its exit record) and whether Slurm still
    has the job. Nothing but this job id is ever named to scancel.
    """
    job_id = str(rec["slurm_job"])
    info = job_info(job_id)
    if info.ended:
        return {"result": "nothing to stop", "state": info.state or "gone", "phases": []}
    phases: list[tuple[str, float]] = []  # each signal phase and when it began (for how each rank ended)

    def tell(text: str) -> None:
        if on_progress:
            on_progress(f"slurm job {job_id}", text)

    if info.waiting:
        run(["scancel", job_id])
        tell("pending: cancelled")
        phases.append(("cancel", time.time()))
    else:
        for sig, wait_s in (("INT", grace), ("TERM", 3.0)):
            phases.append((sig, time.time()))
            run(["scancel", f"--signal={sig}", job_id])
            tell(f"SIG{sig} to every task")
            if _wait_end(job_id, wait_s):
                break
        else:
            phases.append(("KILL", time.time()))
            if not job_info(job_id).ended:
                _sweep(rec)
                tell("SIGKILL to every process of the job on its nodes")
            run(["scancel", job_id])
            tell("scancel (SIGKILL after the cluster's KillWait)")
    gone = _wait_end(job_id, 60.0)
    info = job_info(job_id)
    return {"result": "stopped" if gone else f"slurm job {job_id} still {info.state}", "state": info.state or "gone",
            "phases": phases}


def _sweep(rec: dict[str, Any]) -> None:
    """SIGKILL every process carrying the job's marker on each of its nodes, through a step of the job itself.

    Slurm tracks a task's processes by their parents: a child that called setsid and outlived its
    rank is reparented to init and out of Slurm's reach, yet holds the rank's output open. The marker
    every process of the job inherits finds it, as `fab stop` does over ssh; nothing else is touched.
    """
    marker = f"{TAG_VAR}={rec['job']}@[A-Za-z0-9_.-]+"
    sweep = (f"for p in $(grep -lszx -E -- {sh(marker)} /proc/[0-9]*/environ 2>/dev/null "
             "| sed -n 's#^/proc/\\([0-9]*\\)/environ$#\\1#p'); do "
             '[ "$p" = "$$" ] || kill -KILL "$p" 2>/dev/null; done; true')
    nodes = str(rec.get("nodes") or 1)
    # The job may have ended meanwhile, or the cluster forbid steps from outside: scancel follows either way.
    with contextlib.suppress(SlurmError):
        run(["srun", f"--jobid={rec['slurm_job']}", "--overlap", f"--nodes={nodes}", "--ntasks-per-node=1",
             "bash", "-c", sweep], deadline=COMMAND_DEADLINE)


def _wait_end(job_id: str, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while True:
        if job_info(job_id).ended:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.5)


# --- doctor ---------------------------------------------------------------------------------------------------


def doctor(p: SlurmPlan) -> list[tuple[str, str, str]]:
    """What would make a Slurm launch of `p` fail or wait: (check, ok / warn / fail, detail) in order.

    Slurm reachable; the partition exists and is up; enough nodes idle now (else the job pends); then
    one short step on as many nodes as the job asks: the interpreter and torch there, and the shared
    directory writable from each of them.
    """
    checks: list[tuple[str, str, str]] = []
    try:
        checks.append(("slurm", "ok", run(["sinfo", "-V"]).strip()))
        partition = dict(p.options).get("partition")
        rows = [line.split("|") for line in run(["sinfo", "-h", "-o", "%P|%a|%D|%t"]).splitlines() if line]
    except SlurmError as exc:
        return [*checks, ("slurm", "fail", str(exc))]
    names = {r[0].rstrip("*"): r for r in rows if len(r) == 4}
    name = partition or next((r[0].rstrip("*") for r in rows if r[0].endswith("*")), "")
    if name not in names:
        return [*checks, ("partition", "fail", f"no partition {name or '(no default)'}; there are "
                                               f"{', '.join(sorted(names)) or 'none'}")]
    up = all(r[1] == "up" for r in rows if r[0].rstrip("*") == name)
    checks.append(("partition", "ok" if up else "fail", f"{name} is {'up' if up else 'not up'}"))
    idle = sum(int(r[2]) for r in rows if r[0].rstrip("*") == name and r[3] in ("idle", "mix") and r[2].isdigit())
    checks.append(("nodes", "ok" if idle >= p.nodes else "warn",
                   f"{idle} idle or mixed, {p.nodes} wanted" + ("" if idle >= p.nodes else ": the job would pend")))
    probe = (f"d={sh(p.logdir)}; mkdir -p \"$d\" && touch \"$d/.doctor-$SLURMD_NODENAME\" && w=yes || w=no; "
             f"rm -f \"$d/.doctor-$SLURMD_NODENAME\"; py=$({sh(p.python)} -c 'import platform; "
             "print(platform.python_version())' 2>/dev/null || echo -); "
             f"t=$({sh(p.python)} -c 'import torch; print(torch.__version__)' 2>/dev/null || echo -); "
             'echo "$SLURMD_NODENAME|$py|$t|$w"')
    try:
        out = run(["srun", "--immediate=20", f"--nodes={p.nodes}", "--ntasks-per-node=1", "--time=1",
                   *([f"--partition={partition}"] if partition else []), "bash", "-c", probe], deadline=60)
    except SlurmError as exc:
        return [*checks, ("on the nodes", "warn", f"no step could run now: {exc.message}")]
    seen = [line.split("|") for line in out.splitlines() if line.count("|") == 3]
    for node, py, torch, writable in seen:
        bad = [what for what, broken in (("no interpreter", py == "-"), ("no torch", torch == "-"),
                                         (f"cannot write {p.logdir}", writable != "yes")) if broken]
        checks.append((f"node {node}", "fail" if bad else "ok",
                       "; ".join(bad) if bad else f"python {py}, torch {torch}, {p.logdir} writable"))
    if len({(py, torch) for _, py, torch, _ in seen}) > 1:
        checks.append(("versions", "fail", "python or torch differ between nodes"))
    return checks
