"""`fab doctor`: check every host for what would make a launch fail or a job hang, in one table.

A launch's preflight checks only what fails at once and cheaply (reachable, interpreter, working
directory, MASTER_PORT, job name). Multi-node jobs mostly fail later and silently: torch or NCCL
differing between hosts, a firewall between a node and MASTER_ADDR, a port someone else holds,
clocks apart (logs and timeouts disagree), a low open-files limit, a full disk. Doctor looks at all
of it on every host at once, one round trip per host for the per-host checks, plus a temporary
listener on the master that every host must reach.

Everything above the task is pure: the payload texts, the parser of a host's answer into checks,
and the cross-host comparisons, so the rules are unit-tested without SSH.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from invoke import Exit

from fablaunch import ui
from fablaunch.errors import UsageError
from fablaunch.executor import REMOTE_SHELL, Executor, Outcome
from fablaunch.hostfile import Host
from fablaunch.launcher import make_plan
from fablaunch.plan import Plan
from fablaunch.scripts import VERSION_PROBE, job_exists, port_in_use, python_found, sh
from fablaunch.spec import DEFAULT_PORT, JobSpec, build_spec, default_python, read_spec
from fablaunch.sync import code_manifest, differing, verify_payload

from .flags import int_flag, parallel_flag, task, usage_errors

# Columns of the table and keys of --json, in this order.
CHECKS = ("ssh", "tmux", "workdir", "code", "python", "torch", "cuda", "nccl", "gpus", "port", "tcp", "clock",
          "nofile", "disk", "state_dir", "job", "py_spy")
LABELS = {"tcp": "reach master", "nofile": "open files", "py_spy": "py-spy", "disk": "disk free",
          "state_dir": "~/.fablaunch"}
VERSIONS = ("python", "torch", "cuda", "nccl")  # compared across hosts
# Ranks on different torch or NCCL versions speak different wire protocols: rendezvous or the first
# collective fails or hangs. A different python or CUDA build alone usually runs, so it only warns.
MUST_MATCH = ("torch", "nccl")

CLOCK_WARN_S = 1.0  # torch's timeouts and log times across hosts go wrong well before this matters
NOFILE_WARN = 4096  # the common default of 1024 runs out with DataLoader workers and many NCCL sockets
DISK_WARN_GIB = 10.0  # less than a few checkpoints of a mid-sized model
# Every job's scripts, logs, exit records and error files go under ~/.fablaunch: without room there a
# launch fails half-way, or a job runs and its logs and exit records are cut off. A chatty job logs
# hundreds of MB.
STATE_FAIL_MIB = 100
STATE_WARN_MIB = 1024
TMUX_TESTED = (3, 2)
PROBE_SECONDS = 120  # importing torch from a cold NFS can take long; a hung import must not hang doctor
CONNECT_SECONDS = 5
LISTEN_SECONDS = 60  # the listener ends by itself after this, whatever happens to doctor
PY_SPY_HINT = "pip install py-spy (fab dump needs it)"

# The temporary listener on the master: binds MASTER_PORT like torch's store, accepts `expect`
# connections, and ends after `limit` seconds or as soon as its output breaks (doctor gone). argv[1]
# is a token that only this run's listener carries, so cleanup finds exactly it.
LISTENER = """\
import os, select, socket, sys, time
port, expect, limit = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("", port))
except Exception as e:
    print("listen=failed: %s" % e)
    sys.exit(3)
s.listen(128)
print("listen=ready %d" % os.getpid())
end, seen = time.time() + limit, 0
while seen < expect and time.time() < end:
    if select.select([s], [], [], 0.5)[0]:
        s.accept()[0].close()
        seen += 1
    try:
        sys.stdout.write("\\n")
        sys.stdout.flush()
    except Exception:
        break
