"""The shell that runs on the hosts: session scripts and the per-host payloads.

A host receives one payload on the stdin of `bash -s`, so secrets never appear in any command line,
and the whole per-host work (checks, files, every tmux session) is one SSH round trip. Session
scripts are written to the host (mode 0600) and run from there, so a user can read exactly what ran.
Files travel base64-encoded, all of a host's in one block decoded by one process (forks are what a
64-host launch on busy hosts pays for): no here-document delimiter can collide with the user's
arguments, and any byte but NUL survives.
"""

from __future__ import annotations

import base64
import json
import re
import shlex

from . import tmux
from .executor import hold_line
from .hostfile import Host
from .plan import TAG_VAR, Plan, RemotePath, Session, tag

_SECRET = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL|AUTH|PRIVATE", re.I)
MASK = "*****"
EXISTS_CODE = 5  # a launch payload's exit code when the job already has sessions on the host


def sh(value: str) -> str:
    """Quote one word for bash; a RemotePath expands `~` on the host where it runs."""
    if isinstance(value, RemotePath) and value.startswith("~/"):
        return '"$HOME"/' + shlex.quote(value[2:])
    return shlex.quote(value)


def encode(text: str) -> bytes:
    """Encode text that may carry undecodable argv bytes (surrogateescape) back to those bytes."""
    return text.encode("utf-8", "surrogateescape")


def is_secret(key: str) -> bool:
    return bool(_SECRET.search(key))


def describe(session: Session) -> str:
    if session.rank is None:
        return f"node {session.node} (torchrun agent)"
    return f"rank {session.rank} (local rank {session.local_rank})"


def session_script(plan: Plan, session: Session, launched: str, mask: bool = False) -> str:
    """The script one tmux session runs: environment, working directory, command, log, exit record."""
    exports = [
        f"export {key}={MASK if mask and is_secret(key) else sh(value)}" for key, value in session.env
    ]
    command = " ".join(sh(arg) for arg in session.argv)
    return "\n".join([
        "#!/bin/bash",
        f"# fablaunch job {plan.job}: {describe(session)} on {session.host.spec}, launched {launched}.",
        "# fab status, logs and errors read the files beside this script.",
        *exports,
        f"log={sh(session.log)}",
        f"exit_file={sh(session.exit_file)}",
        "# Stay alive when a signal stops the rank, to record how it ended. A handler, unlike an",
        "# ignored signal, is reset on exec, so the rank itself still gets the default action.",
        "trap : INT TERM HUP",
        "# bash 5 reads the clock without a fork; EPOCHREALTIME follows the locale's decimal point.",
        "start_time=${EPOCHREALTIME:-$(date +%s.%N)}; start_time=${start_time/,/.}",
        "finish() {",
        "  local end_time=${EPOCHREALTIME:-$(date +%s.%N)}",
        "  printf '{\"exit_code\": %d, \"start_time\": %s, \"end_time\": %s}\\n' \\",
        "    \"$1\" \"$start_time\" \"${end_time/,/.}\" > \"$exit_file.tmp\"",
        '  mv -f "$exit_file.tmp" "$exit_file"',
        '  exit "$1"',
        "}",
        f"cd {sh(plan.workdir)} || {{",
        f"  echo {sh(f'fablaunch: working directory {plan.workdir} does not exist on {session.host.spec}')}"
        ' | tee -a "$log" >&2',
        "  finish 1",
        "}",
        f'{command} 2>&1 | tee -ia "$log"',
        'finish "${PIPESTATUS[0]}"',
        "",
    ])


def manifest(plan: Plan, sessions: list[Session], launched: str) -> str:
    """What a host needs to know about its part of a job, for status from any machine."""
    return json.dumps({
        "job": plan.job,
        "mode": plan.mode,
        "host": sessions[0].host.spec,
        "launched": launched,
        "workdir": plan.workdir,
        "command": list(plan.command),
        "master": f"{plan.master_addr}:{plan.port}",
        "sessions": [session_record(s) for s in sessions],
    }, indent=2) + "\n"


def session_record(session: Session) -> dict[str, object]:
    return {
        "session": session.name, "host": session.host.spec, "rank": session.rank, "node": session.node,
        "local_rank": session.local_rank, "log": session.log, "exit_file": session.exit_file,
        "error_file": session.error_file, "script": session.script,
    }


