"""`fab prune`: forget finished jobs, on the hosts and here.

Job files outlive jobs by design (nothing is lost when a session or tmux server goes), so without
pruning `status` grows with every job ever run. Only jobs whose every session has ended are
pruned, each host checks again at the moment of removal, and a host that cannot be asked keeps
its job (and the local record, so the job can still be found).
"""

from __future__ import annotations

import time
from typing import Any

from invoke import Exit

from fablaunch import records, survey, ui
from fablaunch.executor import REMOTE_SHELL, Executor
from fablaunch.hostfile import Host
from fablaunch.jobs import take_survey, targets
from fablaunch.scripts import prune_payload
from fablaunch.survey import SessionState

from .flags import age_flag, parallel_flag, task, usage_errors
from .jobs import TARGET_HELP


def prunable(states: list[SessionState], older_than: float | None, now: float) -> str | None:
    """Why a job must be kept (None: it may go): a session still running, unknown, or too recent."""
    if not states:
        return "not found on the hosts"
    alive = [s for s in states if s.state not in survey.ENDED]
    if alive:
        return f"{alive[0].state} ({ui.plural(len(alive), 'session')})"
    if older_than is not None:
        ended = survey.last_end(states)
        if ended and now - ended < older_than:
            return f"ended {int(now - ended)}s ago"
    return None


@task(help={**TARGET_HELP,
            "job": "Only this job (default: every job launched from this directory).",
            "older_than": "Only jobs that ended at least this long ago: 3600, 30m, 12h, 7d, 2w.",
            "dry_run": "Say what would be removed; remove nothing."})
@usage_errors
def prune(c, job=None, older_than=None, dry_run=False, hosts=None, gpus=None, parallel=None):
    """Remove finished jobs' files on every host (logs, exit records, scripts, earlier runs) and their records here.

    A job with a session still running (or on a host that cannot be asked) is never touched.
    """
    age = age_flag(older_than, "--older-than")
    names = [job] if job is not None else [r["job"] for r in records.load_all()]
    if not names:
        ui.say("No jobs were launched from this directory; name one with --job.")
        return
    rows: list[tuple[Any, ...]] = []
    kept = 0
    with Executor(c.config, parallel_flag(parallel), deadline=20) as ex:
        for name in names:
            host_list = targets(name, hosts, gpus)
            result = take_survey(ex, host_list, name)
            states = [s for s in result.states if s.job == name]
            why = ("host unreachable: " + ", ".join(result.unreachable)) if result.unreachable else \
                prunable(states, age, time.time())
            if why is None:
                why = _remove(ex, host_list, name, dry_run)
            kept += why not in ("removed", "would be removed")
            rows.append((name, ui.plural(len(states), "session"), why))
    ui.table("Prune" + (" (dry run: nothing removed)" if dry_run else ""), ("job", "sessions", "result"), rows,
             ["green" if r[-1] in ("removed", "would be removed") else "yellow" for r in rows])
    if kept and job is not None:
        raise Exit(f"fablaunch: job {job} was kept: {rows[0][-1]}", code=1)


def _remove(ex: Executor, hosts: list[Host], job: str, dry: bool) -> str:
    """Remove one job's files on every host, then its local record unless a host kept something."""
    outcomes = ex.run({h: (REMOTE_SHELL, prune_payload(job, h, dry)) for h in hosts})
    running = [spec for spec, o in outcomes.items() if o.ok and o.stdout.strip() == "running"]
    failed = [spec for spec, o in outcomes.items() if not o.ok]
    if running:
        return f"running again on {', '.join(running)}"
    if failed:
        return f"not removed on {', '.join(failed)}: {outcomes[failed[0]].why()}"
    if dry:
        return "would be removed"
    records.forget(job)
    return "removed"
