"""`fab dump`: the Python stack of every process of a job, from every host at once, identical ones folded.

When a job hangs, the question is which rank is somewhere else: usually all but one wait in the same
collective and one is stuck in a data loader, a barrier or a deadlock of its own. `py-spy dump` on
every python process of the job (found by the FABLAUNCH_TAG marker in /proc/PID/environ, as `fab
stop` finds them) answers it; folding identical stacks, as pdsh's dshbak folds identical output,
makes the odd rank out the only short block on the screen. Payload, parsing and folding are pure, so
they are unit-tested without hosts.

Which processes: every python process carrying the job's marker. A rank is the topmost python with
RANK in its environment (per-GPU mode: the one the session script runs; torchrun mode: each worker);
python processes below it with the same RANK (DataLoader workers, spawned helpers) are its children;
torchrun's agent is dumped too (label "torchrun agent"), since a job stuck in rendezvous has no
workers yet and the agent's stack is then the one that tells. `--rank` keeps only those ranks (and
their children), so it skips the agents.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from invoke import Exit

from fablaunch import ui
from fablaunch.executor import Executor
from fablaunch.hostfile import Host
from fablaunch.jobs import backends, latest_job, targets
from fablaunch.scripts import sh, tagged_pids
from fablaunch.survey import SEP, as_int, sections

from .flags import int_flag, parallel_flag, task, usage_errors
from .jobs import TARGET_HELP

SPY_TIMEOUT = 60  # seconds per process; a process in uninterruptible sleep can stall py-spy
INSTALL_HINT = "install it there with `pip install py-spy` (into the job's environment or anywhere on the PATH)"
ROLES = ("rank", "child", "agent", "other")
_AGENT = re.compile(r"torch\.distributed\.run|(?:^|/)torchrun(?:\s|$)")


@dataclass
class Proc:
    """One python process of the job on one host, and what py-spy said about it."""

    host: str
    pid: int
    ppid: int | None = None
    rank: int | None = None
    local_rank: int | None = None
    node: int | None = None  # GROUP_RANK
    cmdline: str = ""
    role: str = "other"  # rank, child (of a rank), agent (torchrun's), other
    exit_code: int | None = None  # of py-spy; None when it did not run
    dump: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass
class HostDump:
    """One host's answer: its processes, and the problem that kept them from being dumped, if any."""

    host: str
    procs: list[Proc] = field(default_factory=list)
    problem: str = ""


@dataclass
class Fold:
    """Processes whose stacks are the same once pids, thread ids and addresses are taken out."""

    stack: str
    members: list[Proc]

    def header(self, host_order: list[str]) -> str:
        return header(self.members, host_order)


# --- the payload -------------------------------------------------------------------------------------------