print("accepted=%d" % seen)
"""


@dataclass(frozen=True)
class Check:
    """One check on one host: ok, warn, fail or skip (not applicable, or not reached)."""

    status: str
    value: Any = None
    text: str = ""  # the table cell
    message: str = ""  # why it is not ok, for the list under the table

    def as_json(self) -> dict[str, Any]:
        return {"status": self.status, "value": self.value, "message": self.message}


def ok(value: Any, text: str | None = None) -> Check:
    return Check("ok", value, str(value) if text is None else text)


def warn(value: Any, text: str, message: str) -> Check:
    return Check("warn", value, text, message)


def fail(value: Any, text: str, message: str) -> Check:
    return Check("fail", value, text, message)


def skip(message: str = "") -> Check:
    return Check("skip", None, "-", message)


# --- payloads ---------------------------------------------------------------------------------------------


# Whether ~/.fablaunch can be written (by creating and removing a directory in it, or in its nearest
# existing parent, where a launch would create it: doctor leaves nothing behind) and its free space.
# `test -w` is not enough: root passes it whatever a directory's mode, and it knows nothing of quotas.
STATE_DIR_LINES = [
    'say state_path "$HOME/.fablaunch"',
    'if [ -e "$HOME/.fablaunch" ] && [ ! -d "$HOME/.fablaunch" ]; then say state_write "not a directory"; else',
    '  d="$HOME/.fablaunch/jobs"; while [ ! -d "$d" ] && [ "$d" != / ] && [ -n "$d" ]; do d=$(dirname "$d"); done',
    '  if err=$({ t=$(mktemp -d "$d/.fablaunch-doctor-XXXXXX") && rmdir "$t"; } 2>&1); then say state_write ok;',
    "  else say state_write \"$(printf '%s\\n' \"$err\" | tail -n 1)\"; fi",
    "  say state_kb \"$(df -Pk \"$d\" 2>/dev/null | awk 'NR == 2 {print $4}')\"",
    "fi",
]


def host_payload(workdir: str, python: str, job: str | None, port: int | None, master_addr: str) -> str:
    """Every per-host check as one bash script printing `key=value` lines (see `parse_fields`).

    No check stops the others, so one round trip reports everything wrong with a host. `port` is
    given for the master only: the other hosts never bind it.
    """
    wd, py = sh(workdir), sh(python)
    lines = [
        "say() { printf '%s=%s\\n' \"$1\" \"$(printf '%s\\n' \"$2\" | head -n 1)\"; }",
        "bounded() { if command -v timeout >/dev/null 2>&1; then timeout \"$@\"; else shift; \"$@\"; fi; }",
        'say tmux "$(tmux -V 2>/dev/null)"',
        f"if [ -d {wd} ]; then say workdir ok; "
        f"say disk_kb \"$(df -Pk {wd} 2>/dev/null | awk 'NR == 2 {{print $4}}')\"; else say workdir missing; fi",
        'say nofile "$(ulimit -n)"',
        *STATE_DIR_LINES,
        f"if {python_found(python)}; then",
        f"  say python_path \"$(command -v {py})\"",
        f"  out=$(cd {wd} 2>/dev/null; bounded {PROBE_SECONDS} {py} -c {sh(VERSION_PROBE)} 2>&1); rc=$?",
        "  printf '%s\\n' \"$out\" | grep -E '^(python|torch|torch_error|cuda|nccl)='",
        '  say python_rc "$rc"',
        "  [ \"$rc\" = 0 ] || say python_error \"$(printf '%s\\n' \"$out\" | tail -n 1)\"",
        "else say python_path ''; fi",
        "if command -v nvidia-smi >/dev/null 2>&1; then",
        "  out=$(bounded 30 nvidia-smi --query-gpu=name --format=csv,noheader 2>&1); rc=$?",
        "  if [ \"$rc\" = 0 ]; then say gpus \"$(printf '%s\\n' \"$out\" | grep -c .)\"; say gpu_name \"$out\";",
        "  else say gpu_error \"$(printf '%s\\n' \"$out\" | tail -n 1)\"; fi",
        "else say gpus none; fi",
        # py-spy installed into the job's venv is often not on a non-login shell's PATH: look there too.
        f"spy=$(command -v py-spy 2>/dev/null); bin=$(dirname \"$(command -v {py} 2>/dev/null || echo /)\")",
        '[ -n "$spy" ] || [ ! -x "$bin/py-spy" ] || spy="$bin/py-spy"',
        "say py_spy \"$([ -n \"$spy\" ] && \"$spy\" --version 2>/dev/null)\"",
    ]
    if job:
        lines.append(f"if {job_exists(job)}; then say job running; else say job none; fi")
    if port is not None:
        lines.append(f"if {port_in_use(port, master_addr, python)}; then say port used; else say port free; fi")
    return "\n".join([*lines, ""])


def connect_payload(address: str, port: int, seconds: int = CONNECT_SECONDS) -> str:
    """Open a TCP connection to MASTER_ADDR:MASTER_PORT from this host; print `tcp=ok` or why not."""
    return "\n".join([
        f"err=$(timeout {seconds} bash -c 'exec 3<>\"/dev/tcp/$0/$1\"' {sh(address)} {port} 2>&1); rc=$?",
        'if [ "$rc" = 0 ]; then echo tcp=ok;',
        f'elif [ "$rc" = 124 ]; then echo "tcp=timed out after {seconds} s";',
        "else echo \"tcp=$(printf '%s\\n' \"$err\" | head -n 1)\"; fi",
        "",
    ])


def listener_payload(token: str, python: str, port: int, expect: int, limit: float = LISTEN_SECONDS) -> str:
    """Run the temporary listener on the master with the job's interpreter, else any python there."""
    pythons = " ".join(sh(p) for p in dict.fromkeys([python, "python3", "python"]))
    return "\n".join([
        f"for py in {pythons}; do",
        "  command -v \"$py\" >/dev/null 2>&1 &&",
        f"    exec \"$py\" -u -c {sh(LISTENER)} {sh(token)} {port} {expect} {limit}",
        "done",
        "echo 'listen=failed: no python on the master to listen with'",
        "exit 127",
        "",
    ])


