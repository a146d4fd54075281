"""The shell that runs on the hosts: session scripts and the per-host payloads.

A host receives one payload on the stdin of `bash -s`, so secrets never appear in any command line,
and the whole per-host work (checks, files, every tmux session) is one SSH round trip. Session
scripts are written to the host (mode 0600) and run from there, so a user can read exactly what ran.
Files travel as single-quoted words written by the `printf` builtin (forks are what a 64-host
launch on busy hosts pays for): no here-document delimiter can collide with the user's arguments,
and any byte but NUL survives.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Collection

from . import tmux
from .executor import hold_line
from .hostfile import Host
from .plan import JOBS_DIR, TAG_VAR, Plan, RemotePath, Session, job_dir, lock_file, on_host, tag

# Every process of a session carries these (read from /proc/PID/environ): the session it belongs to
# (so a rank whose tmux server died is still found) and the launch run that started it (so a rollback
# stops only what its own launch started, never a concurrent launch's ranks).
SESSION_VAR = "FABLAUNCH_SESSION"
RUN_VAR = "FABLAUNCH_RUN"

# Names that hold credentials by convention (DB_PASS, MYSQL_PWD, GITHUB_PAT, HF_TOKEN, ...). Masking
# too much only hides a harmless value in a dry run; masking too little prints a secret.
_SECRET = re.compile(r"TOKEN|SECRET|PASS|PWD|KEY|CREDENTIAL|AUTH|PRIVATE|(?:^|_)PAT$", re.I)
# The password of `scheme://user:password@host`, whatever the variable is called: it ends at the
# authority's last '@' (a '/', '?' or '#' ends the authority, so `http://host:8080/a@b` has none).
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/?#@:\s]*:)[^/?#\s]*(?=@)")
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


def is_secret(key: str, marked: Collection[str] = ()) -> bool:
    """Whether a variable's value is hidden in a dry run: its name looks secret or the user marked it."""
    return key in marked or bool(_SECRET.search(key))


def masked(key: str, value: str, marked: Collection[str] = (), quote: bool = True) -> str:
    """A variable's value as a dry run shows it (shell-quoted unless not `quote`): MASK for a secret,
    URL passwords masked."""
    if is_secret(key, marked):
        return MASK
    shown = _URL_PASSWORD.sub(rf"\g<1>{MASK}", value)
    if not quote:
        return str.__str__(shown)
    return sh(value if shown == value else shown)  # unchanged: keep a RemotePath's `~` expanding


def describe(session: Session) -> str:
    if session.rank is None:
        return f"node {session.node} (torchrun agent)"
    return f"rank {session.rank} (local rank {session.local_rank})"


def session_script(plan: Plan, session: Session, launched: str, mask: bool = False, run: str = "") -> str:
    """The script one tmux session runs: environment, working directory, command, log, exit record.

    It is POSIX sh, and tmux starts it with `sh`: a host starts one per rank, and bash's start-up and
    its heavier forks cost a launch about a millisecond more per rank than dash. The exit record is
    written twice in the same place: a placeholder before the command starts
    (while the disk still has room) and the real record over it at the end, through a descriptor
    opened at the start. So a full disk late in a run does not lose the exit code, and a record
    always lands in this run's file, even after a relaunch has moved the directory aside. The
    record carries the run id, checked on read, so no other run's record is ever taken for ours.
    """
    exports = [
        f"export {key}={masked(key, value, plan.secrets) if mask else sh(value)}" for key, value in session.env
    ]
    exports += [f"export {SESSION_VAR}={sh(session_marker(session))}", f"export {RUN_VAR}={sh(run)}"]
    # A dry run shows command arguments with URL passwords masked too (`--db postgres://u:pw@h/x`).
    command = " ".join(masked("", arg) if mask else sh(arg) for arg in session.argv)
    return "\n".join([
        "#!/bin/sh",
        f"# fablaunch job {plan.job}: {describe(session)} on {session.host.spec}, launched {launched}.",
        "# fab status, logs and errors read the files beside this script.",
        *exports,
        f"log={sh(session.log)}",
        f"exit_file={sh(session.exit_file)}",
        *recorded_run(command, plan.workdir, sh(session.host.spec)),
        "",
    ])


RECORD_BYTES = 255  # an exit record is padded to this size so the final write fits where the first one went
# The clock as a shell word, for a POSIX shell (no EPOCHREALTIME): JSON null where `date` fails or
# prints no number (a fork refused on a host out of processes, a date without %N).
_NOW = '$(date +%s.%N 2>/dev/null)'


