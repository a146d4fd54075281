"""Launch records: what a launch did, saved where `fab` was called, for status, logs and stop.

The record is a convenience, not the truth: the hosts keep a manifest and tagged tmux sessions of
their own, so a machine without the record (or with a stale one) can still find and stop a job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .plan import Plan
from .scripts import session_record

RECORDS_DIR = Path(".fablaunch") / "records"


def record(plan: Plan, launched: str, hostfile: str) -> dict[str, Any]:
    """The launch record of a plan."""
    return {
        "job": plan.job,
        "mode": plan.mode,
        "launched": launched,
        "hostfile": os.path.abspath(hostfile),
        "hosts": [h.spec for h in plan.hosts],
        "command": list(plan.command),
        "workdir": plan.workdir,
        "master": f"{plan.master_addr}:{plan.port}",
        "sessions": [session_record(s) for s in plan.sessions],
    }


def save(data: dict[str, Any], root: Path = RECORDS_DIR) -> Path:
    """Write a record atomically, so a Ctrl-C never leaves half a file."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{data['job']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def load(job: str, root: Path = RECORDS_DIR) -> dict[str, Any] | None:
    path = root / f"{job}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_all(root: Path = RECORDS_DIR) -> list[dict[str, Any]]:
    """Every record here, newest launch last."""
    records = [load(p.stem, root) for p in sorted(root.glob("*.json"))] if root.is_dir() else []
    return sorted((r for r in records if r), key=lambda r: r.get("launched", ""))