def stop_listener_payload(token: str) -> str:
    """Kill the listener carrying `token` (if still there) and wait until it is gone; print `left=N`.

    Matching uses bash builtins only, so no helper process carrying the token in its own command
    line can match itself.
    """
    return "\n".join([
        "pids=''",
        "for f in /proc/[0-9]*/cmdline; do",
        "  mapfile -d '' -t args < \"$f\" 2>/dev/null || continue",
        "  for a in \"${args[@]}\"; do",
        f"    if [ \"$a\" = {sh(token)} ]; then p=${{f#/proc/}}; p=${{p%/cmdline}}; kill \"$p\" 2>/dev/null;"
        " pids=\"$pids $p\"; break; fi",
        "  done",
        "done",
        "alive() { n=0; for p in $pids; do [ -r \"/proc/$p/cmdline\" ] && [ -s \"/proc/$p/cmdline\" ] && n=$((n+1));"
        " done; echo $n; }",
        "for i in $(seq 30); do [ \"$(alive)\" = 0 ] && break; sleep 0.1; done",
        "[ \"$(alive)\" = 0 ] || { kill -9 $pids 2>/dev/null; sleep 0.2; }",
        "echo \"left=$(alive)\"",
        "",
    ])


# --- parsing and judging ------------------------------------------------------------------------------------


def parse_fields(stdout: str) -> dict[str, str]:
    """`key=value` lines into a dict (the first of a key wins; other lines are ignored)."""
    fields: dict[str, str] = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[a-z_]+", key):
            fields.setdefault(key, value.strip())
    return fields


def _version(text: str) -> tuple[int, ...] | None:
    m = re.search(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def host_checks(fields: Mapping[str, str], *, workdir: str, python: str, expected_gpus: int | None,
                job: str | None, port: int | None, host: str) -> dict[str, Check]:
    """Judge one host's answer to `host_payload`: every check but ssh, tcp and clock."""
    checks: dict[str, Check] = {}

    tmux_v = fields.get("tmux", "").removeprefix("tmux ").strip()
    version = _version(tmux_v)
    if not tmux_v:
        checks["tmux"] = fail(None, "missing", "tmux is not installed (or not on the PATH of a non-login shell)")
    elif version and version < TMUX_TESTED:
        checks["tmux"] = warn(tmux_v, tmux_v, f"tmux {tmux_v} is older than {'.'.join(map(str, TMUX_TESTED))}, "
                                              "the oldest fablaunch is tested with")
    else:
        checks["tmux"] = ok(tmux_v)

    if fields.get("workdir") == "ok":
        checks["workdir"] = ok(workdir, "ok")
        checks["disk"] = _disk(fields.get("disk_kb", ""), workdir)
    else:
        checks["workdir"] = fail(workdir, "missing", f"working directory {workdir} does not exist")
        checks["disk"] = skip("no working directory")

    checks["state_dir"] = _state_dir(fields)

    nofile = fields.get("nofile", "")
    if nofile.isdigit() and int(nofile) < NOFILE_WARN:
        checks["nofile"] = warn(int(nofile), nofile, f"open-files limit (ulimit -n) is {nofile}; DataLoader workers "
                                                     f"and NCCL need more: raise it to {NOFILE_WARN} or more")
    else:
        checks["nofile"] = ok(int(nofile) if nofile.isdigit() else nofile or None, nofile or "?")

    checks.update(_python_checks(fields, python))
    checks["gpus"] = _gpus(fields, expected_gpus, checks["cuda"])

    spy = fields.get("py_spy", "")
    checks["py_spy"] = ok(spy.removeprefix("py-spy ").strip()) if spy else \
        warn(None, "missing", f"py-spy is not installed: {PY_SPY_HINT}")

    if not job:
        checks["job"] = skip("no --job given")
    elif fields.get("job") == "running":
        checks["job"] = fail(job, "running", f"job {job} is already running here: stop it, pick another --job "
                                             "or launch with --replace")
    else:
        checks["job"] = ok(job, "none")

    if port is None:
        checks["port"] = skip("checked on the master only")
    elif fields.get("port") == "used":
        checks["port"] = fail(port, f"{port} in use", f"port {port} is in use on {host}")
    elif fields.get("port") == "free":
        checks["port"] = ok(port, f"{port} free")
    else:
        checks["port"] = warn(port, "?", f"could not tell whether port {port} is free")
    return checks


def _disk(kib: str, workdir: str) -> Check:
    if not kib.isdigit():
        return warn(None, "?", f"could not read the free space in {workdir}")
    gib = round(int(kib) / 2**20, 1)
    if gib < DISK_WARN_GIB:
        return warn(gib, f"{gib:g} GiB", f"only {gib:g} GiB free in {workdir} (logs, checkpoints)")
    return ok(gib, f"{gib:g} GiB")


def _state_dir(fields: Mapping[str, str]) -> Check:
    """~/.fablaunch, where launches keep every job's files: writable, and with room for logs."""
    path = fields.get("state_path") or "~/.fablaunch"
    write, kib = fields.get("state_write"), fields.get("state_kb", "")
    if write is None:
        return warn(None, "?", f"could not check {path}")
    if write != "ok":
        why = write.rsplit(": ", 1)[-1].strip() or "unknown error"
        return fail(None, "not writable", f"{path} is not writable ({why}): a launch keeps every job's scripts, logs "
                                          "and exit records there")
    if not kib.isdigit():
        return warn(None, "?", f"could not read the free space for {path}")
    mib = int(kib) // 1024
    text = f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib} MiB"
    if mib < STATE_FAIL_MIB:
        return fail(mib, text, f"only {text} free for {path} (under {STATE_FAIL_MIB} MiB): a job's logs and exit "
                               "records would be cut off")
    if mib < STATE_WARN_MIB:
        return warn(mib, text, f"only {text} free for {path} (under {STATE_WARN_MIB} MiB): a chatty job's logs "
                               "can fill it")
    return ok(mib, text)


