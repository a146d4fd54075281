"""`fab sync` and `launch-* --sync`: flags, progress and the per-host summary over `fablaunch.sync`.

The engine decides what is copied where and runs the copies; this module turns flags into a sync
plan, shows progress while it runs (a bar on a terminal, a line per host when piped) and ends with
one table (or `--json`) saying for every host whether the code arrived, was there already
(a shared directory) or why not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from invoke import Exit

from fablaunch import sync as engine
from fablaunch import ui
from fablaunch.hostfile import Host
from fablaunch.launcher import make_plan
from fablaunch.plan import Plan
from fablaunch.spec import build_spec, read_spec

from .doctor import pick_hostfile
from .flags import parallel_flag, task, usage_errors

HELP = {
    "gpus": "A gpus file naming the hosts to copy to (default ./gpus if present, else ./hosts).",
    "hosts": "A hosts file naming the hosts to copy to (default ./hosts).",
    "spec": "YAML job spec, as for launch: its hosts/gpus, workdir and parallel are used.",
    "workdir": "Where the code goes on every host (default: this directory's absolute path, as launch assumes; "
               "~/DIR is under each host's home).",
    "exclude": "Also leave out files matching this rsync pattern (e.g. 'data/' or '*.ckpt'); repeatable.",
    "parallel": "Hosts copied to at once (default 32).",
    "dry_run": "List what would be copied to each host (rsync -n) and change nothing there.",
    "json": "Print a JSON list, one object per host: result, destination, files, bytes, seconds, detail.",
}

STYLE = {"synced": "green", "shared": None, "would sync": None, "failed": "red", "timed out": "red"}


def size_text(n: int | None) -> str:
    """`0 B`, `812 B`, `1.4 KiB`, `3.2 MiB`: bytes for a table cell."""
    if n is None:
        return ""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def line(r: engine.HostSync) -> str:
    """One host's result as a plain line (progress when piped, and the failures under the table)."""
    parts = [r.result]
    if r.files is not None:
        parts.append(f"{ui.plural(r.files, 'file')} ({size_text(r.bytes)})")
    if r.detail:
        parts.append(r.detail)
    return f"{r.host}: {', '.join(parts)}"


class Display:
    """Progress while a sync runs, on stderr: a bar on a terminal, a plain line per host otherwise."""

    def __init__(self, hosts: int) -> None:
        self.hosts = hosts
        self.bar: Any = None
        self.task: Any = None
        self.copying = 0
        self.advanced = 0

    @contextmanager
    def shown(self) -> Iterator[Display]:
        if ui.is_terminal(stderr=True):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[moved]}"), TimeElapsedColumn(),
                                console=ui.console(stderr=True), transient=True)
            self.task = self.bar.add_task(f"sync: asking {ui.plural(self.hosts, 'host')}", total=None, moved="")
            with suppress(OSError, ValueError):
                self.bar.start()
        try:
            yield self
        finally:
            if self.bar is not None:
                with suppress(OSError, ValueError):  # a terminal gone (SIGHUP) must not hide the real error
                    self.bar.stop()

    def phase(self, what: str, count: int) -> None:
        self.copying = count
        if self.bar is not None:
            self.bar.update(self.task, description=f"sync: {what}", total=count, completed=0)

    def done(self, r: engine.HostSync) -> None:
        if self.bar is None:
            ui.say(f"sync {line(r)}", stderr=True)
        elif self.copying and self.advanced < self.copying:
            self.advanced += 1
            self.bar.advance(self.task)

    def moved(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, moved=size_text(n))


def run(c: Any, hosts: Sequence[Host], workdir: str | None, excludes: Sequence[str], parallel: int, dry: bool,
        as_json: bool) -> list[engine.HostSync]:
    """Sync and show it: progress, then the table (or, `as_json`, nothing: the caller prints)."""
    p = engine.plan(hosts, workdir, excludes=excludes, parallel=parallel, dry_run=dry)
    display = Display(len(p.hosts))
    with display.shown():
        results = engine.sync(c.config, p, on_done=display.done, on_bytes=display.moved, on_phase=display.phase)
    if not as_json:
        report(p, results)
    return results