def payload(job: str, host: Host, ranks: list[int], locals_: bool) -> str:
    """Find the job's python processes by marker, then dump each with py-spy, all at once.

    Prints `PROC pid ppid` sections (RANK, LOCAL_RANK, GROUP_RANK and CMD lines), then `NOSPY` when
    py-spy is nowhere to be found, else `SPY path` and one `DUMP pid rc` section per process. py-spy
    is looked for on the PATH, then beside the job's own interpreter (where `pip install py-spy` in
    the job's venv puts it), then in ~/.local/bin.
    """
    wanted = " " + " ".join(str(r) for r in ranks) + " " if ranks else ""
    return "\n".join([
        f"sep=$'{SEP}'",
        f"wanted={sh(wanted)}",
        f"pids=$({tagged_pids(job, host)})",
        "spy=$(command -v py-spy 2>/dev/null)",
        "found=",
        "for p in $pids; do",
        '  exe=$(readlink "/proc/$p/exe" 2>/dev/null) || continue',
        '  case "${exe##*/}" in python*) ;; *) continue ;; esac',
        "  vars=$(tr '\\0' '\\n' < \"/proc/$p/environ\" 2>/dev/null | grep -E '^(RANK|LOCAL_RANK|GROUP_RANK)=')",
        '  rank=$(printf "%s\\n" "$vars" | sed -n "s/^RANK=//p")',
        '  if [ -n "$wanted" ]; then case "$wanted" in *" $rank "*) [ -n "$rank" ] ;; *) false ;; esac || continue; fi',
        '  stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue',
        '  set -- ${stat##*) }',
        '  printf "%sPROC %s %s\\n%s\\nCMD=%s\\n" "$sep" "$p" "$2" "$vars" \\',
        "    \"$(tr '\\0\\n' '  ' < \"/proc/$p/cmdline\" 2>/dev/null | cut -c1-400)\"",
        '  found="$found $p"',
        '  if [ -z "$spy" ]; then',
        "    a0=$(tr '\\0' '\\n' < \"/proc/$p/cmdline\" 2>/dev/null | head -n 1)",
        '    case "$a0" in /*) [ -x "${a0%/*}/py-spy" ] && spy="${a0%/*}/py-spy" ;; esac',
        "  fi",
        "done",
        '[ -n "$spy" ] || { [ -x "$HOME/.local/bin/py-spy" ] && spy="$HOME/.local/bin/py-spy"; }',
        '[ -n "$found" ] || exit 0',
        'if [ -z "$spy" ]; then printf "%sNOSPY\\n" "$sep"; exit 0; fi',
        'printf "%sSPY %s\\n" "$sep" "$spy"',
        "t=; command -v timeout >/dev/null 2>&1 && t='timeout " + str(SPY_TIMEOUT) + "'",
        'tmp=$(mktemp -d) || exit 3',
        "trap 'rm -rf \"$tmp\"' EXIT",
        "# All at once: py-spy pauses each process only while it reads its stack.",
        "for p in $found; do",
        f'  {{ RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0 $t "$spy" dump --pid "$p"{" --locals" if locals_ else ""} '
        '> "$tmp/$p" 2>&1; echo $? > "$tmp/$p.rc"; } &',
        "done",
        "wait",
        "for p in $found; do",
        '  printf "%sDUMP %s %s\\n" "$sep" "$p" "$(cat "$tmp/$p.rc" 2>/dev/null)"; cat "$tmp/$p" 2>/dev/null',
        "done",
        "exit 0",
        "",
    ])


# --- parsing --------------------------------------------------------------------------------------------------


def parse(host: str, text: str) -> HostDump:
    """One host's payload output as its processes (classified) and dumps."""
    result = HostDump(host)
    by_pid: dict[int, Proc] = {}
    for kind, arg, lines in sections(text):
        words = arg.split()
        pid = as_int(words[0]) if words else None
        if kind == "PROC" and pid is not None:
            proc = by_pid[pid] = Proc(host, pid, as_int(words[1]) if len(words) > 1 else None)
            result.procs.append(proc)
            for line in lines:
                key, _, value = line.partition("=")
                if key == "RANK":
                    proc.rank = as_int(value)
                elif key == "LOCAL_RANK":
                    proc.local_rank = as_int(value)
                elif key == "GROUP_RANK":
                    proc.node = as_int(value)
                elif key == "CMD":
                    proc.cmdline = value.strip()
        elif kind == "DUMP" and pid in by_pid:
            proc = by_pid[pid]
            proc.exit_code = as_int(words[1]) if len(words) > 1 else -1  # no exit record: it did not finish
            proc.dump = "\n".join(lines).rstrip()
        elif kind == "NOSPY":
            result.problem = ("py-spy not found (not on the PATH of a non-login shell, nor beside the job's "
                              f"python); {INSTALL_HINT}")
    classify(result.procs)
    return result


def classify(procs: list[Proc]) -> None:
    """Set each process's role from its parent: a rank, a rank's child, torchrun's agent, or other."""
    by_pid = {p.pid: p for p in procs}
    for p in procs:
        parent = by_pid.get(p.ppid) if p.ppid is not None else None
        if _AGENT.search(p.cmdline) and p.rank is None:
            p.role = "agent"
        elif p.rank is not None:
            p.role = "child" if parent is not None and parent.rank == p.rank else "rank"
        else:
            p.role = "other"