def _python_checks(fields: Mapping[str, str], python: str) -> dict[str, Check]:
    """The interpreter exists and runs; torch imports; its CUDA and NCCL versions."""
    if not fields.get("python_path"):
        gone = skip(f"interpreter {python} not found")
        return {"python": fail(None, "not found", f"interpreter {python} not found (give --python)"),
                "torch": gone, "cuda": gone, "nccl": gone}
    if "python" not in fields:
        why = fields.get("python_error") or f"exit code {fields.get('python_rc', '?')}"
        gone = skip(f"interpreter {python} does not run")
        return {"python": fail(None, "does not run", f"interpreter {python} does not run: {why}"),
                "torch": gone, "cuda": gone, "nccl": gone}
    checks = {"python": ok(fields["python"])}
    if "torch" in fields:
        checks["torch"] = ok(fields["torch"])
        checks["cuda"] = ok(fields.get("cuda") or None, fields.get("cuda") or "none")
        checks["nccl"] = ok(fields.get("nccl") or None, fields.get("nccl") or "none")
        return checks
    why = fields.get("torch_error") or fields.get("python_error") or "import failed"
    checks["torch"] = fail(None, "missing", f"torch cannot be imported by {python}: {why}")
    checks["cuda"] = checks["nccl"] = skip("no torch")
    return checks


def _gpus(fields: Mapping[str, str], expected: int | None, cuda: Check) -> Check:
    """GPUs nvidia-smi sees against the ranks the host file gives the host; no nvidia-smi is a CPU host."""
    if "gpu_error" in fields:
        return warn(None, "error", f"nvidia-smi fails: {fields['gpu_error']}")
    count = fields.get("gpus", "none")
    if not count.isdigit():
        return ok(None, "no GPU")
    n = int(count)
    if expected is not None and n < expected:
        return fail(n, f"{n}/{expected}",
                    f"{ui.plural(n, 'GPU')}, but the host file gives this host {ui.plural(expected, 'rank')}")
    if cuda.status == "ok" and cuda.value is None and n:
        return warn(n, str(n), f"{ui.plural(n, 'GPU')}, but torch is a CPU build (no CUDA)")
    if expected is not None and n > expected:
        return warn(n, f"{n}/{expected}", f"{ui.plural(n, 'GPU')}, but the host file uses only {expected}")
    return ok(n, f"{n}/{expected}" if expected is not None else str(n))


