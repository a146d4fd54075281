"""`fab top`: GPU utilisation, power, memory and processes of every host, live, and ranks that look hung.

A hung NCCL job rarely fails: it sits with every rank alive, the GPUs near idle power and the logs
silent until a timeout fires, often an hour later. This view asks every host's `nvidia-smi` (one round
trip per host and refresh, connections kept open between refreshes) and, for a job, puts the survey
of its sessions in the same round trip, so a rank whose GPU idles or whose log went quiet stands out.
Payload and parsing are pure, so odd `nvidia-smi` output (`[N/A]`, `[Not Supported]`, no GPU) and
the flagging rules are unit-tested without hosts.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from invoke import Exit

from fablaunch import survey, ui
from fablaunch.errors import UsageError
from fablaunch.executor import Executor
from fablaunch.hostfile import Host
from fablaunch.jobs import SshBackend, backends, targets
from fablaunch.plan import JOBS_DIR, RemotePath
from fablaunch.scripts import sh
from fablaunch.survey import SessionState

from .flags import parallel_flag, seconds_flag, task, usage_errors
from .jobs import KEEPER_HELP, TARGET_HELP

SEP = survey.SEP
GPU_FIELDS = ("index", "uuid", "utilization.gpu", "power.draw", "power.limit", "memory.used", "memory.total")
APP_FIELDS = ("gpu_uuid", "pid", "used_memory")
QUERY_GPUS = f"nvidia-smi --query-gpu={','.join(GPU_FIELDS)} --format=csv,noheader,nounits"
QUERY_APPS = f"nvidia-smi --query-compute-apps={','.join(APP_FIELDS)} --format=csv,noheader,nounits"
# An idle H100 draws about 11 % of its power limit; a GPU that computes draws far more. Ranks stuck in a
# collective keep their processes (and often 100 % "utilisation", a spinning kernel) but not the power.
IDLE_POWER_PCT = 15.0
DEFAULT_STALL = 300.0
DEFAULT_INTERVAL = 2.0
SMI_TIMEOUT = 20  # seconds; a wedged driver can hang nvidia-smi, and with it every refresh

# Host states, as shown in the table and in --json.
OK, NO_GPU, NO_SMI, SMI_FAILED, UNREACHABLE = "ok", "no GPU", "no nvidia-smi", "nvidia-smi failed", "unreachable"


@dataclass
class Gpu:
    """One GPU as `nvidia-smi` reported it; a field it could not report is None."""

    index: int | None
    uuid: str
    utilization_pct: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    memory_used_mib: float | None = None
    memory_total_mib: float | None = None
    processes: list[dict[str, Any]] = field(default_factory=list)  # {"pid": int, "used_memory_mib": float|None}

    @property
    def power_pct(self) -> float | None:
        return _share(self.power_w, self.power_limit_w)


@dataclass
class Totals:
    """Figures summed (power, memory, processes) or averaged (utilisation) over GPUs that report them."""

    gpus: int = 0
    utilization_pct: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    power_pct: float | None = None
    memory_used_mib: float | None = None
    memory_total_mib: float | None = None
    processes: int | None = None


@dataclass
class HostSample:
    """One host at one refresh: its GPUs, or why there are none to show."""

    host: str
    status: str
    message: str = ""
    gpus: list[Gpu] = field(default_factory=list)
    processes: int | None = None  # distinct compute processes; None when nvidia-smi could not list them

    def totals(self) -> Totals:
        return totals([self])

    def as_json(self) -> dict[str, Any]:
        gpus = [{**asdict(g), "power_pct": _round(g.power_pct)} for g in self.gpus]
        return {"host": self.host, "status": self.status, "message": self.message, "gpus": gpus,
                "totals": asdict(self.totals())}


@dataclass
class Flag:
    """A running session of the job that looks hung, and why."""

    host: str
    session: str
    rank: int | None
    node: int | None
    reasons: list[str]
    log_age: float | None = None
    power_pct: float | None = None


# --- the payload -------------------------------------------------------------------------------------------


def payload(host: Host, job: str | None) -> str:
    """Ask `nvidia-smi` for GPUs and compute processes; with a job, survey its sessions in the same trip.

    Prints sections: `NOSMI` when there is no nvidia-smi, else `GPUS rc` and `APPS rc` with the CSV
    (or the error) after them; with a job, `WLOGS` (torchrun workers' log mtimes) and the survey dump.
    """
    lines = [
        f"fl_sep=$'{SEP}'",
        "fl_t=; command -v timeout >/dev/null 2>&1 && fl_t='timeout " + str(SMI_TIMEOUT) + "'",
        "if command -v nvidia-smi >/dev/null 2>&1; then",
        f"  fl_out=$($fl_t {QUERY_GPUS} 2>&1); fl_rc=$?",
        '  printf "%sGPUS %s\\n%s\\n" "$fl_sep" "$fl_rc" "$fl_out"',
        f"  fl_out=$($fl_t {QUERY_APPS} 2>&1); fl_rc=$?",
        '  printf "%sAPPS %s\\n%s\\n" "$fl_sep" "$fl_rc" "$fl_out"',
        "else",
        '  printf "%sNOSMI\\n" "$fl_sep"',
        "fi",
    ]
    if job:
        # torchrun keeps each worker's output in its own files; the node's session log stays quiet.
        workers = f"{sh(RemotePath(JOBS_DIR))}/{sh(job)}/{sh(host.label)}/*.torchrun/*/attempt_*/*/std*.log"
        lines += ['printf "%sWLOGS\\n" "$fl_sep"', f"stat -c '%n %Y' {workers} 2>/dev/null"]
        lines.append(survey.payload(host, job))
    else:
        lines += ["exit 0", ""]
    return "\n".join(lines)


# --- parsing ------------------------------------------------------------------------------------------------


def number(text: str) -> float | None:
    """A figure of nvidia-smi's CSV, or None for `[N/A]`, `[Not Supported]`, `[Unknown Error]` or blank."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if value == value else None  # NaN is no figure either


def _int(text: str) -> int | None:
    value = number(text)
    return int(value) if value is not None and value.is_integer() else None


def parse_gpus(text: str) -> list[Gpu]:
    """Rows of the `--query-gpu` CSV; a row with the wrong number of fields is skipped, not fatal."""
    gpus = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(GPU_FIELDS):
            continue
        index, uuid, util, power, limit, used, total = fields
        gpus.append(Gpu(_int(index), uuid, number(util), number(power), number(limit), number(used), number(total)))
    return gpus


def parse_apps(text: str) -> list[tuple[str, int, float | None]]:
    """Rows of the `--query-compute-apps` CSV as (gpu uuid, pid, used memory MiB)."""
    apps = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(APP_FIELDS):
            continue
        pid = _int(fields[1])
        if pid is not None:
            apps.append((fields[0], pid, number(fields[2])))
    return apps


def _sections(text: str) -> dict[str, tuple[str, list[str]]]:
    """Sections by kind; the first of a kind wins (the survey dump that may follow repeats some)."""
    found: dict[str, tuple[str, list[str]]] = {}
    for kind, arg, lines in survey.sections(text):
        found.setdefault(kind, (arg, lines))
    return found


def _last_line(lines: list[str]) -> str:
    text = [x.strip() for x in lines if x.strip()]
    return text[-1] if text else ""


def parse_sample(host: str, text: str) -> HostSample:
    """Turn one host's payload output into its sample."""
    sections = _sections(text)
    if "NOSMI" in sections:
        return HostSample(host, NO_SMI, "not on the PATH of a non-login shell (no GPU, or no NVIDIA driver)")
    if "GPUS" not in sections:
        return HostSample(host, SMI_FAILED, "no answer from nvidia-smi")
    rc, lines = sections["GPUS"]
    body = "\n".join(lines)
    if rc != "0":
        message = _last_line(lines) or f"exit code {rc}"
        # "No devices were found" (exit 6) is a host without GPUs; anything else is a broken driver or tool.
        return HostSample(host, NO_GPU if "no devices were found" in body.lower() else SMI_FAILED, message)
    gpus = parse_gpus(body)
    if not gpus:
        return HostSample(host, NO_GPU, _last_line(lines))
    sample = HostSample(host, OK, gpus=gpus)
    apps_rc, app_lines = sections.get("APPS", ("", []))
    if apps_rc == "0":
        by_uuid = {g.uuid: g for g in gpus}
        pids = set()
        for uuid, pid, memory in parse_apps("\n".join(app_lines)):
            pids.add(pid)
            if uuid in by_uuid:
                by_uuid[uuid].processes.append({"pid": pid, "used_memory_mib": memory})
        sample.processes = len(pids)
    else:
        sample.message = f"compute processes unknown: {_last_line(app_lines) or 'exit code ' + apps_rc}"
    return sample


def worker_log_ages(text: str) -> dict[str, float]:
    """Seconds since each torchrun worker log (`WLOGS`) was written, by path, against the host's clock."""
    sections = _sections(text)
    now = number(sections.get("NOW", ("", []))[0])
    ages: dict[str, float] = {}
    for line in sections.get("WLOGS", ("", []))[1]:
        path, _, stamp = line.rpartition(" ")
        mtime = number(stamp)
        if path and now is not None and mtime is not None:
            ages[path] = max(0.0, now - mtime)
    return ages


# --- figures ------------------------------------------------------------------------------------------------


def _share(part: float | None, whole: float | None) -> float | None:
    return 100.0 * part / whole if part is not None and whole else None


def _sum(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def totals(samples: list[HostSample]) -> Totals:
    """Totals over the GPUs of some hosts: the cluster row, or one host's.

    Power share is total draw over total limit of the GPUs that report both, so a GPU without a
    power reading neither counts as idle nor dilutes the others.
    """
    gpus = [g for s in samples for g in s.gpus]
    utils = [g.utilization_pct for g in gpus if g.utilization_pct is not None]
    powered = [g for g in gpus if g.power_w is not None and g.power_limit_w]
    power, limit = _sum([g.power_w for g in powered]), _sum([g.power_limit_w for g in powered])
    counted = [s.processes for s in samples if s.gpus and s.processes is not None]
    return Totals(
        gpus=len(gpus),
        utilization_pct=_round(sum(utils) / len(utils)) if utils else None,
        power_w=_round(power), power_limit_w=_round(limit), power_pct=_round(_share(power, limit)),
        memory_used_mib=_sum([g.memory_used_mib for g in gpus]),
        memory_total_mib=_sum([g.memory_total_mib for g in gpus]),
        processes=sum(counted) if counted else None,
    )


# --- flagging ------------------------------------------------------------------------------------------------


def age_text(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    return f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _local_ranks(states: list[SessionState]) -> dict[str, int]:
    """Each per-GPU session's local rank: its place among its host's ranks, as the launch numbered them."""
    local: dict[str, int] = {}
    per_host: dict[str, list[SessionState]] = {}
    for s in states:
        if s.rank is not None:
            per_host.setdefault(s.host, []).append(s)
    for ranks in per_host.values():
        for i, s in enumerate(sorted(ranks, key=lambda x: x.rank or 0)):
            local[s.session] = i
    return local


def _worker_silence(state: SessionState, ages: dict[str, float]) -> tuple[float, list[int]] | None:
    """For a torchrun node: the longest silence among the latest attempt's workers, and which are that quiet.

    Layout: <node log without .log>.torchrun/<run>/attempt_<A>/<local rank>/std{out,err}.log.
    """
    prefix = state.log.removesuffix(".log") + ".torchrun/"
    per_worker: dict[tuple[int, int], float] = {}
    for path, age in ages.items():
        m = re.fullmatch(re.escape(prefix) + r"[^/]+/attempt_(\d+)/(\d+)/std(?:out|err)\.log", path)
        if m:
            key = (int(m.group(1)), int(m.group(2)))
            per_worker[key] = min(age, per_worker.get(key, age))  # a worker is as fresh as its freshest file
    if not per_worker:
        return None
    attempt = max(a for a, _ in per_worker)
    latest = {local: age for (a, local), age in per_worker.items() if a == attempt}
    oldest = max(latest.values())
    return oldest, sorted(local for local, age in latest.items() if age == oldest)


def flag(states: list[SessionState], samples: dict[str, HostSample], stall: float,
         worker_ages: dict[str, dict[str, float]] | None = None, idle_pct: float = IDLE_POWER_PCT) -> list[Flag]:
    """The running sessions that look hung: GPU near idle power, or log silent for longer than `stall`.

    A per-GPU rank is judged by the GPU its LOCAL_RANK names (code under torchrun's contract uses that
    one) if the host has it, else by all its host's GPUs; a torchrun node by all of them. Its log is
    its session log; a torchrun node's are its workers' logs, once they exist.
    """
    local = _local_ranks(states)
    flagged = []
    for s in states:
        if s.state != "running":
            continue
        reasons = []
        age = s.log_age
        silence = _worker_silence(s, (worker_ages or {}).get(s.host, {})) if s.mode == "torchrun" else None
        if silence is not None:
            age = silence[0]
        if age is not None and age > stall:
            if silence is not None:
                workers = ",".join(map(str, silence[1]))
                reasons.append(f"worker {workers} log silent for {age_text(age)}")
            else:
                reasons.append(f"log silent for {age_text(age)}")
        sample = samples.get(s.host)
        power = None
        if sample and sample.gpus:
            mine = [g for g in sample.gpus if s.session in local and g.index == local[s.session]] or sample.gpus
            power = totals([HostSample(s.host, OK, gpus=mine)]).power_pct
            if power is not None and power < idle_pct:
                gpu = f"GPU {mine[0].index}" if len(mine) == 1 else "GPUs"
                reasons.append(f"{gpu} at {power:.0f}% of power limit (near idle)")
        if reasons:
            flagged.append(Flag(s.host, s.session, s.rank, s.node, reasons, _round(age), _round(power)))
    return flagged


# --- one refresh ------------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Every host at one refresh, plus the job's sessions and flags when a job is watched."""

    time: float
    samples: list[HostSample]
    job: str | None = None
    states: list[SessionState] = field(default_factory=list)
    flagged: list[Flag] = field(default_factory=list)

    @property
    def unreachable(self) -> list[HostSample]:
        return [s for s in self.samples if s.status == UNREACHABLE]

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"time": self.time, "hosts": [s.as_json() for s in self.samples],
                                "totals": asdict(totals(self.samples)),
                                "unreachable": [s.host for s in self.unreachable]}
        if self.job:
            data["job"] = self.job
            data["sessions"] = {state: sum(s.state == state for s in self.states)
                                for state in sorted({s.state for s in self.states})}
            data["flagged"] = [asdict(f) for f in self.flagged]
        return data


def sample(ex: Executor, hosts: list[Host], job: str | None, stall: float) -> Snapshot:
    """One round trip to every host (in parallel, over the executor's open connections).

    A Slurm job's nodes are asked through a step of the job (`srun --overlap`); its sessions' states
    and torchrun workers' logs are read from the directory its nodes share, here.
    """
    snap = Snapshot(time.time(), [], job)
    ages: dict[str, dict[str, float]] = {}
    for backend in backends(ex, hosts, job) if job else [SshBackend(ex, hosts)]:
        over_ssh = backend.name == "ssh"
        outcomes = backend.on_nodes(functools.partial(payload, job=job if over_ssh else None), read_only=True)
        for spec, o in outcomes.items():
            if not o.reached:
                snap.samples.append(HostSample(spec, UNREACHABLE, o.why().removeprefix("unreachable: ")))
                continue
            if o.exit_code != 0 and SEP not in o.stdout:
                snap.samples.append(HostSample(spec, SMI_FAILED, o.why()))
                continue
            snap.samples.append(parse_sample(spec, o.stdout))
            if job and over_ssh:
                snap.states += [s for s in survey.parse(o.host, o.stdout) if s.job == job]
                ages[spec] = worker_log_ages(o.stdout)
        if job and not over_ssh:
            snap.states += [s for s in backend.survey(job).states if s.job == job]
            local = local_log_ages([s.log for s in snap.states if s.mode == "torchrun" and s.log])
            ages.update({s.host: local for s in snap.states})
    if job:
        snap.states.sort(key=lambda s: (s.rank if s.rank is not None else -1, s.node if s.node is not None else -1))
        snap.flagged = flag(snap.states, {s.host: s for s in snap.samples}, stall, ages)
    return snap


def local_log_ages(logs: list[str]) -> dict[str, float]:
    """Seconds since each torchrun worker log of these nodes was written, read here (a shared directory)."""
    now = time.time()
    ages: dict[str, float] = {}
    for log in logs:
        for path in glob.glob(glob.escape(log.removesuffix(".log")) + ".torchrun/*/attempt_*/*/std*.log"):
            with contextlib.suppress(OSError):
                ages[path] = max(0.0, now - os.stat(path).st_mtime)
    return ages


# --- rendering ------------------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}%"


def _gib(value: float | None) -> str:
    return "?" if value is None else f"{value / 1024:.1f}"


def _figures(t: Totals) -> list[str]:
    """The GPUs, util, power, memory and procs cells of a row."""
    if not t.gpus:
        return ["0", "", "", "", ""]
    power = "?" if t.power_w is None else f"{t.power_w:.0f}/{t.power_limit_w:.0f} W ({_pct(t.power_pct)})"
    memory = f"{_gib(t.memory_used_mib)}/{_gib(t.memory_total_mib)} GiB"
    return [str(t.gpus), _pct(t.utilization_pct), power, memory, "?" if t.processes is None else str(t.processes)]


def _per_gpu(gpus: list[Gpu]) -> str:
    """`util/power` (percent) per GPU, so the one GPU that idles among busy ones shows."""
    return " ".join(f"{_pct(g.utilization_pct).rstrip('%')}/{_pct(g.power_pct).rstrip('%')}" for g in gpus)


_STATUS_STYLE = {OK: None, NO_GPU: "dim", NO_SMI: "dim", SMI_FAILED: "red", UNREACHABLE: "red"}


def render(snap: Snapshot, interval: float | None = None) -> ui.Blocks:
    """The view: one row per host and a cluster row, then the job's flagged ranks.

    Host and its figures are never squeezed; the per-GPU figures and the note go under each host's
    row where they do not fit beside it (80 columns).
    """
    stamp = time.strftime("%H:%M:%S", time.localtime(snap.time))
    every = f", every {interval:g}s, Ctrl-C to quit" if interval else ""
    rows: list[list[str]] = []
    styles: list[str | None] = []
    for s in snap.samples:
        styles.append(_STATUS_STYLE.get(s.status))
        if s.gpus:
            rows.append([s.host, *_figures(s.totals()), _per_gpu(s.gpus), s.message])
        else:
            rows.append([s.host, *_figures(Totals()), "", s.status + (f": {s.message}" if s.message else "")])
    note = f"{len(snap.unreachable)} unreachable" if snap.unreachable else ""
    rows.append(["cluster", *_figures(totals(snap.samples)), "", note])
    styles.append("bold")
    table = ui.TableSpec(f"fab top: {ui.plural(len(snap.samples), 'host')} at {stamp}{every}",
                         ("host", "GPUs", "util", "power", "memory", "procs", "util%/power% per GPU", "note"), rows,
                         styles, key_columns=("host", "GPUs", "util", "power", "memory", "procs"),
                         free_columns=("note",), sections=(len(rows) - 1,))
    return ui.Blocks(table, job_view(snap)) if snap.job else ui.Blocks(table)


def job_view(snap: Snapshot) -> Any:
    from rich.text import Text

    running = [s for s in snap.states if s.state == "running"]
    if not snap.states:
        return Text(f"job {snap.job}: no sessions found on these hosts", style="yellow")
    if not snap.flagged:
        return Text(f"job {snap.job}: {len(running)} of {ui.plural(len(snap.states), 'session')} running, "
                    "none looks hung", style="green")
    hung = len(snap.flagged)
    rows = [(f.host, f.session, f"rank {f.rank}" if f.rank is not None else f"node {f.node}", "; ".join(f.reasons))
            for f in snap.flagged]
    return ui.TableSpec(f"job {snap.job}: {hung} of {ui.plural(len(running), 'running session')} "
                        f"{'looks' if hung == 1 else 'look'} hung", ("host", "session", "who", "why"), rows,
                        ["red"] * hung, key_columns=("host", "who"), free_columns=("why",), title_style="bold red")


# --- the task ------------------------------------------------------------------------------------------------------


def _interval(value: Any) -> float:
    interval = seconds_flag(value, "--interval", DEFAULT_INTERVAL) or 0.0
    if interval <= 0:
        raise UsageError("--interval", f"must be more than 0, not {value}")
    return interval


@task(
    name="top",
    help={**TARGET_HELP,
          "job": "Also flag this job's running ranks that look hung (GPU near idle power, or log silent).",
          "interval": f"Seconds between refreshes (default {DEFAULT_INTERVAL:g}).",
          "once": "Print one snapshot and exit (exit code 1 if a host is unreachable).",
          "json": "Print one snapshot as a JSON object (hosts, GPUs, totals, flagged ranks); implies --once.",
          "stall": f"With --job: flag a rank whose log has been silent this many seconds (default {DEFAULT_STALL:g}).",
          "no_keeper": KEEPER_HELP},
)
@usage_errors
def top_(c, interval=None, once=False, json_=False, job=None, stall=None, hosts=None, gpus=None, parallel=None,
         no_keeper=False):
    """Show every host's GPUs live: utilisation, power against its limit, memory and compute processes.

    One row per host and one for the cluster, from `nvidia-smi` on every host at each refresh (one round
    trip per host, hosts in parallel, connections kept open). Hosts without GPUs or without nvidia-smi
    say so. With --job, ranks whose GPU sits near idle power (under 15 % of its limit) or whose log has
    been silent longer than --stall are flagged: the usual look of a hang. Ctrl-C quits.
    """
    every = _interval(interval)
    stall_s = seconds_flag(stall, "--stall", DEFAULT_STALL) or 0.0
    host_list = targets(job, hosts, gpus)
    with Executor(c.config, parallel_flag(parallel), deadline=20, keeper=not no_keeper) as ex:
        if once or json_:
            snap = sample(ex, host_list, job, stall_s)
            if json_:
                print(json.dumps(snap.as_json(), indent=2))
            else:
                ui.emit(render(snap))
            if snap.unreachable:
                raise Exit(f"fablaunch: unreachable: {', '.join(s.host for s in snap.unreachable)}", code=1)
            return
        watch(ex, host_list, job, stall_s, every)


def watch(ex: Executor, hosts: list[Host], job: str | None, stall: float, interval: float) -> None:
    """Refresh the view every `interval` seconds until Ctrl-C.

    On a terminal the view is redrawn in place; piped (`fab top | tee top.log`), every refresh is
    printed as plain lines, one snapshot after the other.
    """
    with contextlib.suppress(KeyboardInterrupt), ui.live(transient=False) as live:
        while True:
            start = time.monotonic()
            view = render(sample(ex, hosts, job, stall), interval)
            if ui.is_terminal():
                live.update(view, refresh=True)
            else:
                ui.emit(view)
                ui.say("")
            time.sleep(max(0.0, interval - (time.monotonic() - start)))