def report(p: engine.SyncPlan, results: Sequence[engine.HostSync]) -> None:
    """The per-host table; in a dry run, then the files each host would get."""
    how = "git's file list" if p.files is not None else "every .gitignore"
    ui.table(f"fab sync{' --dry-run' if p.dry_run else ''}: {p.source} to {p.workdir} on "
             f"{ui.plural(len(results), 'host')} ({how})",
             ("host", "result", "files", "size", "seconds", "detail"),
             [(r.host, r.result, "" if r.files is None else r.files, size_text(r.bytes), f"{r.seconds:.2f}", r.detail)
              for r in results],
             [STYLE.get(r.result) for r in results], key_columns=("host", "result"), free_columns=("detail",))
    if p.dry_run:
        groups: dict[tuple[str, ...], list[str]] = {}
        for r in results:
            if r.result == "would sync":
                groups.setdefault(tuple(r.would_copy), []).append(r.host)
        for names, where in groups.items():
            ui.show_text(f"{', '.join(where)}: would copy {ui.plural(len(names), 'file')}",
                         "\n".join(names) if names else "(nothing: up to date)")
        ui.say("Dry run: nothing was copied or changed on any host.")


def failed(results: Sequence[engine.HostSync]) -> list[engine.HostSync]:
    return [r for r in results if not r.ok]


def why(bad: Sequence[engine.HostSync]) -> str:
    """`node2 (why), node3 (why)` for an exit message: a host's words with control characters made visible."""
    return ", ".join(f"{r.host} ({ui.one_line(r.detail or r.result)})" for r in bad)


@task(name="sync", help=HELP, iterable=["exclude"])
@usage_errors
def sync_(c, gpus=None, hosts=None, spec=None, workdir=None, exclude=None, parallel=None, dry_run=False, json_=False):
    """Copy this directory to every host with rsync, in parallel, skipping hosts that already see it.

    What git would track goes (every .gitignore honoured; outside git, rsync reads the .gitignore
    files), never .git/, .fablaunch/ or .fablaunch.env, nor what --exclude names; nothing on a host
    is deleted. Hosts that share the directory (an NFS home, or this machine) are found by a marker
    file and skipped. rsync runs over ssh with fab's settings (-S, -i, -t, the host's user and
    port); each copy has deadlines (no data for 60 s, or 600 s in all; fab -T replaces that).
    Exits 1 if any host failed.
    """
    data = read_spec(spec) if spec else {}
    mode, path = pick_hostfile(gpus, hosts, data)
    count = parallel_flag(parallel) if parallel is not None else None
    job_spec = build_spec(spec, ["true"], **{mode: path}, workdir=workdir, parallel=count)
    # Planned as a launch would be (the command is a stand-in, never run): the same hosts, the same workdir.
    plan = make_plan(c.config, mode, job_spec, job_spec.name or "sync")
    results = run(c, plan.hosts, job_spec.workdir, exclude or [], job_spec.parallel, dry_run, json_)
    if json_:
        print(json.dumps([r.as_json() for r in results], indent=2))
    bad = failed(results)
    if bad:
        raise Exit(f"fablaunch: sync failed on {why(bad)}", code=1)


def before_launch(c: Any, plan: Plan, parallel: int, as_json: bool) -> list[dict[str, Any]]:
    """`launch-* --sync`: copy the code to the job's hosts and workdir; Exit 1 (nothing launched) if a host failed.

    Returns the per-host results as `--json` shows them; with `as_json`, a failure prints them
    (with the error) before exiting.
    """
    results = run(c, plan.hosts, plan.workdir, [], parallel, False, as_json)
    rows = [r.as_json() for r in results]
    bad = failed(results)
    if bad:
        message = f"--sync: the code did not reach {why(bad)}; nothing was launched"
        if as_json:
            print(json.dumps({"job": plan.job, "sync": rows, "error": message}, indent=2))
        raise Exit(f"fablaunch: {message}", code=1)
    return rows

