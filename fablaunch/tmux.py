"""tmux command lines for creating, finding and removing this project's sessions.

Sessions are tagged with user options (`@fablaunch_job` and friends) when they are created, in the
same tmux call, so later commands find exactly this project's sessions by tag and never match a
user's own session by name. Targets use `=NAME:` because a bare `-t NAME` prefix-matches.
A host's sessions start in as few tmux calls as tmux's limit on one command allows (`calls`).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable

from .errors import UsageError
from .plan import Plan, Session

# Fields read back by `list_command`, in this order. tmux prints a tab in a format as `_` when its
# client has no terminal (as over ssh), so the separator is `|`, which job names and host specs never hold.
FIELD_SEP = "|"
FIELDS = ("session_name", "@fablaunch_job", "@fablaunch_mode", "@fablaunch_host", "@fablaunch_rank",
          "@fablaunch_node", "pane_pid", "session_created")
LIST_FORMAT = FIELD_SEP.join(f"#{{{f}}}" for f in FIELDS)

# The most a tmux client can send its server as one command: every argument after `tmux` costs its
# length plus a NUL. The client packs them into one imsg of at most MAX_IMSGSIZE (16384) bytes, less
# the 16-byte imsg header and the 4-byte argc of struct msg_command (client.c, MSG_COMMAND). Measured
# with tmux 3.3a (tests/test_tmux.py does it again): 16364 bytes of arguments run, 16365 fail with
# "failed to send command" (beyond 16380: "command too long"), whether or not a server runs.
TMUX_ARGS_MAX = 16364
# What one call of ours may take: a margin for tmux builds whose headers differ.
CALL_BUDGET = TMUX_ARGS_MAX - 1024
# The remote $HOME is not known when planning, yet every session's script path holds it (the payload's
# `$dir` is "$HOME"/.fablaunch/jobs/JOB/HOST): this many bytes are reserved for it in each session.
HOME_MAX = 256
# The placeholder session's life, should the launch payload die before it can end it; and the most
# digits of the payload shell's pid in its name (Linux's pid_max is at most 4194304).
HOLD_SECONDS = 600
PID_DIGITS = 7
# The launch payload's variables: the host's job directory, and the time its sessions start (see
# scripts.launch_payload), passed to each session's script; bytes kept for that time's digits.
DIR_VAR = "dir"
START_VAR = "start"
START_BYTES = 32


def target(session: str) -> str:
    """An exact-match target for session-level commands."""
    return f"={session}:"


def tags(plan: Plan, session: Session) -> dict[str, str]:
    """The user options that mark a session as fablaunch's."""
    return {
        "@fablaunch_job": plan.job,
        "@fablaunch_mode": plan.mode,
        "@fablaunch_host": session.host.spec,
        "@fablaunch_rank": "" if session.rank is None else str(session.rank),
        "@fablaunch_node": str(session.node),
    }


def _bytes(text: str) -> int:
    # Arguments may carry undecodable bytes of the user's argv (surrogateescape), each one byte.
    return len(text.encode("utf-8", "surrogateescape"))


def _size(args: Iterable[str]) -> int:
    """What arguments take of tmux's message: each its bytes plus a NUL."""
    return sum(_bytes(a) + 1 for a in args)


def dir_bytes_max(session: Session) -> int:
    """The longest `$dir` the calls are planned for: the session's directory with a $HOME of HOME_MAX bytes."""
    return _bytes(session.dir.removeprefix("~")) + HOME_MAX


def session_commands(plan: Plan, session: Session) -> tuple[str, int]:
    """The tmux commands creating and tagging one session, as shell text, and the most bytes they send.

    new-session and its set-options stay together: tmux runs one call's commands without handling
    child exits in between, so a rank that exits at once is still tagged.
    """
    create = ["new-session", "-d", "-s", session.name, "-c", plan.workdir, "sh"]
    script = f"/{session.stem}.sh"  # after the shell's `$dir`
    tagging: list[str] = []
    for key, value in tags(plan, session).items():
        tagging += [";", "set-option", "-t", target(session.name), key, value or "-"]
    text = " ".join([*map(shlex.quote, create), f'"${DIR_VAR}{script}"', f'"${START_VAR}"',
                     *map(shlex.quote, tagging)])
    return text, _size(create) + dir_bytes_max(session) + _bytes(script) + 1 + START_BYTES + 1 + _size(tagging)


def hold_session(plan: Plan) -> tuple[str, int]:
    """A placeholder session that keeps the tmux server up between calls, as shell text and its most bytes.

    A server with no session left exits: were every rank of one call to end at once, the next call
    would meet a dying server ("server exited unexpectedly"). The shell's `$$` makes the name unique.
    """
    name = f"{plan.job}-launching-"
    args = ["new-session", "-d", "-s", "sleep", str(HOLD_SECONDS)]
    return (f"new-session -d -s {shlex.quote(name)}$$ sleep {HOLD_SECONDS}",
            _size(args) + _bytes(name) + PID_DIGITS + 1)


