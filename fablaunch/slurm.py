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
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import records, survey
from .errors import LaunchError, UsageError
from .executor import Outcome
from .hostfile import Host, parse_host
from .plan import DEFAULT_ENV, TAG_VAR, check_user_env, program, torchrun_argv
from .scripts import RUN_VAR, SESSION_VAR, VERSION_PROBE, masked, port_in_use, recorded_run, sh
from .spec import JobSpec, check_job_name, default_job_name, default_python, default_workdir
from .survey import SessionState, as_int

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
    allocation: str | None = None  # inside `salloc` (SLURM_JOB_ID): the job runs as a step of it

    @property
    def dir(self) -> str:
        return f"{self.logdir}/{self.job}"

    def sessions_on(self, node: int) -> list[tuple[str, int | None]]:
        """The (stem, rank) of each session the node runs: per-GPU ranks in block order, or its torchrun."""
        if self.mode == "torchrun":
            return [(f"node-{node}", None)]
        first = node * self.tasks_per_node
        return [(f"rank-{r}", r) for r in range(first, first + self.tasks_per_node)]


def allocation() -> str | None:
    """The Slurm job this process runs inside (`salloc`, or a batch script), from SLURM_JOB_ID."""
    job_id = os.environ.get("SLURM_JOB_ID", "").strip()
    return job_id if job_id.isdigit() else None


def plan(spec: JobSpec, mode: str, inside: str | None = None) -> SlurmPlan:
    """Check the Slurm options and plan the job; bad input is a UsageError naming the flag.

    `inside` (an allocation's job id) plans a step of that allocation: its nodes, no sbatch options.
    """
    opts = dict(spec.slurm)
    if inside is not None:
        for key, flag in (("partition", "--partition"), ("time", "--time"), ("account", "--account"),
                          ("exclude", "--exclude"), ("sbatch_args", "--sbatch-arg")):
            if opts.get(key):
                raise UsageError(flag, f"inside Slurm allocation {inside} (SLURM_JOB_ID) the job runs as a step of "
                                       "it, where sbatch options do not apply; unset SLURM_JOB_ID to submit a new job")
    nodes = _count(opts.get("nodes"), "--nodes")
    nodelist = opts.get("nodelist")
    if nodelist is not None and os.path.isfile(nodelist):  # a hosts file: those nodes
        from .hostfile import read_hosts

        nodelist = ",".join(dict.fromkeys(h.name for h in read_hosts(Path(nodelist))))
    if nodes is None:
        nodes = len(_expand(nodelist)) if nodelist else _allocated_nodes(inside) if inside else 1
    gpus = _count(opts.get("gpus_per_node"), "--gpus-per-node")
    per_node = gpus or 1
    name = check_job_name(spec.name, "--job") if spec.name else default_job_name(spec.command)
    check_user_env(spec.env)
    if spec.host_env:
        raise UsageError("host_env", "per-host variables are for launches over ssh: on Slurm the nodes are Slurm's "
                                     "to choose (set job-wide variables with env: or --env)")
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
                     nproc, gpus, spec.max_restarts, tuple(spec.torchrun_args), inside)


def _allocated_nodes(job_id: str) -> int:
    """How many nodes an allocation has: salloc's SLURM_JOB_NUM_NODES, else Slurm's word."""
    text = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or ""
    if text.isdigit():
        return int(text)
    try:
        return max(1, len(_expand(job_info(job_id).nodelist)))
    except SlurmError:
        return 1


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