# --- folding -------------------------------------------------------------------------------------------------


def normalize(proc: Proc) -> str:
    """The stack as folding compares it: no header (pid, command line), thread ids or addresses.

    A failed dump keeps its error (pid taken out), so processes failing the same way fold too.
    """
    lines = proc.dump.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Thread ")), None)
    if start is None or not proc.ok:
        text = "\n".join(x for x in lines if x.strip())
        text = re.sub(rf"\b{proc.pid}\b", "PID", text)
        return f"py-spy failed (exit {proc.exit_code}): {text}" if proc.exit_code else text
    body = [re.sub(r"^Thread (?:0x[0-9A-Fa-f]+|\d+)", "Thread", line.rstrip()) for line in lines[start:]]
    body = [re.sub(r"0x[0-9A-Fa-f]+", "0x…", line) for line in body]
    while body and not body[-1]:
        body.pop()
    return "\n".join(body)


def _order(p: Proc, host_order: list[str]) -> tuple[int, int, int, int]:
    where = host_order.index(p.host) if p.host in host_order else len(host_order)
    return (ROLES.index(p.role), p.rank if p.rank is not None else -1, where, p.pid)


def fold(procs: list[Proc], host_order: list[str]) -> list[Fold]:
    """Group processes with identical normalized stacks; groups in order of their first rank."""
    groups: dict[str, list[Proc]] = {}
    for p in sorted(procs, key=lambda x: _order(x, host_order)):
        groups.setdefault(normalize(p), []).append(p)
    return [Fold(stack, members) for stack, members in groups.items()]


def ranges(numbers: list[int]) -> str:
    """`0,2-3` for [0, 2, 3], as dshbak and pdsh write host ranges."""
    parts: list[str] = []
    values = sorted(set(numbers))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts)


def header(members: list[Proc], host_order: list[str]) -> str:
    """`ranks 0,2-3 (node1, node2)`: who shares a stack, and where."""
    parts = []
    ranks = [p.rank for p in members if p.role == "rank" and p.rank is not None]
    if ranks:
        parts.append(f"{'rank' if len(ranks) == 1 else 'ranks'} {ranges(ranks)}")
    children = [p for p in members if p.role == "child"]
    if children:
        of = [p.rank for p in children if p.rank is not None]
        many = len(set(of)) > 1
        parts.append(f"{len(children)} {'child' if len(children) == 1 else 'children'} of "
                     f"{'ranks' if many else 'rank'} {ranges(of)}")
    agents = [p for p in members if p.role == "agent"]
    if agents:
        parts.append("torchrun agent" + ("s" if len(agents) > 1 else ""))
    others = [p for p in members if p.role == "other"]
    if others:
        parts.append(f"{'pid' if len(others) == 1 else 'pids'} {','.join(str(p.pid) for p in others)}")
    hosts = sorted({p.host for p in members}, key=lambda h: host_order.index(h) if h in host_order else len(host_order))
    where = ", ".join(hosts)
    if len(members) == 1 and members[0].role != "other":
        where += f", pid {members[0].pid}"
    return f"{'; '.join(parts)} ({where})"


def hint(proc: Proc) -> str:
    """What to do about a dump that failed."""
    text = proc.dump.lower()
    if "permission" in text or "operation not permitted" in text:
        return ("py-spy may not attach: run as the job's user with kernel.yama.ptrace_scope=0, or as root "
                "(in a container: CAP_SYS_PTRACE)")
    return ""


# --- the task ---------------------------------------------------------------------------------------------------


def collect(ex: Executor, hosts: list[Host], job: str, ranks: list[int], locals_: bool) -> list[HostDump]:
    """Ask every host (a Slurm job: every node, through a step of the job) in parallel.

    A host that could not be asked is a HostDump with only a problem.
    """
    found = []
    for backend in backends(ex, hosts, job):
        for spec, o in backend.on_nodes(lambda h: payload(job, h, ranks, locals_)).items():
            if not o.reached:  # unreachable, timed out, or a Slurm job that no node runs now
                found.append(HostDump(spec, problem=o.why()))
            elif not o.ok:
                found.append(HostDump(spec, problem=f"could not list processes: {o.why()}"))
            else:
                found.append(parse(spec, o.stdout))
    return found