def _pack(items: list[tuple[str, int]]) -> list[list[str]]:
    """Commands (text, bytes) into consecutive calls of at most CALL_BUDGET bytes each."""
    calls: list[list[str]] = []
    used = 0
    for text, size in items:
        if calls and used + 2 + size <= CALL_BUDGET:  # 2: the `;` before it
            calls[-1].append(text)
            used += 2 + size
        else:
            calls.append([text])
            used = size
    return calls


def calls(plan: Plan, sessions: list[Session]) -> list[list[str]]:
    """A host's tmux calls, in rank order: each a list of commands as shell text, `;`-joined when run.

    With more than one call, the first starts with the placeholder of `hold_session`. Raises
    UsageError when one session alone does not fit (see `check_fits`).
    """
    items = [session_commands(plan, s) for s in sessions]
    _refuse_too_long(plan, sessions, [size for _, size in items])
    packed = _pack(items)
    return packed if len(packed) <= 1 else _pack([hold_session(plan), *items])


def _refuse_too_long(plan: Plan, sessions: list[Session], sizes: list[int]) -> None:
    """Raise UsageError if a session's commands alone exceed one call, naming what would fit."""
    size, session = max(zip(sizes, sessions, strict=True), key=lambda pair: pair[0])
    if size <= CALL_BUDGET:
        return
    # The longest session sets the room, so the room the message gives fits every session.
    room = _bytes(plan.workdir) - (size - CALL_BUDGET)
    limit = (f"{size} bytes, over the {CALL_BUDGET} one tmux call may take (tmux {TMUX_ARGS_MAX}-byte limit on "
             f"a command's arguments, less a margin, with {HOME_MAX} bytes kept for the remote $HOME)")
    if room <= 0:
        raise UsageError(f"host {session.host.spec}", f"too long for tmux: starting a session there takes {limit}")
    raise UsageError("--workdir", f"path too long for tmux: with this {_bytes(plan.workdir)}-byte working "
                                  f"directory, starting one session takes {limit}; at most {room} bytes fit")


def check_fits(plan: Plan) -> None:
    """Refuse, before anything starts anywhere, a plan whose sessions tmux could not start."""
    sessions = list(plan.sessions)
    _refuse_too_long(plan, sessions, [session_commands(plan, s)[1] for s in sessions])


def new_sessions(plan: Plan, sessions: list[Session]) -> str:
    """Create and tag every session of a host: one tmux call per CALL_BUDGET bytes, all `&&`-chained.

    Runs where `$dir` holds the host's job directory; the result is one shell command (a lone call,
    else a `{ ...; }` group), so a redirection the caller appends (closing a lock's descriptor for
    the tmux server) covers every call. Calls are as few as the limit allows: each is a tmux start-up.
    The chain stops at the first call that fails and the command's status is then non-zero, so a
    partly started host counts as failed (and is rolled back). With several calls a placeholder
    session holds the server up until the last one ran (see `hold_session`), and a failure with a
    `$dir` longer than planned for (a $HOME over HOME_MAX bytes) says so; a lone call that fails
    for it says "command too long" itself.
    """
    batches = calls(plan, sessions)
    line = " && ".join("tmux " + " ';' ".join(batch) for batch in batches)
    if len(batches) == 1:
        return line
    longest = max(dir_bytes_max(s) for s in sessions)
    why = shlex.quote(f"fablaunch: tmux could not start the sessions, and $HOME is longer than the {HOME_MAX} "
                      "bytes the tmux calls leave room for")
    hold = shlex.quote(f"={plan.job}-launching-") + "$$:"
    # ${#dir} counts bytes in the C locale, set in a function to keep it local.
    return (f"{{ {line}; fablaunch_rc=$?; tmux kill-session -t {hold} 2>/dev/null; "
            f'[ "$fablaunch_rc" = 0 ] || {{ fablaunch_dir_fits() {{ local LC_ALL=C; '
            f'[ "${{#{DIR_VAR}}}" -le {longest} ]; }}; fablaunch_dir_fits || echo {why} >&2; false; }}; }}')


def list_command(job: str | None = None, host: str | None = None) -> str:
    """List this project's sessions (optionally one job's, on one host spec); prints nothing without a server.

    The host filter matters where several host specs reach one tmux server (aliases of one machine).
    """
    job_filter = f"#{{==:#{{@fablaunch_job}},{job}}}" if job else "#{!=:#{@fablaunch_job},}"
    if host:
        job_filter = f"#{{&&:{job_filter},#{{==:#{{@fablaunch_host}},{host}}}}}"
    return f"tmux list-sessions -f {shlex.quote(job_filter)} -F {shlex.quote(LIST_FORMAT)} 2>/dev/null"
