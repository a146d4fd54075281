"""Launch records: what a launch did, saved where `fab` was called, for status, logs and stop.

The record is a convenience, not the truth: the hosts keep a manifest and tagged tmux sessions of
their own, so a machine without the record (or with a stale one) can still find and stop a job.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .hostfile import Host
from .plan import Plan, host_env
from .scripts import session_record
from .selection import DEVICES_VAR
from .spec import JobSpec

RECORDS_DIR = Path(".fablaunch") / "records"
LOCKS_DIR = Path(".fablaunch") / "locks"
HISTORY = Path(".fablaunch") / "history.jsonl"


class Busy(Exception):
    """Another fablaunch process holds a job's lock here; carries its pid (None if unknown)."""

    def __init__(self, job: str, pid: int | None) -> None:
        super().__init__(f"job {job} is being launched by another fab process"
                         + (f" (pid {pid})" if pid else ""))
        self.job = job
        self.pid = pid


@contextlib.contextmanager
def lock(job: str, wait: float = 0.0, root: Path = LOCKS_DIR) -> Iterator[None]:
    """Hold this project's lock on a job: a launch holds it throughout, a stop waits for it.

    So a second launch of one name from this project is refused at once instead of racing the
    first, and a stop never runs between a launch's hosts (stopping half, then the rest starting).
    An flock is released by the kernel when its holder dies, so a killed fab leaves no stale lock.
    Raises Busy after `wait` seconds; OSError if the lock file cannot be written.
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{job}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        end = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= end:
                    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    raise Busy(job, int(text) if text.isdigit() else None) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def note(entry: dict[str, Any], path: Path = HISTORY) -> None:
    """Append what a launch did (started, refused, rolled back and why) to this project's history."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def record(plan: Plan, launched: str, hostfile: str, run: str = "", spec: JobSpec | None = None) -> dict[str, Any]:
    """The launch record of a plan; with its spec, everything `fab relaunch` needs to start it again.

    `world` is the host-file lines the job ran on, in rank order (a host per rank in per-GPU mode, a
    node with its slots in torchrun mode): the world a relaunch starts from.
    """
    extra: dict[str, Any] = {}
    if spec is not None:
        extra["spec"] = {k: v for k, v in asdict(spec).items() if k != "env_sources"}
        extra["world"] = world_lines(plan)
        extra["devices"] = pinned_devices(plan, spec)
    return {
        "job": plan.job,
        "run": run,
        "mode": plan.mode,
        "launched": launched,
        "hostfile": os.path.abspath(hostfile) if os.path.exists(hostfile) else hostfile,  # or hosts inline
        "hosts": [h.spec for h in plan.hosts],
        "command": list(plan.command),
        "workdir": plan.workdir,
        "master": f"{plan.master_addr}:{plan.port}",
        "sessions": [session_record(s) for s in plan.sessions],
        **extra,
    }


def pinned_devices(plan: Plan, spec: JobSpec) -> dict[str, str]:
    """The CUDA_VISIBLE_DEVICES a GPU selection (`--include node1:2,3`) set per host, not the user's own."""
    found: dict[str, str] = {}
    for s in plan.sessions:
        value = s.env_dict.get(DEVICES_VAR)
        if value is not None and DEVICES_VAR not in spec.env and DEVICES_VAR not in host_env(spec, s.host):
            found[s.host.spec] = value
    return found


def world_lines(plan: Plan) -> list[str]:
    """The host-file lines of a plan's world: per-GPU, each rank's host in rank order; torchrun, each node."""
    def line(h: Host, slots: int | None) -> str:
        return " ".join([h.spec, *([f"slots={slots}"] if slots else []), *(f"{k}={v}" for k, v in h.env)])

    if plan.mode == "gpus":
        return [line(s.host, None) for s in sorted(plan.sessions, key=lambda s: s.rank or 0)]
    return [line(h, h.slots) for h in plan.hosts]


def save(data: dict[str, Any], root: Path = RECORDS_DIR) -> Path:
    """Write a record atomically, so a Ctrl-C never leaves half a file."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{data['job']}.json"
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    # 0600: a record keeps the job's variables (for a relaunch), secrets among them.
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2) + "\n")
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


def forget(job: str, root: Path = RECORDS_DIR) -> None:
    """Remove a job's launch record here (after `prune` removed its files on the hosts).

    Its lock file stays: removing a file another launch may hold locked would let a third one in.
    """
    (root / f"{job}.json").unlink(missing_ok=True)