def batch_script(p: SlurmPlan, launched: str, gres: bool = False, run: str = "", step: str = "") -> str:
    """The batch script sbatch runs on the first node: find the master, write manifests, start the tasks.

    Inside an allocation (`p.allocation`) the same script runs here, detached, and starts the tasks
    as a step named `step` on the allocation's first nodes; `run` is then the launch's own id.
    """
    head: list[str] = []
    if p.allocation is None:
        directives = [f"--job-name={p.job}", f"--nodes={p.nodes}", f"--ntasks-per-node={p.tasks_per_node}",
                      f"--output={p.dir}/slurm-%j.out", "--open-mode=append", f"--chdir={p.workdir}"]
        directives += [f"--{key}={value}" for key, value in p.options]
        if gres and p.gpus_per_node:
            directives.append(f"--gres=gpu:{p.gpus_per_node}")
        head = [f"#SBATCH {sh(d)}" for d in directives]
        port = str(p.port) if p.port is not None else f"$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))"
        nodes = 'scontrol show hostnames "$SLURM_JOB_NODELIST"'
        run = '"$SLURM_JOB_ID"'
        srun = ["srun --kill-on-bad-exit=0 --distribution=block "
                f"--ntasks-per-node={p.tasks_per_node} bash \"$dir/task.sh\""]
    else:
        port = str(p.port) if p.port is not None else str(PORT_BASE + int(run.rsplit("-", 1)[-1], 16) % PORT_SPAN)
        chosen = dict(p.options).get("nodelist")
        # The allocation's first nodes, in Slurm's order (or the --nodelist given): the step runs there.
        nodes = (f"scontrol show hostnames {sh(chosen)}" if chosen else
                 'scontrol show hostnames "$(squeue -h -j "$SLURM_JOB_ID" -o %N)"') + f" | head -n {p.nodes}"
        run = sh(run)
        srun = ['[ "${#nodes[@]}" = ' + str(p.nodes) + ' ] || { echo "fablaunch: allocation $SLURM_JOB_ID has '
                f'${{#nodes[@]}} of the {p.nodes} nodes wanted" >&2; exit 1; }}',
                # srun takes SLURM_NTASKS and friends from salloc's environment as options: ours are explicit.
                f"srun --jobid=\"$SLURM_JOB_ID\" --job-name={sh(step)} --nodes={p.nodes} "
                f"--ntasks={p.nodes * p.tasks_per_node} --ntasks-per-node={p.tasks_per_node} "
                '--nodelist="$(IFS=,; echo "${nodes[*]}")" --kill-on-bad-exit=0 --distribution=block '
                f"--chdir={sh(p.workdir)} bash \"$dir/task.sh\""]
    sessions = " ".join(f"{stem}:{'null' if rank is None else rank}" for stem, rank in p.sessions_on(0))
    return "\n".join([
        "#!/bin/bash",
        *head,
        f"# fablaunch job {p.job} ({p.mode}), written {launched}. fab status/logs/wait/stop read the files",
        "# beside this script; the variables are in env.sh (mode 0600), never on a command line.",
        f"dir={sh(p.dir)}",
        'set -a; . "$dir/env.sh" || exit 1; set +a',
        f"mapfile -t nodes < <({nodes})",
        "# The first node's address as Slurm knows it: a NodeName need not resolve.",
        'addr=$(scontrol show node "${nodes[0]}" | grep -o "NodeAddr=[^ ]*" | head -n 1)',
        'export MASTER_ADDR=${addr#NodeAddr=}; [ -n "$MASTER_ADDR" ] || MASTER_ADDR=${nodes[0]}',
        f"export MASTER_PORT={port}",
        *_free_port(p),
        f"export {RUN_VAR}={run}",
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
        '"sessions": [%s]}\\n\' "$FABLAUNCH_JOB" "$FABLAUNCH_RUN" '
        f'{sh(p.mode)} "$launched" "$SLURM_JOB_ID" "$entries" > "$dir/$n/manifest.json"',
        "done",
        "# Each task maps Slurm's numbering onto the torchrun contract (task.sh). Block distribution:",
        "# node K runs ranks K*T .. K*T+T-1, as a gpus file lists a host once per GPU in rank order.",
        *srun,
        "rc=$?",
        "# What a rank left behind (a child that called setsid is out of Slurm's reach) dies with the run.",
        f"timeout 60 srun --overlap --job-name=fablaunch-sweep --nodes={p.nodes} --ntasks-per-node=1 "
        '--nodelist="$(IFS=,; echo "${nodes[*]}")" '
        + " ".join(sh(a) for a in sweep_command("")[:-1]) + f' "{RUN_VAR}=${RUN_VAR}" >/dev/null 2>&1',
        'exit "$rc"',
        "",
    ])