def code_check(fields: Mapping[str, str], manifest: bytes | None, workdir: str) -> Check:
    """The tracked files in the host's workdir against this directory's (`fablaunch.sync.verify_payload`).

    A difference is a warning, not a failure: the launch itself works, and a host may differ on
    purpose (a local patch); but ranks running different code is a classic silent hang or a wrong
    result, so it is named, with the count and one of the files.
    """
    if manifest is None:
        return Check("skip", None, "not git", "not a git checkout here: skipped")
    total = manifest.count(b"\n")
    if not total:
        return skip("no tracked files here")
    if fields.get("workdir") != "ok":
        return skip("no working directory")
    rc, diff = fields.get("code_rc"), fields.get("code_diff", "")
    if rc == "0":
        return ok(0, "matches")
    if rc == "1" and diff.isdigit() and int(diff):
        n, first = int(diff), differing(fields.get("code_first", ""))
        return warn(n, f"differs ({ui.plural(n, 'file')})",
                    f"{n} of {ui.plural(total, 'tracked file')} in {workdir} differ from this directory's "
                    f"(first: {first}): `fab sync` copies them")
    if rc == "124":
        return warn(None, "?", f"hashing the tracked files in {workdir} took too long")
    return warn(None, "?", f"could not compare the code in {workdir} (exit code {rc or '?'}: is sha256sum there?)")


def ssh_check(outcome: Outcome) -> Check:
    """Reachability, with the time to connect and run a trivial command."""
    if not outcome.reached:
        return fail(None, "unreachable", outcome.error or "unreachable")
    if not outcome.ok:
        return fail(None, "error", f"a trivial command fails: {outcome.why()}")
    if outcome.host.is_local:
        return ok(0.0, "local")
    return ok(round(outcome.seconds, 3), f"{outcome.seconds:.2f}s")


def clock_check(remote: str, local_end: float, seconds: float) -> Check:
    """Compare a host's `date +%s.%N` with this machine's clock in the middle of the round trip.

    The remote time was read somewhere within the round trip, so the offset is known to within
    half of it; only an offset beyond that uncertainty plus `CLOCK_WARN_S` is a warning.
    """
    try:
        then = float(remote.strip())
    except ValueError:
        return warn(None, "?", f"could not read the clock: {remote.strip()[:80]!r}")
    offset = then - (local_end - seconds / 2)
    text = f"{offset:+.2f}±{seconds / 2:.2f}s"
    if abs(offset) - seconds / 2 > CLOCK_WARN_S:
        return warn(round(offset, 3), text, f"clock is {offset:+.1f} s off this machine's (is NTP running?)")
    return ok(round(offset, 3), text)


def tcp_check(stdout: str, address: str, port: int) -> Check:
    """The answer of `connect_payload`."""
    result = parse_fields(stdout).get("tcp", "")
    if result == "ok":
        return ok(f"{address}:{port}", "ok")
    why = result.removeprefix("bash: ").strip() or stdout.strip() or "no answer"
    return fail(f"{address}:{port}", "fails", f"cannot connect to MASTER_ADDR:MASTER_PORT {address}:{port}: {why}")


def compare_versions(results: Mapping[str, Mapping[str, Check]]) -> dict[str, dict[str, Check]]:
    """Mark python/torch/CUDA/NCCL versions that differ from the other hosts' (hosts in rank order).

    The reference is the most common value (the first host's on a tie); a host that differs gets a
    warning naming it, or a failure for torch and NCCL (see MUST_MATCH).
    """
    out = {host: dict(checks) for host, checks in results.items()}
    for name in VERSIONS:
        values = {h: c[name].value for h, c in out.items() if name in c and c[name].status == "ok"}
        if len(set(values.values())) < 2:
            continue
        counts = Counter(values.values())
        top = max(counts.values())
        reference = next(v for v in values.values() if counts[v] == top)
        where = next(h for h, v in values.items() if v == reference)
        others = f" and {ui.plural(top - 1, 'other host')}" if top > 1 else ""
        for host, value in values.items():
            if value != reference:
                out[host][name] = replace(out[host][name], status="fail" if name in MUST_MATCH else "warn",
                                          message=f"{name} {value or 'none'} differs from {reference or 'none'} "
                                                  f"on {where}{others}")
    return out


def unreached(why: str) -> dict[str, Check]:
    """Every check of a host that could not be asked."""
    return {name: skip(f"not checked: {why}") for name in CHECKS if name != "ssh"}


