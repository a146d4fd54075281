"""Start the last launch of a job again, without the hosts that failed it: `fab relaunch`.

A 14-hour run that dies at hour 9 on one node has to go again, usually without that node. By hand
that means editing host files and recomputing the world (WORLD_SIZE, every rank, MASTER_ADDR if the
master was the sick one), under pressure, at night. The launch record keeps the spec and the world
(the host-file lines the job ran on, in rank order), so a relaunch is: that world minus the dropped
hosts, planned again from scratch by the same planner, with the same command and variables. What
changed is said before anything starts, and a smaller world is refused unless the user allows it:
a job tuned for 16 ranks may silently change its batch size or learning rate on 12.
Planning here is pure; the task asks the hosts which failed and launches through the launcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import UsageError
from .hostfile import Host, parse_host
from .selection import DEVICES_VAR
from .spec import JobSpec
from .survey import SessionState, first_failure

WORLD_DIR = Path(".fablaunch") / "worlds"  # the host file of each relaunch, kept beside the records


@dataclass
class Relaunch:
    """A relaunch, planned: the spec to launch with, the world before and after, and why hosts were dropped."""

    job: str
    mode: str
    spec: JobSpec
    before: list[str]
    after: list[str]
    dropped: dict[str, str] = field(default_factory=dict)  # host spec -> why
    of_run: str = ""
    count: int = 1  # this is the job's count-th relaunch
    devices: dict[str, str] = field(default_factory=dict)  # host -> the CUDA_VISIBLE_DEVICES its selection set

    def ranks(self, lines: list[str]) -> int:
        """The world size of host-file lines: a rank per line per GPU, else each node's slots (1 if unknown)."""
        if self.mode == "gpus":
            return len(lines)
        return sum(host_of(line).slots or 1 for line in lines)

    def changes(self) -> list[str]:
        """What differs from the run before, one line each."""
        said = [f"without {host}: {why}" for host, why in self.dropped.items()]
        before, after = self.ranks(self.before), self.ranks(self.after)
        if before != after:
            said.append(f"WORLD_SIZE {before} -> {after}")
        first_before, first_after = host_of(self.before[0]).spec, host_of(self.after[0]).spec
        if first_before != first_after:
            said.append(f"MASTER_ADDR moves from {first_before} to {first_after} (the first host left)")
        return said or ["the same world as before"]


def host_of(line: str) -> Host:
    """A world line (`host` or `host slots=N`, as records.world_lines writes them) as a Host."""
    words = line.split()
    slots = next((int(w[6:]) for w in words[1:] if w.startswith("slots=") and w[6:].isdigit()), None)
    return replace(parse_host(words[0] if words else "", "launch record"), slots=slots)


def spec_of(rec: dict[str, Any]) -> JobSpec:
    """The spec a record's launch used; records older than `fab relaunch` have none."""
    data = rec.get("spec")
    if not isinstance(data, dict) or not isinstance(rec.get("world"), list) or not rec["world"]:
        raise UsageError("--job", f"job {rec['job']} was launched before fablaunch kept what a relaunch needs: "
                                  "launch it again with launch-gpus / launch-torchrun")
    known = {f.name for f in fields(JobSpec)}
    return JobSpec(**{k: v for k, v in data.items() if k in known})


def failed_hosts(states: list[SessionState], unreachable: dict[str, str]) -> dict[str, str]:
    """The hosts to leave out with --exclude-failed: the first failure's, and those that did not answer.

    Only the first failure's host: when one rank dies, the others usually fail after it (a broken
    collective), and dropping them all would drop the healthy nodes.
    """
    found = {host: f"unreachable ({why})" for host, why in unreachable.items()}
    first = first_failure(states)
    if first is not None:
        who = f"rank {first.rank}" if first.rank is not None else f"node {first.node}"
        found.setdefault(first.host, f"{who} failed first ({first.state}"
                                     f"{f', exit {first.exit_code}' if first.exit_code is not None else ''})")
    for s in states:
        if s.state == "unknown":
            found.setdefault(s.host, "unreachable")
    return found


def plan(rec: dict[str, Any], drop: dict[str, str], allow_smaller: bool) -> Relaunch:
    """The relaunch of a record's job without the `drop` hosts (host spec or name -> why).

    Refuses (UsageError, exit 2) a host that is not in the job, a world with no host left, and a
    smaller world unless `allow_smaller`.
    """
    spec = spec_of(rec)
    mode = str(rec["mode"])
    before = [str(line) for line in rec["world"]]
    in_job = {host_of(line).spec: host_of(line) for line in before}
    resolved: dict[str, str] = {}
    for given, why in drop.items():
        match = [h.spec for h in in_job.values() if given in (h.spec, h.name)]
        if not match:
            raise UsageError("--exclude", f"{given} is not a host of job {rec['job']}: its hosts are "
                                          f"{', '.join(in_job)}")
        for spec_ in match:
            resolved.setdefault(spec_, why)
    after = [line for line in before if host_of(line).spec not in resolved]
    done = Relaunch(str(rec["job"]), mode, spec, before, after, resolved, str(rec.get("run", "")),
                    int((rec.get("relaunch") or {}).get("count", 0)) + 1,
                    {str(k): str(v) for k, v in (rec.get("devices") or {}).items()})
    if not after:
        raise UsageError("--exclude", f"no host of job {done.job} would be left")
    if done.ranks(after) < done.ranks(before) and not allow_smaller:
        raise UsageError("--allow-smaller", f"without {', '.join(resolved)} job {done.job} would have "
                                            f"{done.ranks(after)} ranks instead of {done.ranks(before)}; "
                                            "--allow-smaller relaunches it smaller (check its batch size and "
                                            "learning rate)")
    return done


def with_world(done: Relaunch, path: Path) -> JobSpec:
    """The spec to launch the relaunch with: the same, but its host file is the new world's (written to `path`).

    The world is already the selection's (`--include`, `--exclude`, `--num-*`): applied again it would
    select from the selected. The GPUs it pinned per host come back as those hosts' own CUDA_VISIBLE_DEVICES.
    """
    kept = {host_of(line).spec for line in done.after}
    host_env = {host: dict(values) for host, values in done.spec.host_env.items()}
    for host, devices in done.devices.items():
        if host in kept:
            host_env.setdefault(host, {})[DEVICES_VAR] = devices
    spec = replace(done.spec, name=done.job, include=None, exclude=None, num_nodes=None, num_gpus=None,
                   host_env=host_env)
    if done.mode == "gpus":
        return replace(spec, gpus=str(path))
    if all(host_of(line).slots for line in done.after):  # each node's workers as the run before had them
        spec = replace(spec, nproc_per_node=None)
    return replace(spec, hosts=str(path))


def world_file(done: Relaunch, root: Path = WORLD_DIR) -> Path:
    """Write the relaunch's world as a host file (kept: it is what the new run ran on)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{done.job}.{'gpus' if done.mode == 'gpus' else 'hosts'}"
    header = f"# job {done.job}, relaunch {done.count} of run {done.of_run}: " + "; ".join(done.changes())
    path.write_text("\n".join([header.replace("\n", " "), *done.after, ""]), encoding="utf-8")
    return path