def write_files(files: list[tuple[str, str]]) -> list[str]:
    """Shell lines that write every (path, content): one base64 block of `printf` builtins, one decoder."""
    snippet = "".join(f"printf '%s' {sh(content)} > {path} || exit 3\n" for path, content in files)
    data = base64.b64encode(encode(snippet)).decode()
    wrapped = "\n".join(data[i:i + 76] for i in range(0, len(data), 76))
    return ["eval \"$(base64 -d <<'FABLAUNCH_B64'", wrapped, "FABLAUNCH_B64", ')"']


def python_found(python: str) -> str:
    """A shell test, true when the interpreter exists here: an executable path, or a command on the PATH."""
    return f"[ -x {sh(python)} ]" if python.startswith("/") else f"command -v {sh(python)} >/dev/null 2>&1"


# Exits 0 when TCP port argv[1] can be bound on every address, 3 when something holds it. It binds
# the way torch's TCPStore does (wildcard, SO_REUSEADDR), so a port in TIME_WAIT counts as free and
# a listener on any one address of the host counts as taken. Python 2 syntax too: any `python` works.
PORT_PROBE = (
    "import errno, socket, sys\n"
    "s = socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "try:\n"
    "    s.bind(('', int(sys.argv[1])))\n"
    "except Exception as e:\n"
    "    sys.exit(3 if getattr(e, 'errno', None) == errno.EADDRINUSE else 4)\n"
)


def port_in_use(port: int, address: str, python: str | None) -> str:
    """A shell test, true when something already holds TCP `port` on this host.

    A bind test needs an interpreter, and the job's may be the one that is missing, so any python on
    the PATH will do; without one, a listener that accepts on `address` or loopback counts as taken.
    Each probe is bounded in time: a wedged interpreter (or a wrapper that never exits) must not hang
    the launch.
    """
    pythons = " ".join(sh(p) for p in dict.fromkeys([*([python] if python else []), "python3", "python"]))
    return (
        f"( for py in {pythons}; do command -v \"$py\" >/dev/null 2>&1 || continue; "
        f"timeout 10 \"$py\" -c {sh(PORT_PROBE)} {port} 2>/dev/null; rc=$?; "
        '[ "$rc" = 3 ] && exit 0; [ "$rc" = 0 ] && exit 1; done; '
        f"for a in 127.0.0.1 {sh(address)}; do "
        f"timeout 3 bash -c 'exec 3<>\"/dev/tcp/$0/$1\"' \"$a\" {port} 2>/dev/null && exit 0; done; exit 1 )"
    )


def _checks(plan: Plan, python: str | None) -> list[str]:
    """Read-only checks that a host can run its part; each failure prints `check: message`."""
    lines = [
        "fail=0",
        "problem() { echo \"$1\"; fail=1; }",
        "command -v tmux >/dev/null 2>&1 || problem 'tmux: not installed (or not on the PATH of a non-login shell)'",
        f"[ -d {sh(plan.workdir)} ] || problem {sh(f'workdir: {plan.workdir} does not exist')}",
    ]
    if python:
        lines.append(f"{python_found(python)} || problem {sh(f'python: {python} not found')}")
    return lines


def job_exists(job: str, host: str | None = None) -> str:
    """A shell test that is true when the job has sessions on this tmux server (tagged for `host`, if given)."""
    return f"{tmux.list_command(job, host)} | grep -q ."


def preflight_payload(plan: Plan, python: str | None, check_port: bool = False, held: bool = False) -> str:
    """Check a host before anything is launched anywhere: exit 0, or print `check: message` lines.

    `check_port` (for the master host only) also fails when MASTER_PORT is taken there: the job's
    rendezvous would fail at once or, worse, its ranks would meet another job's store.
    `held` ends with the executor's hold line instead of exiting, so the same shell then runs the
    launch payload: the checks cost no second remote shell. Its checks read nothing of stdin,
    which holds the rest of the script.
    """
    master = plan.hosts[0].spec
    port = [f"if {port_in_use(plan.port, plan.master_addr, python)}; then "
            f"problem {sh(f'port: port {plan.port} is in use on {master}')}; fi"] if check_port else []
    checks = [
        *_checks(plan, python),
        *port,
        f"if {job_exists(plan.job)}; then echo {sh(f'exists: job {plan.job} already has sessions here')}; fi",
    ]
    if held:
        return "\n".join(["{", *checks, "} </dev/null", hold_line('"$fail"'), ""])
    return "\n".join([*checks, 'exit "$fail"', ""])