def _number_or_null(var: str) -> str:
    """A shell line setting `var` to JSON null unless it holds a plain decimal number."""
    return f"case ${var} in '' | *[!0-9.]* | *.*.*) {var}=null ;; esac"


def recorded_run(command: str, workdir: str, where: str) -> list[str]:
    """The end of every session's script: placeholder exit record, `command` run in `workdir` with its
    output teed to "$log", and the final record over the placeholder. POSIX sh (bash runs it too).

    The script sets `log`, `exit_file` and FABLAUNCH_RUN first; `where` is a shell word naming the
    place in messages (a quoted host spec, or "$node" on Slurm, known only when the task starts).
    Its first argument, if any, is the start time: a launch reads the clock once for all of a host's
    sessions, where each reading its own would be a fork per rank.
    """
    def say(*parts: str) -> str:
        return "".join(sh(p) if i % 2 == 0 else p for i, p in enumerate(parts))

    return [
        "# Stay alive when a signal stops the rank, to record how it ended. A handler, unlike an",
        "# ignored signal, is reset on exec, so the rank itself still gets the default action.",
        "trap : INT TERM HUP",
        f'start_time=${{1:-{_NOW}}}',
        _number_or_null("start_time"),
        "record() {",
        f'  rec="{{\\"run\\": \\"${RUN_VAR}\\", \\"exit_code\\": $1, \\"start_time\\": $start_time, '
        '\\"end_time\\": $2}"',
        f"  printf '%-{RECORD_BYTES}s\\n' \"$rec\"",
        "}",
        'if ! record null null > "$exit_file" || ! exec 8<>"$exit_file"; then',
        f"  echo {say('fablaunch: cannot write the exit record on ', where, ' (disk full or read-only?)')}"
        " \"$exit_file\" >&2",
        "  exit 1",
        "fi",
        "finish() {",
        f'  end_time={_NOW}',
        f"  {_number_or_null('end_time')}",
        "  # Over the placeholder through fd 8, opened at the start: no new disk space, this run's file.",
        '  record "$1" "$end_time" >&8',
        '  exit "$1"',
        "}",
        f"cd {sh(workdir)} || {{",
        f"  echo {say(f'fablaunch: working directory {workdir} does not exist on ', where)}"
        ' | tee -a "$log" >&2',
        "  finish 1",
        "}",
        "# The rank's own subshell records how it ended (sh has no PIPESTATUS), so it sets the traps",
        "# again: a subshell starts without them. The rank's redirections are made in the process it",
        "# replaces, so the shell's word on a killed rank (\"Terminated\") goes to the pane, not the log.",
        "# tee outlives a hangup (a killed tmux server): the rank's output keeps reaching its log.",
        f"{{ trap : INT TERM HUP; ( exec {command} 8>&- 2>&1 ); finish \"$?\"; }}"
        " | ( trap '' HUP; exec tee -ia \"$log\" )",
        "# The script exits with the rank's code too (Slurm judges a task by it), read back from this run's",
        "# record: /dev/fd/8 opens the file anew, from its start, wherever a relaunch has moved it.",
        "read -r rec < /dev/fd/8; code=${rec#*'\"exit_code\": '}; code=${code%%,*}",
        "case $code in '' | *[!0-9]*) exit 1 ;; esac",
        'exit "$code"',
    ]


def session_marker(session: Session) -> str:
    """The value of SESSION_VAR for a session: which session of which host a process belongs to."""
    return f"{session.name}@{session.host.label}"