def _free_port(p: SlurmPlan) -> list[str]:
    """A derived MASTER_PORT that something on the first node already holds moves up to a free one.

    The batch script runs on the first node, where rank 0's store binds the port; a port the user
    chose (--port) is theirs to keep. Inside an allocation the driver runs elsewhere: no test there.
    """
    if p.port is not None or p.allocation is not None:
        return []
    taken = port_in_use('"$MASTER_PORT"', "127.0.0.1", p.python)  # the bind test covers every address
    return ["# A derived port held by another program on this (the first) node: the next free one.",
            f"for _ in $(seq 50); do {taken} || break; MASTER_PORT=$(( MASTER_PORT + 1 )); done"]


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
        ours = torchrun_argv(p.python, f"{p.job}-${RUN_VAR}", "$MASTER_ADDR:$MASTER_PORT", "$SLURM_NNODES",
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
    if p.allocation is not None:
        return _start_step(p, launched, dry)
    gres = _has_gpus(p)
    script = batch_script(p, launched, gres)
    if dry:
        return {"script": script, "task": task_script(p), "env": env_file(p, mask=True)}
    try:  # Slurm checks the options (partition, nodes, time, account) before anything is written or submitted
        run(["sbatch", "--test-only", *p.sbatch_args], stdin=script)
    except SlurmError as exc:
        raise UsageError("--slurm", f"Slurm refuses the job: {exc.message}") from None
    d = _write_files(p, "job.sbatch", script)
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


def _write_files(p: SlurmPlan, script_name: str, script: str) -> Path:
    """The job's env.sh (0600), its driver script (0600) and task.sh, in the directory the nodes share."""
    d = Path(p.dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        for name, text, mode in (("env.sh", env_file(p), 0o600), (script_name, script, 0o600),
                                 ("task.sh", task_script(p), 0o644)):
            path = d / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(path, mode)
    except OSError as exc:
        raise LaunchError(f"cannot write the job's files in {d}: {exc.strerror or exc}; nothing was started") \
            from None
    return d


STEP_START = 15.0  # seconds a launch inside an allocation waits to see its step start


def _start_step(p: SlurmPlan, launched: str, dry: bool) -> dict[str, Any]:
    """Inside an allocation: run the job as a step of it, started by the driver script detached from here.

    The step gets a name of its own, so status and stop find it (and only it) among the user's other
    steps of the allocation; its launch has a run id of its own, as two launches share the job id.
    """
    assert p.allocation is not None
    token = secrets.token_hex(4)
    run_id, step = f"{p.allocation}-{token}", f"fablaunch-{p.job}-{token}"
    script = batch_script(p, launched, run=run_id, step=step)
    if dry:
        return {"script": script, "task": task_script(p), "env": env_file(p, mask=True)}
    info = job_info(p.allocation)
    if info.state != "RUNNING":
        raise UsageError("SLURM_JOB_ID", f"allocation {p.allocation} is {info.state or 'gone'}, not running: no step "
                                         "can start in it (unset SLURM_JOB_ID to submit a new job)")
    have = len(_expand(info.nodelist))
    if p.nodes > have:
        raise UsageError("--nodes", f"allocation {p.allocation} has {have} node{'s' if have != 1 else ''}, "
                                    f"not the {p.nodes} asked for")
    d = _write_files(p, "step.sh", script)
    out = d / f"slurm-{run_id}.out"
    with open(out, "ab") as log:  # the driver holds its own copy; it outlives this process
        driver = subprocess.Popen(["bash", str(d / "step.sh")], cwd=d, env={**os.environ, RUN_VAR: run_id},
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    rec = {"job": p.job, "backend": BACKEND, "run": run_id, "slurm_job": p.allocation, "step_name": step,
           "driver_pid": driver.pid, "mode": p.mode, "launched": launched, "hosts": [], "logdir": p.logdir,
           "nodes": p.nodes, "tasks_per_node": p.tasks_per_node, "command": list(p.command),
           "workdir": p.workdir, "script": str(d / "step.sh")}
    end = time.monotonic() + STEP_START
    while time.monotonic() < end and _step(rec) is None:
        if driver.poll() is not None:
            said = out.read_text(errors="replace").strip().splitlines()[-3:]
            raise LaunchError(f"the step did not start in allocation {p.allocation} (exit {driver.returncode}): "
                              + ("; ".join(said) or "no output"))
        time.sleep(0.2)
    records.save(rec)
    return rec


# --- reading a job's state ------------------------------------------------------------------------------------


@dataclass
class JobInfo:
    """Slurm's view of one job (scontrol show job), or `gone` once it aged out of slurmctld's memory."""

    job_id: str
    state: str = ""  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, ...
    reason: str = ""
    nodelist: str = ""  # node1,node[2-3]: where it runs (or ran)

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
    return JobInfo(job_id, fields.get("JobState", ""), fields.get("Reason", ""), fields.get("NodeList", ""))


def _step(rec: dict[str, Any]) -> tuple[str, str] | None:
    """A launch's step among its allocation's running steps, found by its name: (step id, node list)."""
    out = run(["squeue", "-h", "-s", "-j", str(rec["slurm_job"]), "-o", "%i|%j|%N"])
    for line in out.splitlines():
        step_id, _, rest = line.partition("|")
        name, _, nodes = rest.partition("|")
        if name == rec["step_name"]:
            return step_id, nodes
    return None


def _driver_alive(rec: dict[str, Any]) -> bool:
    """Whether the process that starts a launch's step is still there (checked by its run marker)."""
    try:
        environ = Path(f"/proc/{int(rec['driver_pid'])}/environ").read_bytes()
    except (OSError, KeyError, ValueError):
        return False
    return f"{RUN_VAR}={rec['run']}".encode() in environ.split(b"\0")


def launch_state(rec: dict[str, Any]) -> JobInfo:
    """Slurm's state of a launch: its batch job, or inside an allocation its step (its `job_id` then A.S).

    A step Slurm no longer lists has ended (COMPLETED: each rank's record says how), unless the
    whole allocation ended, whose state then says how; a step yet to start is PENDING.
    """
    if not rec.get("step_name"):
        return job_info(str(rec["slurm_job"]))
    found = _step(rec)
    if found:
        return JobInfo(found[0], "RUNNING", "", found[1])
    alloc = job_info(str(rec["slurm_job"]))
    if alloc.ended:
        return alloc
    if _driver_alive(rec):
        return JobInfo(str(rec["slurm_job"]), "PENDING", "step not started yet")
    return JobInfo(str(rec["slurm_job"]), "COMPLETED")


def survey_job(rec: dict[str, Any]) -> list[SessionState]:
    """Every session of a Slurm job: its files read from the shared directory, merged with Slurm's state."""
    info = launch_state(rec)
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
                               last_line=why_waiting(info), backend=BACKEND, slurm_job=str(rec["slurm_job"]))]
    return states


# Why Slurm keeps a job waiting (squeue's REASON), in words, saying where waiting alone will not help.
REASONS: dict[str, str] = {
    "Resources": "the nodes it needs are busy",
    "Priority": "jobs of higher priority go first",
    "BeginTime": "its --begin time has not come",
    "Dependency": "it waits for another job",
    "DependencyNeverSatisfied": "a job it depends on failed: it will never start (fab stop cancels it)",
    "PartitionNodeLimit": ("more nodes than its partition allows or has up: it starts only if nodes come back "
                           "or the limit changes"),
    "PartitionTimeLimit": "its --time is over the partition's limit: it will not start",
    "PartitionDown": "its partition is down",
    "PartitionInactive": "its partition is inactive",
    "ReqNodeNotAvail": "a node it needs is down, drained or reserved",
    "NodeDown": "a node it needs is down",
    "BadConstraints": "no node meets its constraints: it will not start",
    "InvalidAccount": "its account is not valid: it will not start",
    "InvalidQOS": "its QOS is not valid: it will not start",
    "JobHeldUser": "held by its user (scontrol release JOBID)",
    "JobHeldAdmin": "held by an administrator",
}


def why_waiting(info: JobInfo) -> str:
    """`PENDING (Resources: the nodes it needs are busy)`: Slurm's state and reason, with what the reason means."""
    if info.reason in ("", "None"):
        return info.state
    said = REASONS.get(info.reason.split(",")[0])
    return f"{info.state} ({info.reason}{': ' + said if said else ''})"


def slurm_records() -> list[dict[str, Any]]:
    """This project's launch records of Slurm jobs."""
    return [r for r in records.load_all() if r.get("backend") == BACKEND]


# --- stopping -------------------------------------------------------------------------------------------------


def stop(rec: dict[str, Any], grace: float, on_progress: Callable[[str, str], Any] | None = None) -> dict[str, Any]:
    """SIGINT to every task, `grace` seconds, then SIGTERM, then Slurm's own cancel (SIGKILL after KillWait).

    Returns what was done: how each session ended (from its exit record) and whether Slurm still
    has the job. Nothing but this job id is ever named to scancel.
    """
    info = launch_state(rec)
    if info.ended:
        return {"result": "nothing to stop", "state": info.state or "gone", "phases": []}
    target = info.job_id  # the batch job, or inside an allocation only this launch's step: never the allocation
    phases: list[tuple[str, float]] = []  # each signal phase and when it began (for how each rank ended)

    def tell(text: str) -> None:
        if on_progress:
            on_progress(f"slurm {'step' if '.' in target else 'job'} {target}", text)

    if info.waiting:
        if rec.get("step_name"):
            _kill_driver(rec)
            tell("step not started: its srun stopped")
        else:
            run(["scancel", target])
            tell("pending: cancelled")
        phases.append(("cancel", time.time()))
    else:
        for sig, wait_s in (("INT", grace), ("TERM", 3.0)):
            phases.append((sig, time.time()))
            _scancel(rec, f"--signal={sig}", target)
            tell(f"SIG{sig} to every task")
            if _wait_end(rec, wait_s):
                break
        else:
            phases.append(("KILL", time.time()))
            if not launch_state(rec).ended:
                _sweep(rec, info.nodelist)
                tell("SIGKILL to every process of the job on its nodes")
            if not launch_state(rec).ended:
                _scancel(rec, target)
                tell("scancel (SIGKILL after the cluster's KillWait)")
    gone = _wait_end(rec, 60.0)
    if rec.get("step_name") and job_info(str(rec["slurm_job"])).state == "RUNNING":
        # The allocation lives on, and so would what a rank left behind outside Slurm's tracking.
        _sweep(rec, info.nodelist or job_info(str(rec["slurm_job"])).nodelist)
    info = launch_state(rec)
    return {"result": "stopped" if gone else f"slurm job {target} still {info.state}", "state": info.state or "gone",
            "phases": phases}


def _scancel(rec: dict[str, Any], *args: str) -> None:
    """scancel, where a job or step that ended or is completing meanwhile ("Invalid job id") is no failure."""
    try:
        run(["scancel", *args])
    except SlurmError:
        info = launch_state(rec)
        if not (info.ended or info.state == "COMPLETING"):  # a completing job is no longer Slurm's to signal
            raise


def _kill_driver(rec: dict[str, Any]) -> None:
    """SIGTERM the process group of a launch's driver (and the srun waiting in it), if it is still ours."""
    if _driver_alive(rec):
        with contextlib.suppress(OSError):
            os.killpg(int(rec["driver_pid"]), signal.SIGTERM)


def _sweep(rec: dict[str, Any], nodelist: str) -> None:
    """SIGKILL every process carrying the job's marker on each of its nodes, through a step of the job itself.

    Slurm tracks a task's processes by their parents: a child that called setsid and outlived its
    rank is reparented to init and out of Slurm's reach, yet holds the rank's output open. The marker
    every process of the job inherits finds it, as `fab stop` does over ssh; nothing else is touched.
    """
    sweep = sweep_command(f"{TAG_VAR}={re.escape(rec['job'])}@[A-Za-z0-9_.-]+")
    names = _expand(nodelist)
    where = [f"--nodes={len(names)}", f"--nodelist={nodelist}"] if names else [f"--nodes={rec.get('nodes') or 1}"]
    # The job may have ended meanwhile, or the cluster forbid steps from outside: scancel follows either way.
    with contextlib.suppress(SlurmError):
        run(["srun", f"--jobid={rec['slurm_job']}", "--overlap", "--job-name=fablaunch-sweep", *where,
             "--ntasks-per-node=1", *sweep],
            deadline=COMMAND_DEADLINE)


def sweep_command(marker: str) -> list[str]:
    """argv that SIGKILLs every process whose environment holds `marker` (a regex of VAR=value), but itself.

    It runs without fablaunch's own markers, so neither it nor the commands of its pipeline match.
    """
    script = ("for p in $(grep -lszx -E -- \"$1\" /proc/[0-9]*/environ 2>/dev/null "
              "| sed -n 's#^/proc/\\([0-9]*\\)/environ$#\\1#p'); do "
              '[ "$p" = "$$" ] || kill -KILL "$p" 2>/dev/null; done; true')
    return ["env", "-u", TAG_VAR, "-u", RUN_VAR, "-u", SESSION_VAR, "bash", "-c", script, "sweep", marker]


def on_nodes(rec: dict[str, Any], payload_for: Callable[[Host], str],
             deadline: float = COMMAND_DEADLINE) -> dict[str, Outcome]:
    """Run a payload on every node of a running job, as one step of the job itself; each node's Outcome.

    `srun --jobid --overlap` reaches the nodes where ssh may not, and shares the job's cgroup and
    limits. One script goes to every task on stdin; each task runs its own node's payload (a case on
    SLURMD_NODENAME), and `--label` keeps every line with the task that printed it.
    """
    job_id = str(rec["slurm_job"])
    info = launch_state(rec)
    if info.state != "RUNNING":
        raise SlurmError(["srun"], f"slurm job {info.job_id} is {info.state or 'gone'}: no node runs it now")
    nodes = _expand(info.nodelist) or [info.nodelist]
    hosts = {n: parse_host(n, f"slurm job {job_id}") for n in nodes}
    body = [f"printf '{_NODE_MARK}%s\\n' \"$SLURMD_NODENAME\"", 'case "$SLURMD_NODENAME" in']
    for name, host in hosts.items():
        body += [f"{sh(name)}) bash -c {sh(payload_for(host))} </dev/null; rc=$? ;;"]
    body += ["*) rc=127 ;;", "esac", f"printf '\\n{_RC_MARK}%s\\n' \"$rc\" >&2"]
    # A function is read whole before it runs: nothing in it can read the rest of the script as input.
    script = "main() {\n" + "\n".join(body) + "\n}\nmain\n"
    start = time.monotonic()
    try:
        done = subprocess.run(["srun", f"--jobid={job_id}", "--overlap", f"--nodes={len(nodes)}",
                               f"--nodelist={','.join(nodes)}", "--ntasks-per-node=1", "--label", "--input=all",
                               "--quiet", "bash", "-s"],
                              input=script, capture_output=True, text=True, errors="replace", timeout=deadline)
    except FileNotFoundError:
        raise SlurmError(["srun"], "not found: is this a Slurm login node (PATH, SLURM_CONF)?") from None
    except subprocess.TimeoutExpired:
        return {n: Outcome(h, error=f"timed out after {deadline:g}s") for n, h in hosts.items()}
    seconds = time.monotonic() - start
    out, err = _by_task(done.stdout), _by_task(done.stderr)
    node_of = {task: lines[0].removeprefix(_NODE_MARK) for task, lines in out.items()
               if lines and lines[0].startswith(_NODE_MARK)}
    outcomes: dict[str, Outcome] = {}
    for task, name in node_of.items():
        if name not in hosts:
            continue
        errs = err.get(task, [])
        code = next((as_int(x.removeprefix(_RC_MARK)) for x in reversed(errs) if x.startswith(_RC_MARK)), None)
        errs = [x for x in errs if not x.startswith(_RC_MARK)]
        if errs and not errs[-1]:
            errs.pop()  # the newline printed before the exit code
        outcomes[name] = Outcome(hosts[name], code, "".join(f"{x}\n" for x in out[task][1:]),
                                 "".join(f"{x}\n" for x in errs), None if code is not None else
                                 "the step ended before the payload did", seconds, started=True)
    said = "; ".join(x for x in done.stderr.splitlines() if not re.match(r"\d+: ", x))[-300:]
    missing = f"no answer from srun on the node{f': {said}' if said else ''}"
    return {name: outcomes.get(name) or Outcome(host, error=missing) for name, host in hosts.items()}


_NODE_MARK, _RC_MARK = "\x1eFLNODE ", "\x1eFLRC "


def _by_task(text: str) -> dict[int, list[str]]:
    """srun --label's output as each task's lines (`3: text`); lines without a label are srun's own."""
    found: dict[int, list[str]] = {}
    for line in text.split("\n"):  # not splitlines(): that also splits at the \x1e our payloads print
        m = re.match(r" *(\d+): ", line)
        if m:
            found.setdefault(int(m.group(1)), []).append(line[m.end():])
    return found


def alive_test(job_id: str) -> str:
    """A shell test that holds while Slurm still runs (or has yet to run) the job.

    A controller that does not answer counts as alive (following goes on, as `tail -F` would); an
    empty answer, or a job id it no longer knows, is a job that has ended.
    """
    states = "PENDING,CONFIGURING,RUNNING,COMPLETING,SUSPENDED,REQUEUED,RESIZING"
    return (f"{{ fl_q=$(squeue -h -j {sh(job_id)} -t {states} -o %T 2>&1); fl_rc=$?; "
            'if [ "$fl_rc" = 0 ]; then [ -n "$fl_q" ]; else case "$fl_q" in *"Invalid job id"*) false ;; '
            '*) true ;; esac; fi; }')


def _wait_end(rec: dict[str, Any], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while True:
        if launch_state(rec).ended:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.5)


# --- doctor ---------------------------------------------------------------------------------------------------


def doctor(p: SlurmPlan) -> list[tuple[str, str, str]]:
    """What would make a Slurm launch of `p` fail or wait: (check, ok / warn / fail, detail) in order.

    Slurm reachable; the partition exists and is up; enough nodes idle now (else the job pends); then
    one short step on as many nodes as the job asks: the interpreter, torch and (for a GPU job) NCCL
    and enough GPUs on each, versions that agree between nodes, and the shared directory writable.
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
    gres = run(["sinfo", "-h", "-p", name, "-o", "%G"]).strip()
    if p.gpus_per_node and "gpu" not in gres:
        checks.append(("gpus", "warn", f"partition {name} has no GPUs as GRES ({gres or 'none'}): the job cannot "
                                       "ask Slurm for them, and runs on whatever each node has"))
    probe = "\n".join([
        f"n=$SLURMD_NODENAME; d={sh(p.logdir)}",
        'mkdir -p "$d" && touch "$d/.doctor-$n" && w=yes || w=no; rm -f "$d/.doctor-$n"',
        f"{{ {sh(p.python)} -c {sh(VERSION_PROBE)} 2>/dev/null || echo python=-; echo writable=$w",
        "  if command -v nvidia-smi >/dev/null 2>&1; then echo gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')",
        "  else echo gpus=none; fi; } | sed \"s/^/$n|/\"",
    ])
    try:
        out = run(["srun", "--immediate=20", f"--nodes={p.nodes}", "--ntasks-per-node=1", "--time=1",
                   *([f"--partition={partition}"] if partition else []), "bash", "-c", probe], deadline=150)
    except SlurmError as exc:
        return [*checks, ("on the nodes", "warn", f"no step could run now: {exc.message}")]
    found: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        node, _, field = line.partition("|")
        key, _, value = field.partition("=")
        found.setdefault(node, {})[key] = value.strip()
    for node, f in found.items():
        checks.append((f"node {node}", *_node_verdict(p, f)))
    for key, how in (("torch", "fail"), ("nccl", "fail"), ("python", "warn")):
        values = {f.get(key, "") for f in found.values()}
        if len(values) > 1:
            checks.append((f"{key} versions", how, f"{key} differs between nodes: {', '.join(sorted(values))}"))
    return checks


def _node_verdict(p: SlurmPlan, f: dict[str, str]) -> tuple[str, str]:
    """(ok / fail, detail) for one node's probe: interpreter, torch, NCCL and GPUs as the job needs them."""
    bad = []
    if f.get("python", "-") == "-":
        bad.append(f"no interpreter {p.python}")
    elif "torch" not in f:
        bad.append(f"no torch ({f.get('torch_error', 'import failed')})")
    gpus = f.get("gpus", "none")
    if p.gpus_per_node:
        have = int(gpus) if gpus.isdigit() else 0
        if have < p.gpus_per_node:
            bad.append("no nvidia-smi (no GPU)" if gpus == "none" else f"{have} GPUs, {p.gpus_per_node} wanted")
        if "torch" in f and not f.get("nccl"):
            bad.append("torch has no NCCL")
    if f.get("writable") != "yes":
        bad.append(f"cannot write {p.logdir}")
    if bad:
        return "fail", "; ".join(bad)
    return "ok", (f"python {f['python']}, torch {f['torch']}" + (f", NCCL {f['nccl']}" if f.get("nccl") else "")
                  + (f", {gpus} GPUs" if gpus.isdigit() else ", no GPU") + f", {p.logdir} writable")
