"""`fab hosts`: the hosts a launch from here would use, and the project's blocklist of hosts to skip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fablaunch import blocklist, ui
from fablaunch.errors import UsageError
from fablaunch.hostfile import Host, gpus_from, hosts_from

from .flags import task, usage_errors

HELP = {
    "hosts": "A hosts file to list, or hosts inline (`node[1-4] slots=8`; default ./hosts if present).",
    "gpus": "A gpus file to list, or hosts inline (`node[1-2]`; default ./gpus if present).",
    "blocklist": "Add this host to the blocklist: launches from here leave it out, with a warning "
                 "(comma-separated or repeatable).",
    "unblock": "Take this host off the blocklist (comma-separated or repeatable).",
    "reason": "Why the hosts given to --blocklist are blocked (shown whenever a launch skips them).",
    "json": "Print JSON: the hosts with their GPUs or slots and whether they are blocked, and the blocklist.",
}


def _names(values: list[str] | None) -> list[str]:
    return [h for v in values or [] for h in (x.strip() for x in v.split(",")) if h]


@task(name="hosts", help=HELP, iterable=["blocklist_", "unblock"])
@usage_errors
def hosts_(c, hosts=None, gpus=None, blocklist_=None, unblock=None, reason=None, json_=False):
    """List the hosts of the host files here and the blocklist; --blocklist/--unblock change the blocklist.

    A blocked host stays in the host files but every launch from this project leaves it out of the
    world (saying so, with the reason), as Horovod's blacklist does for hosts that keep failing.
    `fab relaunch --exclude-failed --block` adds the hosts it drops.
    """
    if reason is not None and not blocklist_:
        raise UsageError("--reason", "goes with --blocklist HOST")
    if blocklist_:
        blocklist.block(_names(blocklist_), reason or "blocked by hand")
    if unblock:
        blocklist.unblock(_names(unblock))
    blocked = blocklist.load()
    listed: list[tuple[str, Host, int]] = []
    for given, default, reader, kind in ((gpus, "gpus", gpus_from, "gpus"), (hosts, "hosts", hosts_from, "hosts")):
        path = Path(given or default)
        if given or path.exists():
            found = reader(str(given or default))
            counts: dict[str, int] = {}
            for h in found:
                counts[h.spec] = counts.get(h.spec, 0) + 1
            seen: dict[str, Host] = {h.spec: h for h in found}
            listed += [(f"{path} ({kind})", h, counts[h.spec] if kind == "gpus" else (h.slots or 0))
                       for h in seen.values()]
    rows: list[dict[str, Any]] = [{"file": f, "host": h.spec, "gpus_or_slots": n,
                                   "blocked": blocklist.why_blocked(h, blocked)} for f, h, n in listed]
    if json_:
        print(json.dumps({"hosts": rows, "blocklist": blocked}, indent=2))
        return
    if rows:
        ui.table("Hosts", ("file", "host", "GPUs/slots", "blocked"),
                 [(r["file"], r["host"], r["gpus_or_slots"] or "", r["blocked"] or "") for r in rows],
                 ["red" if r["blocked"] else None for r in rows],
                 key_columns=("host", "GPUs/slots"), free_columns=("file", "blocked"))
    if blocked:
        ui.table("Blocklist (.fablaunch/blocklist.json)", ("host", "reason", "since"),
                 [(h, e.get("reason", ""), e.get("since", "")) for h, e in blocked.items()],
                 key_columns=("host",), free_columns=("reason",))
    elif not rows:
        ui.say("No host files here (./hosts, ./gpus) and no blocked hosts.")
