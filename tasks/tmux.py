"""tmux command lines for creating, finding and removing this project's sessions.

Sessions are tagged with user options (`@fablaunch_job` and friends) when they are created, in the
same tmux call, so later commands find exactly this project's sessions by tag and never match a
user's own session by name. Targets use `=NAME:` because a bare `-t NAME` prefix-matches.
"""

from __future__ import annotations

import shlex

from .plan import Plan, Session

# Fields read back by `list_command`, in this order. tmux prints a tab in a format as `_` when its
# client has no terminal (as over ssh), so the separator is `|`, which job names and host specs never hold.
FIELD_SEP = "|"
FIELDS = ("session_name", "@fablaunch_job", "@fablaunch_mode", "@fablaunch_host", "@fablaunch_rank",
          "@fablaunch_node", "pane_pid", "session_created")
LIST_FORMAT = FIELD_SEP.join(f"#{{{f}}}" for f in FIELDS)


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


def new_sessions(plan: Plan, sessions: list[Session], script_dir_var: str = "$dir") -> str:
    """One tmux call that creates and tags every session of a host.

    tmux runs a command sequence without handling child exits in between, so a rank that exits at
    once is still tagged; one client call also keeps the per-host cost to a single tmux start-up.
    """
    parts: list[str] = ["tmux"]
    for session in sessions:
        if len(parts) > 1:
            parts.append("';'")
        parts += ["new-session", "-d", "-s", shlex.quote(session.name), "-c", shlex.quote(plan.workdir),
                  "bash", f'"{script_dir_var}/{session.stem}.sh"']
        for key, value in tags(plan, session).items():
            parts += ["';'", "set-option", "-t", shlex.quote(target(session.name)), key, shlex.quote(value or "-")]
    return " ".join(parts)


def list_command(job: str | None = None, host: str | None = None) -> str:
    """List this project's sessions (optionally one job's, on one host spec); prints nothing without a server.

    The host filter matters where several host specs reach one tmux server (aliases of one machine).
    """
    job_filter = f"#{{==:#{{@fablaunch_job}},{job}}}" if job else "#{!=:#{@fablaunch_job},}"
    if host:
        job_filter = f"#{{&&:{job_filter},#{{==:#{{@fablaunch_host}},{host}}}}}"
    return f"tmux list-sessions -f {shlex.quote(job_filter)} -F {shlex.quote(LIST_FORMAT)} 2>/dev/null"