def exit_code(results: Mapping[str, Mapping[str, Check]]) -> int:
    """1 if any check failed (a launch would fail or hang), else 0 (warnings included)."""
    return 1 if any(c.status == "fail" for checks in results.values() for c in checks.values()) else 0


def as_json(results: Mapping[str, Mapping[str, Check]], master: str) -> list[dict[str, Any]]:
    """One object per host: `host`, `master`, and each check's status, value and message."""
    return [{"host": host, "master": host == master, **{name: checks[name].as_json() for name in CHECKS}}
            for host, checks in results.items()]


_CELL = {"ok": "{}", "warn": "[yellow]{}[/]", "fail": "[bold red]{}[/]", "skip": "[dim]{}[/]"}


def table_rows(results: Mapping[str, Mapping[str, Check]]) -> list[list[str]]:
    """Table cells as rich markup: warnings yellow, failures red; values escaped."""
    from rich.markup import escape

    return [[escape(host), *(_CELL[checks[n].status].format(escape(checks[n].text or "-")) for n in CHECKS)]
            for host, checks in results.items()]


def problems(results: Mapping[str, Mapping[str, Check]]) -> list[tuple[str, str, Check]]:
    """(host, check, Check) for every failure, then every warning."""
    found = [(h, n, c) for h, checks in results.items() for n, c in checks.items() if c.status in ("fail", "warn")]
    return sorted(found, key=lambda p: p[2].status != "fail")


def pick_hostfile(gpus: str | None, hosts: str | None, spec_data: Mapping[str, Any],
                  exists: Any = lambda p: Path(p).exists()) -> tuple[str, str]:
    """("gpus" or "hosts", path): the flag, else the spec's key, else ./gpus if it exists, else ./hosts."""
    if gpus and hosts:
        raise UsageError("--gpus/--hosts", "give one host file, not both")
    if gpus or hosts:
        return ("gpus", gpus) if gpus else ("hosts", hosts or "hosts")
    if "gpus" in spec_data and ("hosts" not in spec_data or exists(spec_data["gpus"])):
        return "gpus", spec_data["gpus"]
    if "hosts" in spec_data:
        return "hosts", spec_data["hosts"]
    return ("gpus", "gpus") if exists("gpus") else ("hosts", "hosts")


def expected_gpus(plan: Plan, host: Host) -> int | None:
    """Ranks the host file puts on a host: its lines in a gpus file, its slots in a hosts file."""
    return len(plan.on(host)) if plan.mode == "gpus" else host.slots


# --- the task ---------------------------------------------------------------------------------------------


HELP = {
    "gpus": "A gpus file (a host once per GPU) to check (default ./gpus if present, else ./hosts).",
    "hosts": "A hosts file (a node per line, optionally ` slots=N`) to check (default ./hosts).",
    "spec": "YAML job spec, as for launch: its python, port, workdir, master_addr, hosts/gpus and name are used.",
    "python": "Interpreter to check (default: `python` on this PATH, as launch uses).",
    "workdir": "Working directory to check on every host (default: the directory fab is called from).",
    "port": f"MASTER_PORT to check: free on the first host and reachable from all (default {DEFAULT_PORT}).",
    "master_addr": "Address the hosts reach the first host at (default: the first host as ssh resolves it).",
    "job": "Also fail if a job of this name is already running on a host.",
    "parallel": "Hosts contacted at once (default 32).",
    "json": "Print a JSON list, one object per host with each check's status, value and message.",
    "slurm": "Check Slurm instead of ssh hosts: reachable, partition up, idle nodes, and on the nodes the "
             "interpreter, torch, NCCL, GPUs and the shared directory.",
    "gpus_per_node": "With --slurm: GPUs each node must have; checks them (nvidia-smi) and that torch has NCCL.",
    "nodes": "With --slurm: how many nodes a launch would ask for (default 1).",
    "partition": "With --slurm: the partition to check (default: the cluster's default).",
    "logdir": "With --slurm: the shared directory to check (default .fablaunch/slurm here).",
}


def _targets(c: Any, gpus: str | None, hosts: str | None, spec: str | None,
             **flags: Any) -> tuple[Plan, str, JobSpec]:
    """The hosts, master address, port, workdir and interpreter a launch with these options would use.

    Planning as a launch does (the command is a stand-in, never run) gives the same MASTER_ADDR, the
    same refusals of unusable host files, and the ranks per host that GPU counts are checked against.
    """
    data = read_spec(spec) if spec else {}
    mode, path = pick_hostfile(gpus, hosts, data)
    job_spec = build_spec(spec, ["true"], **{mode: path}, **flags)
    plan = make_plan(c.config, mode, job_spec, job_spec.name or "doctor")
    return plan, job_spec.python or default_python(), job_spec


