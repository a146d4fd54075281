"""Hosts this project will not launch on until told otherwise: `fab hosts --blocklist HOST`.

A node that keeps failing (a flaky NIC, a GPU that falls off the bus) fails the next job too, and
the one after. Horovod keeps a blacklist of such hosts; here it is a small file in the project,
`.fablaunch/blocklist.json`, that launches read: a blocked host is left out of the world with a
warning naming it and why it was blocked, never silently.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import UsageError
from .hostfile import Host, parse_host

PATH = Path(".fablaunch") / "blocklist.json"


def load(path: Path = PATH) -> dict[str, dict[str, Any]]:
    """Blocked hosts (as written: a spec or a name) -> {"reason", "since"}; a damaged file is an error, not empty."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsageError(str(path), f"cannot read the blocklist: {exc}; fix or remove the file") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UsageError(str(path), "is not a blocklist (a JSON object of host -> {reason, since})")
    return data


def save(blocked: dict[str, dict[str, Any]], path: Path = PATH) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(blocked, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def block(hosts: list[str], reason: str, path: Path = PATH) -> dict[str, dict[str, Any]]:
    """Add hosts (each checked as a host spec) with a reason; returns the whole list."""
    blocked = load(path)
    now = datetime.now().astimezone().isoformat(timespec="seconds")
    for text in hosts:
        parse_host(text, "--blocklist")
        blocked[text] = {"reason": reason, "since": now}
    save(blocked, path)
    return blocked


def unblock(hosts: list[str], path: Path = PATH) -> dict[str, dict[str, Any]]:
    """Take hosts off the list; one that is not on it is a usage error naming the ones that are."""
    blocked = load(path)
    for text in hosts:
        if text not in blocked:
            raise UsageError("--unblock", f"{text} is not blocked; blocked: {', '.join(blocked) or 'none'}")
        del blocked[text]
    save(blocked, path)
    return blocked


def why_blocked(host: Host, blocked: dict[str, dict[str, Any]]) -> str | None:
    """Why a host is blocked (matched by its spec as written or by its name), or None."""
    entry = blocked.get(host.spec) or blocked.get(host.name)
    if entry is None:
        return None
    return f"{entry.get('reason') or 'blocked'} (since {entry.get('since', '?')})"


def skip(hosts: list[Host], path: Path = PATH) -> list[Host]:
    """The host-file entries of hosts not on the blocklist; each one left out is said on stderr, with why.

    Everything blocked is a usage error: a launch on no host is no launch.
    """
    blocked = load(path)
    if not blocked:
        return hosts
    from . import ui  # deferred: the planner's imports stay light

    kept = [h for h in hosts if why_blocked(h, blocked) is None]
    for spec, host in {h.spec: h for h in hosts if why_blocked(h, blocked) is not None}.items():
        ui.say(f"fablaunch: leaving out {spec}, on this project's blocklist: {why_blocked(host, blocked)} "
               f"(fab hosts --unblock {spec})", "yellow", stderr=True)
    if not kept:
        raise UsageError(str(path), "every host of the host file is on the blocklist (fab hosts --unblock HOST)")
    return kept
