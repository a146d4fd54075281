"""`fab relaunch`: the last launch of a job again, a new run, optionally without the hosts that failed it."""

from __future__ import annotations

import json
from typing import Any

from fablaunch import blocklist, records, relaunch, ui
from fablaunch.errors import UsageError
from fablaunch.executor import Executor
from fablaunch.hostfile import parse_host
from fablaunch.jobs import stop_job, take_survey

from .flags import parallel_flag, task, usage_error, usage_errors
from .launch import _after_launch, launch

HELP = {
    "job": "The job to relaunch (default: the job launched last from here).",
    "exclude": "Leave this host out (as written in the host file, or its name; comma-separated or repeatable).",
    "exclude_failed": "Leave out the host whose rank failed first and every host that does not answer.",
    "allow_smaller": "Relaunch even if fewer ranks are left than the job had (else exit 2).",
    "block": "Also add the hosts left out to this project's blocklist (see `fab hosts`), so later launches skip "
             "them too.",
    "replace": "If the job still runs, stop it on all its hosts first (else exit 2).",
    "dry_run": "Say what would change and print the new world; launch nothing.",
    "preflight": "Check every host first, as a launch does (default on).",
    "wait": "After relaunching, show the job live until it ends and exit like `fab wait`.",
    "follow": "After relaunching, stream every rank's output like `fab logs --follow`.",
    "json": "Print the relaunch (what changed, the new world) and the launch as JSON.",
    "parallel": "Hosts contacted at once (default 32).",
}


def _record(job: str | None) -> dict[str, Any]:
    if job is not None:
        rec = records.load(job)
        if rec is None:
            raise UsageError("--job", f"no launch record of job {job} here (relaunch works from the directory the "
                                      "job was launched from)")
    else:
        recs = [r for r in records.load_all() if r.get("backend") != "slurm"]
        if not recs:
            raise UsageError("--job", "no launch records here: nothing to relaunch")
        rec = max(recs, key=lambda r: str(r.get("launched", "")))
    if rec.get("backend") == "slurm":
        raise UsageError("--job", f"job {rec['job']} ran on Slurm: submit it again with --slurm (a relaunch is for "
                                  "jobs over ssh)")
    return rec


@task(name="relaunch", help=HELP, iterable=["exclude"])
@usage_errors
def relaunch_(c, job=None, exclude=None, exclude_failed=False, allow_smaller=False, replace=False, dry_run=False,
              preflight=True, wait=False, follow=False, json_=False, parallel=None, block=False):
    """Start the last launch of a job again: same command, spec and variables, a new run id.

    --exclude-failed leaves out the host whose rank failed first (and hosts that do not answer),
    --exclude HOST any host; the world (WORLD_SIZE, ranks, MASTER_ADDR) is planned again from what
    is left and what changed is said before anything starts. The run before keeps its files
    (moved to .previous/ on each host); `fab status` shows only the new run.
    """
    if json_ and follow:
        raise usage_error(UsageError("--json/--follow", "--follow streams the ranks' output, which is not JSON"))
    rec = _record(job)
    name = str(rec["job"])
    hosts = [parse_host(h, f"launch record of {name}") for h in rec.get("hosts", [])]
    try:
        with Executor(c.config, parallel_flag(parallel), deadline=20) as ex:
            drop: dict[str, str] = {}
            states = []
            if exclude_failed or not dry_run:
                result = take_survey(ex, hosts, name)
                states = [s for s in result.states if s.job == name]
                if exclude_failed:
                    drop.update(relaunch.failed_hosts(states, result.unreachable))
            for item in exclude or []:
                for host in filter(None, (h.strip() for h in item.split(","))):
                    drop.setdefault(host, "--exclude")
            done = relaunch.plan(rec, drop, allow_smaller)
            running = [s for s in states if s.state == "running"]
            if running and not dry_run:
                if not replace:
                    raise UsageError("--replace", f"job {name} still runs ({ui.plural(len(running), 'session')}): "
                                                  "`fab stop` it first, or --replace")
                stop_job(ex, hosts, name, 10.0)
    except UsageError as exc:
        raise usage_error(exc) from None
    about = {"job": name, "relaunch": done.count, "of_run": done.of_run, "dropped": done.dropped,
             "changes": done.changes(), "world": done.after, "world_size": done.ranks(done.after)}
    if not json_:
        ui.say(f"Relaunch {done.count} of job {name} (run {done.of_run or '?'}): " + "; ".join(done.changes()))
        ui.say(f"World: {ui.plural(done.ranks(done.after), 'rank')} on "
               f"{ui.plural(len({relaunch.host_of(line).spec for line in done.after}), 'host')}: "
               f"{', '.join(dict.fromkeys(relaunch.host_of(line).spec for line in done.after))}")
    if dry_run:
        if json_:
            print(json.dumps({**about, "dry_run": True}, indent=2))
        return
    if block and done.dropped:
        blocklist.block(list(done.dropped), f"left out by relaunch {done.count} of job {name}: "
                                            + "; ".join(dict.fromkeys(done.dropped.values())))
    spec = relaunch.with_world(done, relaunch.world_file(done))
    plan, launched = launch(c, done.mode, spec, False, True, False, preflight, False, json_)
    rec = records.load(name) or {}
    if rec.get("run") and rec.get("run") != done.of_run:  # this relaunch's record: say what it was
        rec["relaunch"] = {"count": done.count, "of_run": done.of_run, "dropped": done.dropped}
        records.save(rec)
    if not (wait or follow) and json_:
        print(json.dumps({**about, **launched}, indent=2))
        return
    if json_:
        launched = {**about, **launched}
    _after_launch(c, plan.job, list(plan.hosts), spec.parallel, launched, wait, follow, json_)