def manifest(plan: Plan, sessions: list[Session], launched: str, run: str = "") -> str:
    """What a host needs to know about its part of a job, for status from any machine."""
    return json.dumps({
        "job": plan.job,
        "run": run,
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
    """Shell lines that write every (path, content) with the `printf` builtin: no process per file.

    Each content is one single-quoted word, so any byte but NUL arrives as it is, and no delimiter of
    a here-document can collide with the user's arguments.
    """
    return [f"printf '%s' {sh(content)} > {path} || {{ echo \"write: cannot write \"{path}\" "
            "(disk full or read-only?)\"; exit 3; }" for path, content in files]


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


def port_in_use(port: int | str, address: str, python: str | None) -> str:
    """A shell test, true when something already holds TCP `port` (a number, or a shell word) on this host.

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
        f"if [ ! -d {sh(plan.workdir)} ]; then problem {sh(f'workdir: {plan.workdir} does not exist')}; "
        f"elif [ ! -w {sh(plan.workdir)} ]; then problem {sh(f'workdir: {plan.workdir} is not writable')}; fi",
        # Every rank's script, log and exit record go here: a read-only or full home fails now, not mid-run.
        # mkdir only where it is missing: a process less on every launch but a host's first.
        f'{{ [ -d {sh(RemotePath(JOBS_DIR))} ] || mkdir -p {sh(RemotePath(JOBS_DIR))} 2>/dev/null; }} '
        f'&& [ -w {sh(RemotePath(JOBS_DIR))} ] '
        f"|| problem {sh(f'home: cannot write {JOBS_DIR} (read-only home?)')}",
    ]
    if python:
        lines.append(f"{python_found(python)} || problem {sh(f'python: {python} not found')}")
    return lines


def _script_check(plan: Plan) -> list[str]:
    """A `.py` entry point must exist on the host: a missing one fails every rank a second after launch."""
    script = plan.command[0]
    if not script.endswith(".py"):
        return []
    path = script if script.startswith("/") else on_host(f"{plan.workdir.rstrip('/')}/{script}")
    # Only where the workdir exists: a missing workdir is the one problem to name then.
    return [f"[ ! -d {sh(plan.workdir)} ] || [ -f {sh(path)} ] || problem {sh(f'script: {path} not found')}"]


def job_exists(job: str, host: Host | None = None) -> str:
    """A shell test, true when the job is alive here: tagged sessions (for `host`, if given) or processes.

    Processes count as much as sessions: a rank whose tmux server died still holds its GPU and must
    block a second copy of the job as surely as a live session does. They are looked for only where
    the job has a directory on this host: every process of the job started from a script in it, and
    the directory goes only with a prune, which refuses while anything of the job is alive. The scan
    reads every process's environment, which is most of a launch's own work on a busy host (run
    twice per host per launch); a new job's name, the usual case, skips it.
    """
    sessions = f'[ -n "$({tmux.list_command(job, host.spec if host else None)})" ]'  # no grep: a process less
    if host is None:
        return sessions
    return f"{{ {sessions} || {{ [ -e {sh(job_dir(job, host))} ] && [ -n \"$({tagged_pids(job, host)})\" ]; }}; }}"


def preflight_payload(plan: Plan, python: str | None, check_port: bool = False, held: bool = False,
                      host: Host | None = None) -> str:
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
        *_script_check(plan),
        *port,
        f"if {job_exists(plan.job, host)}; then echo {sh(f'exists: job {plan.job} is already running here')}; fi",
    ]
    if held:
        return "\n".join(["{", *checks, "} </dev/null", hold_line('"$fail"'), ""])
    return "\n".join([*checks, 'exit "$fail"', ""])


def launch_payload(plan: Plan, sessions: list[Session], launched: str, readable: bool = False, run: str = "",
                   checked: bool = False) -> str:
    """Write a host's scripts and manifest and start all its sessions in one tmux call.

    The check that the job is not already here and the start of its sessions run under a lock per
    job and host, so two launches of one name never both start here. `readable` replaces the
    encoded files by a note, for `--dry-run` (which shows them decoded). `checked`: the same shell
    has just passed the preflight's checks (a held shell), which are then not run again.
    """
    host = sessions[0].host
    dir_ = plan.host_dir(host)
    lines = [
        "set -u",
        "umask 077",
        *([] if checked else [*_checks(plan, None), '[ "$fail" = 0 ] || exit 3']),
        f"dir={sh(dir_)}",
        f'mkdir -p "${{dir%/*}}" && exec 9>>{sh(lock_file(plan.job, host))} || exit 3',
        "if command -v flock >/dev/null 2>&1 && ! flock -w 60 9; then",
        f"  echo {sh(f'exists: another launch of job {plan.job} holds its lock here')}; exit {EXISTS_CODE}",
        "fi",
        # Preflight saw no job anywhere, so one here now is another launcher's: refuse, touch nothing.
        f"if {job_exists(plan.job, host)}; then echo {sh(f'exists: job {plan.job} is already running here')}; "
        f"exit {EXISTS_CODE}; fi",
        "# A relaunch under the same name keeps the earlier run's files: nothing is ever lost.",
        'if [ -e "$dir" ]; then',
        '  old="$(dirname "$dir")/.previous"; mkdir -p "$old"',
        f'  mv "$dir" "$old/{host.label}-$(date +%s.%N)" || exit 3',
        "fi",
        'mkdir -p "$dir" || exit 3',
    ]
    files = [(f'"$dir/{s.stem}.sh"', session_script(plan, s, launched, run=run)) for s in sessions]
    files.append(('"$dir/manifest.json"', manifest(plan, sessions, launched, run)))
    lines += [f"# writes {path} (shown below)" for path, _ in files] if readable else write_files(files)
    # umask 077 above already makes every file mode 0600.
    # The guard: if the launcher gave up (a signal) its end of stdout is gone, this write fails, and
    # no session starts after the rollback has already run.
    # The lock's descriptor is closed for tmux: a tmux server started here would hold it for ever.
    # A launcher gone by now has already rolled back: what this payload wrote must go too, or status
    # would show the job it never became (SIGPIPE is ignored so that the failed write can clean up).
    # The sessions' start time, read once for all of them (see recorded_run): bash 5 reads the clock
    # without a fork, with the locale's decimal point.
    lines += ["trap '' PIPE", "printf 'starting\\n' || { rm -rf \"$dir\"; exit 3; }", "trap - PIPE",
              f"{tmux.START_VAR}=${{EPOCHREALTIME:-$(date +%s.%N)}}; {tmux.START_VAR}=${{{tmux.START_VAR}/,/.}}",
              f"{tmux.new_sessions(plan, sessions)} 9>&-", "rc=$?",
              f'[ "$rc" = 0 ] && echo started {len(sessions)}', 'exit "$rc"', ""]
    return "\n".join(lines)


def tagged_pids(job: str | None, host: Host, run: str | None = None, among: str | None = None) -> str:
    """A shell pipeline printing the pids of a job's processes on this host (every job's, `job` None).

    They are found by the marker every process of the job inherits, read from /proc/PID/environ, so
    grandchildren and processes that called setsid are found too, and nothing else ever is. `run`
    keeps only the processes one launch started. `among` (a shell word, split into pids) looks only
    at those processes, not at all of /proc. The shell running the pipeline (which may carry the
    marker itself) is left out.
    """
    if job is not None:  # "" must match nothing, never every job
        match = f"-F -- {sh(f'{TAG_VAR}={tag(job, host)}')}"
    else:
        match = f"-E -- {sh(f'{TAG_VAR}=[A-Za-z0-9_-]+@{re.escape(host.label)}')}"
    of_run = f" | xargs -r grep -lszx -F -- {sh(f'{RUN_VAR}={run}')}" if run else ""
    files = "/proc/[0-9]*/environ" if among is None else f"$(printf '/proc/%s/environ ' {among})"
    return (f"grep -lszx {match} {files} 2>/dev/null{of_run} | "
            "sed -n 's#^/proc/\\([0-9]*\\)/environ$#\\1#p' | grep -vx -e \"$$\" -e \"$BASHPID\"")


def kill_payload(job: str | None, host: Host, grace: float, run: str | None = None) -> str:
    """Stop every process of a job (or of every job, `job` None) on one host, then its sessions.

    Processes are found by the marker variable they all inherit (read from /proc/PID/environ), so
    grandchildren and processes that called setsid are found too, and nothing else ever is. SIGINT
    first (torchrun forwards it and training code can save), then SIGTERM, then SIGKILL. With `run`
    (a rollback) only that launch's processes and sessions are stopped, and its files are moved
    aside so the job it never became leaves no trace in `status`.
    Prints progress as it goes (`sent SIG N`, `remain SIG N`), how each session's processes ended
    (`ended SESSION@HOST SIG`, or `survived`), and last `found=N left=M sessions=K jobs=a,b`.
    """
    listing = tmux.list_command(job, host.spec)
    if run:  # only the sessions whose pane is one of this run's processes
        sessions = ["while IFS='|' read -r s _ _ _ _ _ pane _; do",
                    '  case " $initial " in *" $pane "*) ;; *) continue ;; esac',
                    '  tmux kill-session -t "=$s:" 2>/dev/null && sessions=$((sessions + 1))',
                    f"done < <({listing})"]
        dir_, ours = sh(job_dir(job or "", host)), sh(f'"run": "{run}"')
        sessions += [f"if grep -qF {ours} {dir_}/manifest.json 2>/dev/null; then",
                     f'  old={dir_}/../.previous; mkdir -p "$old" && '
                     f'mv {dir_} "$old/{host.label}-rolled-back-$(date +%s.%N)"',
                     "fi"]
    else:
        sessions = [f"for s in $({listing} | cut -d{sh(tmux.FIELD_SEP)} -f1); do",
                    "  tmux kill-session -t \"=$s:\" 2>/dev/null && sessions=$((sessions + 1))",
                    "done"]
    return "\n".join([
        f"pids() {{ {tagged_pids(job, host, run)}; }}",
        f"among() {{ {tagged_pids(job, host, run, among='$1')}; }}",
        # Polls only the processes signalled: a scan of all of /proc ten times a second was most of a
        # stop's cost on a busy host. Once they are gone, one full scan catches any they started since.
        "wait_gone() {",
        "  local end=$(( $(date +%s%N) + $1 * 1000000 )) w=$2",
        "  while [ \"$(date +%s%N)\" -lt \"$end\" ]; do",
        "    [ -n \"$(among \"$w\")\" ] || { w=$(pids); [ -n \"$w\" ] || return 0; }",
        "    sleep 0.1",
        "  done",
        "}",
        # The sessions that still have a process among pids $1, so that each one's end can be told by
        # signal: one grep over their environments (NUL-separated records), not two processes per pid.
        f"marks() {{ [ -n \"$1\" ] || return 0; grep -ahoz -E '^{SESSION_VAR}=[A-Za-z0-9_.@-]*$' "
        "$(printf '/proc/%s/environ ' $1) 2>/dev/null | tr '\\0' '\\n' | "
        f"sed -n 's/^{SESSION_VAR}=//p' | sort -u; }}",
        # $p: the job's processes now. One scan of /proc after each signal serves the next one, the
        # sessions' ends and the count: scans are what a stop costs on a host with many processes.
        "phase() {",
        "  n=$(printf '%s' \"$p\" | wc -w); [ \"$n\" = 0 ] && return 0",
        "  echo \"sent $1 $n\"; kill -s \"$1\" $p 2>/dev/null; wait_gone \"$2\" \"$p\"",
        "  p=$(pids); now=$(marks \"$p\"); for m in $live; do",
        "    case \" $(echo $now) \" in *\" $m \"*) ;; *) echo \"ended $m $1\" ;; esac",
        "  done; live=$now; echo \"remain $1 $(printf '%s' \"$p\" | wc -w)\"",
        "}",
        "p=$(pids)",
        "initial=$(printf '%s' \"$p\" | paste -sd' ' -)",
        "found=$(printf '%s' \"$p\" | wc -w)",
        "live=$(marks \"$p\")",
        f"jobs=$({listing} | cut -d{sh(tmux.FIELD_SEP)} -f2 | sort -u | paste -sd, -)",
        f"phase INT {int(grace * 1000)}",
        "phase TERM 3000",
        "phase KILL 3000",
        "for m in $live; do echo \"ended $m survived\"; done",
        "sessions=0",
        *sessions,
        "echo \"found=$found left=$(pids | wc -l) sessions=$sessions jobs=$jobs\"",
        "",
    ])


def prune_payload(job: str, host: Host, dry: bool) -> str:
    """Remove a finished job's files on one host (its directory, earlier runs, its lock), never a live one.

    The check runs here, at the moment of removal, under the lock a launch of the job holds on this
    host: a job relaunched since the survey, or being launched now, is left alone.
    Prints `running`, or `files=N` (what was, or with `dry` would be, removed).
    """
    base, label, lock = sh(RemotePath(f"{JOBS_DIR}/{job}")), sh(host.label), sh(lock_file(job, host))
    targets = f"{base}/{label} {base}/.previous/{label}-* {lock}"
    return "\n".join([
        f"if [ -e {lock} ] && command -v flock >/dev/null 2>&1; then",
        f"  exec 9>>{lock} && flock -n 9 || {{ echo running; exit 0; }}",
        "fi",
        f"if {job_exists(job, host)}; then echo running; exit 0; fi",
        f"files=$(find {targets} 2>/dev/null | wc -l)",
        *([] if dry else [f"rm -rf {targets}", f"rmdir {base}/.previous {base} 2>/dev/null"]),
        'echo "files=$files"',
        "",
    ])


# Prints python/torch/cuda/nccl versions as key=value lines; a torch that fails to import is a
# finding, not a crash. Runs under the job's interpreter, in the job's working directory.
VERSION_PROBE = """\
import platform
print("python=" + platform.python_version())
try:
    import torch
except Exception as e:
    print("torch_error=%s: %s" % (type(e).__name__, (str(e).splitlines() or [""])[0]))
else:
    print("torch=" + torch.__version__)
    print("cuda=" + (torch.version.cuda or ""))
    nccl = ""
    try:
        if torch.distributed.is_available() and torch.distributed.is_nccl_available():
            v = torch.cuda.nccl.version()
            nccl = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
    except Exception:
        pass
    print("nccl=" + nccl)
"""