def as_json(job: str, dumps: list[HostDump], folds: list[Fold], host_order: list[str]) -> dict[str, Any]:
    return {
        "job": job,
        "groups": [{"header": f.header(host_order), "stack": f.stack,
                    "ranks": sorted({p.rank for p in f.members if p.rank is not None}),
                    "hosts": sorted({p.host for p in f.members}, key=host_order.index),
                    "members": [{k: getattr(p, k) for k in ("host", "pid", "role", "rank", "local_rank", "node")}
                                for p in f.members]} for f in folds],
        "processes": [p.as_json() for d in dumps for p in d.procs],
        "problems": [{"host": d.host, "problem": d.problem} for d in dumps if d.problem],
    }


def report(job: str, dumps: list[HostDump], folds: list[Fold], host_order: list[str]) -> None:
    for f in folds:
        ui.show_text(f.header(host_order), f.stack)
        hints = {hint(p) for p in f.members} - {""}
        for line in sorted(hints):
            ui.say(f"  hint: {line}", "yellow")
    procs = [p for d in dumps for p in d.procs]
    if procs:
        ranks = [f for f in folds if any(p.role == "rank" for p in f.members)]
        hosts = len({p.host for p in procs})
        ui.say(f"job {job}: {ui.plural(len(procs), 'python process')} on {ui.plural(hosts, 'host')}, "
               f"{ui.plural(len(folds), 'distinct stack')}" + (f" ({len(ranks)} among the ranks)" if ranks else ""))
    for d in dumps:
        if d.problem:
            ui.say(f"{d.host}: {d.problem}", "red", stderr=True)


@task(
    name="dump",
    help={**TARGET_HELP, "job": "Job name (default: the job launched last from here).",
          "rank": "Only this rank (the RANK of a process, in both modes) and its children; repeatable.",
          "locals": "Show each frame's local variables too (py-spy --locals).",
          "json": "Print JSON: the folded groups, every process with its raw dump, and per-host problems."},
    iterable=["rank"],
)
@usage_errors
def dump_(c, job=None, rank=None, locals_=False, json_=False, hosts=None, gpus=None, parallel=None):
    """Print the Python stack of every process of a job (py-spy dump), identical stacks folded together.

    Every host is asked at once; each python process carrying the job's marker is dumped: per-GPU ranks,
    torchrun workers (by their RANK), their python children and torchrun's agents. Ranks whose stacks
    match are shown as one block (`ranks 0,2-3 (node1, node2)`), so a rank stuck elsewhere stands out.
    Needs py-spy on the hosts; exits 1 if a host lacks it, is unreachable or a dump failed.
    """
    wanted = [int_flag(r, "--rank") or 0 for r in rank or []]
    host_list = targets(job, hosts, gpus)
    with Executor(c.config, parallel_flag(parallel), deadline=60) as ex:
        name = job or latest_job(ex, host_list)
        dumps = collect(ex, host_list, name, wanted, locals_)
    order = list(dict.fromkeys([h.spec for h in host_list] + [d.host for d in dumps]))  # Slurm: its nodes
    procs = [p for d in dumps for p in d.procs]
    folds = fold([p for p in procs if p.exit_code is not None], order)
    if json_:
        print(json.dumps(as_json(name, dumps, folds, order), indent=2))
    else:
        report(name, dumps, folds, order)
    problems = [d for d in dumps if d.problem]
    failed = [p for p in procs if p.exit_code is not None and not p.ok]
    if not procs and not problems:
        which = f" of rank {ranges(wanted)}" if wanted else ""
        raise Exit(f"fablaunch: no running python process{which} of job {name} found on the hosts "
                   f"(see `fab status --job {name}`)", code=1)
    if problems or failed:
        raise Exit(f"fablaunch: {ui.plural(len(problems), 'host')} with problems, "
                   f"{ui.plural(len(failed), 'dump')} failed", code=1)