def launch_payload(plan: Plan, sessions: list[Session], launched: str, readable: bool = False) -> str:
    """Write a host's scripts and manifest and start all its sessions in one tmux call.

    `readable` replaces the encoded files by a note, for `--dry-run` (which shows them decoded).
    """
    host = sessions[0].host
    dir_ = plan.host_dir(host)
    lines = [
        "set -u",
        "umask 077",
        *_checks(plan, None),
        '[ "$fail" = 0 ] || exit 3',
        # Only this host's sessions: preflight saw none anywhere, so any now are another launcher's race.
        f"if {job_exists(plan.job, host.spec)}; then echo {sh(f'exists: job {plan.job} already has sessions here')}; "
        f"exit {EXISTS_CODE}; fi",
        f"dir={sh(dir_)}",
        "# A relaunch under the same name keeps the earlier run's files: nothing is ever lost.",
        'if [ -e "$dir" ]; then',
        '  old="$(dirname "$dir")/.previous"; mkdir -p "$old"',
        f'  mv "$dir" "$old/{host.label}-$(date +%s.%N)" || exit 3',
        "fi",
        'mkdir -p "$dir" || exit 3',
    ]
    files = [(f'"$dir/{s.stem}.sh"', session_script(plan, s, launched)) for s in sessions]
    files.append(('"$dir/manifest.json"', manifest(plan, sessions, launched)))
    lines += [f"# writes {path} (shown below)" for path, _ in files] if readable else write_files(files)
    # umask 077 above already makes every file mode 0600.
    # The guard: if the launcher gave up (Ctrl-C) its end of stdout is gone, this write fails (or
    # SIGPIPE ends the shell), and no session starts after the rollback has already run.
    lines += ["printf 'starting\\n' || exit 3", tmux.new_sessions(plan, sessions), "rc=$?",
              f'[ "$rc" = 0 ] && echo started {len(sessions)}', 'exit "$rc"', ""]
    return "\n".join(lines)


def tagged_pids(job: str | None, host: Host) -> str:
    """A shell pipeline printing the pids of a job's processes on this host (every job's, `job` None).

    They are found by the marker every process of the job inherits, read from /proc/PID/environ, so
    grandchildren and processes that called setsid are found too, and nothing else ever is. The
    shell running the pipeline (which may carry the marker itself) is left out.
    """
    if job:
        match = f"-F -- {sh(f'{TAG_VAR}={tag(job, host)}')}"
    else:
        match = f"-E -- {sh(f'{TAG_VAR}=[A-Za-z0-9_-]+@{re.escape(host.label)}')}"
    return (f"grep -lszx {match} /proc/[0-9]*/environ 2>/dev/null | "
            "sed -n 's#^/proc/\\([0-9]*\\)/environ$#\\1#p' | grep -vx -e \"$$\" -e \"$BASHPID\"")


def kill_payload(job: str | None, host: Host, grace: float) -> str:
    """Stop every process of a job (or of every job, `job` None) on one host, then its sessions.

    Processes are found by the marker variable they all inherit (read from /proc/PID/environ), so
    grandchildren and processes that called setsid are found too, and nothing else ever is. SIGINT
    first (torchrun forwards it and training code can save), then SIGTERM, then SIGKILL.
    Prints `found=N left=M sessions=K jobs=a,b`.
    """
    return "\n".join([
        f"pids() {{ {tagged_pids(job, host)}; }}",
        "signal_all() { p=$(pids); [ -z \"$p\" ] || kill -s \"$1\" $p 2>/dev/null; }",
        "wait_gone() {",
        "  end=$(( $(date +%s%N) + $1 * 1000000 ))",
        "  while [ -n \"$(pids)\" ] && [ \"$(date +%s%N)\" -lt \"$end\" ]; do sleep 0.1; done",
        "}",
        "found=$(pids | wc -l)",
        f"jobs=$({tmux.list_command(job)} | cut -d{sh(tmux.FIELD_SEP)} -f2 | sort -u | paste -sd, -)",
        f"[ \"$found\" = 0 ] || {{ signal_all INT; wait_gone {int(grace * 1000)}; }}",
        "[ -z \"$(pids)\" ] || { signal_all TERM; wait_gone 3000; }",
        "[ -z \"$(pids)\" ] || { signal_all KILL; wait_gone 3000; }",
        "sessions=0",
        f"for s in $({tmux.list_command(job)} | cut -d{sh(tmux.FIELD_SEP)} -f1); do",
        "  tmux kill-session -t \"=$s:\" 2>/dev/null && sessions=$((sessions + 1))",
        "done",
        "echo \"found=$found left=$(pids | wc -l) sessions=$sessions jobs=$jobs\"",
        "",
    ])