def check_hosts(ex: Executor, plan: Plan, python: str, job: str | None) -> dict[str, dict[str, Check]]:
    """Run every check on every host; return checks per host spec, hosts in rank order."""
    hosts, master = list(plan.hosts), plan.hosts[0]
    with ui.progress("doctor: connecting", len(hosts)) as advance:
        reach = ex.run({h: ("date +%s.%N", None) for h in hosts}, on_done=advance)
    results = {h.spec: {"ssh": ssh_check(reach[h.spec])} for h in hosts}
    live = [h for h in hosts if reach[h.spec].ok]
    for h in hosts:
        if h not in live:
            results[h.spec].update(unreached(results[h.spec]["ssh"].message))
    # The code check rides in the same round trip: this directory's tracked files, hashed here, checked there.
    manifest = code_manifest(Path.cwd())
    verify = "" if manifest is None else verify_payload(plan.workdir, manifest)
    with ui.progress("doctor: checking hosts", len(live)) as advance:
        answers = ex.run({h: (REMOTE_SHELL, host_payload(plan.workdir, python, job, plan.port if h == master else None,
                                                         plan.master_addr) + verify) for h in live}, on_done=advance)
    for h in live:
        o = answers[h.spec]
        if o.reached:
            results[h.spec].update(host_checks(parse_fields(o.stdout), workdir=plan.workdir, python=python,
                                               expected_gpus=expected_gpus(plan, h), job=job,
                                               port=plan.port if h == master else None, host=h.spec))
            results[h.spec]["code"] = code_check(parse_fields(o.stdout), manifest, plan.workdir)
        else:  # lost between the two round trips
            results[h.spec]["ssh"] = fail(None, "unreachable", o.why())
            results[h.spec].update(unreached(o.why()))
    live = [h for h in live if answers[h.spec].reached]
    for spec, check in _clocks(ex, live).items():
        results[spec]["clock"] = check
    for spec, check in _reach_master(ex, plan, python, live, results).items():
        results[spec]["tcp"] = check
    return compare_versions(results)


def _clocks(ex: Executor, hosts: list[Host]) -> dict[str, Check]:
    """Each host's clock against this machine's, over the warm connections.

    The local clock is read just before the command is sent and when its output arrives (not when
    the command's exit is noticed, which can come later), so the uncertainty is one short round trip.
    """

    def one(host: Host) -> Check:
        arrived: list[float] = []
        start = time.time()
        outcome = ex.run_one(host, "date +%s.%N", None, lambda _line: arrived.append(time.time()))
        # The time, not the exit code, is the answer.
        if not outcome.reached or not outcome.stdout.strip():
            return warn(None, "?", f"could not read the clock: {outcome.why()}")
        end = arrived[0] if arrived else time.time()
        return clock_check(outcome.stdout, end, end - start)

    return ex.each(one, hosts)


def _reach_master(ex: Executor, plan: Plan, python: str, hosts: list[Host],
                  results: Mapping[str, Mapping[str, Check]]) -> dict[str, Check]:
    """Every host opens a TCP connection to MASTER_ADDR:MASTER_PORT, served by a temporary listener.

    The listener is killed afterwards whatever happens (an error, Ctrl-C); it also ends by itself
    once every host connected, after LISTEN_SECONDS, or when its connection to doctor breaks.
    """
    master = plan.hosts[0]
    port_check = results[master.spec].get("port")
    if master not in hosts:
        return {h.spec: skip("the master was not reached") for h in hosts}
    if port_check is None or port_check.status != "ok":
        return {h.spec: skip(f"port {plan.port} is not free on the master") for h in hosts}
    token = f"fablaunch-doctor-{secrets.token_hex(8)}"
    ready = threading.Event()
    said: list[str] = []

    def on_output(line: str) -> None:
        if line.startswith("listen="):
            said.append(line.strip())
            ready.set()

    def serve() -> None:
        try:
            ex.run_one(master, REMOTE_SHELL, listener_payload(token, python, plan.port, len(hosts)), on_output)
        finally:
            ready.set()

    thread = threading.Thread(target=serve, name="fablaunch-doctor-listener", daemon=True)
    thread.start()
    try:
        ready.wait(60)
        if not said or not said[0].startswith("listen=ready"):
            why = said[0].removeprefix("listen=") if said else "it did not start"
            return {h.spec: warn(None, "?", f"could not open a test listener on the master: {why}") for h in hosts}
        outcomes = ex.run({h: (REMOTE_SHELL, connect_payload(plan.master_addr, plan.port)) for h in hosts})
    finally:
        ex.run_one(master, REMOTE_SHELL, stop_listener_payload(token))
        thread.join(10)
    return {s: tcp_check(o.stdout, plan.master_addr, plan.port) if o.reached else skip(o.why())
            for s, o in outcomes.items()}


def report(results: Mapping[str, Mapping[str, Check]], plan: Plan) -> None:
    """The table, then one line per failure and warning."""
    columns = ("host", *(LABELS.get(n, n) for n in CHECKS))
    # The cells are escaped markup, coloured by status. Every check's cell keeps its width; where they do
    # not fit side by side (80 columns), each host's checks go under it as `check: value`.
    ui.table(f"fab doctor: {ui.plural(len(results), 'host')}, master {plan.master_addr}:{plan.port}, "
             f"workdir {plan.workdir}", columns, table_rows(results), markup=True, key_columns=("host",),
             free_columns=())
    for host, name, check in problems(results):
        ui.say(f"{check.status.upper()} {host} {LABELS.get(name, name)}: {check.message}",
               "red" if check.status == "fail" else "yellow")


@task(name="doctor", help=HELP)
@usage_errors
def doctor_(c, gpus=None, hosts=None, spec=None, python=None, workdir=None, port=None, master_addr=None, job=None,
           parallel=None, json_=False, slurm=False, nodes=None, partition=None, logdir=None, gpus_per_node=None):
    """Check every host for what would make a launch fail or a job hang; exit 1 if anything would.

    Per host, in parallel: ssh (connect time), tmux, working directory and free disk, the code there
    (this directory's tracked files, by sha256: a difference warns), ~/.fablaunch
    (writable, at least 100 MiB free, else it fails; under 1 GiB warns), the interpreter,
    python/torch/CUDA/NCCL versions (the same on every host), GPUs (nvidia-smi) against the host file,
    clock offset, open-files limit, py-spy, a running job of --job's name; MASTER_PORT free on the
    first host, and a TCP connection from every host to MASTER_ADDR:MASTER_PORT (a temporary listener).
    Warnings (yellow) exit 0.
    """
    if slurm:
        return _doctor_slurm(spec, python, job, nodes, partition, logdir, gpus_per_node, json_)
    if nodes is not None or partition is not None or logdir is not None or gpus_per_node is not None:
        raise UsageError("--nodes/--partition/--logdir/--gpus-per-node", "these check a Slurm cluster: add --slurm")
    plan, interpreter, job_spec = _targets(c, gpus, hosts, spec, name=job, python=python, workdir=workdir,
                                           port=int_flag(port, "--port"), master_addr=master_addr,
                                           parallel=parallel_flag(parallel) if parallel is not None else None)
    try:
        with Executor(c.config, job_spec.parallel, deadline=60) as ex:
            results = check_hosts(ex, plan, interpreter, job_spec.name)
    except KeyboardInterrupt:
        raise Exit("fablaunch: doctor interrupted", code=130) from None
    if json_:
        print(json.dumps(as_json(results, plan.hosts[0].spec), indent=2))
    else:
        report(results, plan)
    if exit_code(results):
        failed = sorted({h for h, _, c in problems(results) if c.status == "fail"}, key=list(results).index)
        raise Exit(f"fablaunch: doctor: checks failed on {', '.join(failed)}; a launch would fail or hang", code=1)


def _doctor_slurm(spec: str | None, python: str | None, job: str | None, nodes: str | None, partition: str | None,
                  logdir: str | None, gpus_per_node: str | None, as_json: bool) -> None:
    """`doctor --slurm`: Slurm, the partition, idle nodes, and on the nodes the interpreter, torch, NCCL, GPUs
    and the shared directory."""
    from fablaunch import slurm

    opts = {k: v for k, v in (("nodes", nodes), ("partition", partition), ("logdir", logdir),
                              ("gpus_per_node", gpus_per_node)) if v is not None}
    p = slurm.plan(build_spec(spec, ["doctor.py"], python=python, name=job, slurm=opts or None), "gpus")
    checks = slurm.doctor(p)
    if as_json:
        print(json.dumps([{"check": n, "status": st, "detail": d} for n, st, d in checks], indent=2))
    else:
        ui.table("Slurm doctor", ("check", "status", "detail"), checks,
                 [{"ok": "green", "warn": "yellow"}.get(st, "red") for _, st, _ in checks],
                 key_columns=("check", "status"), free_columns=("detail",))
    if any(st == "fail" for _, st, _ in checks):
        raise Exit("fablaunch: doctor --slurm: checks failed; a launch would fail", code=1)
