"""Turn host files and a job spec into a plan: every session, its rank, environment and files.

Planning is pure (no SSH, no clock, no filesystem) so the whole torchrun environment contract can be
unit-tested; everything later (scripts, fan-out, records, status) reads the plan instead of
recomputing ranks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import UsageError
from .hostfile import Host
from .spec import JobSpec

JOBS_DIR = "~/.fablaunch/jobs"
MODES = ("gpus", "torchrun")

# Variables fablaunch owns. FABLAUNCH_TAG marks every process of a job on one host, children and
# setsid'd grandchildren included, so `stop` can find them through /proc/PID/environ.
TAG_VAR = "FABLAUNCH_TAG"
# The torchrun environment contract: set per rank here in per-GPU mode, by torchrun in per-node mode.
# A user's value would silently lose (or break the rendezvous), so setting one is an error instead.
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
            "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_RESERVED = frozenset({TAG_VAR, "FABLAUNCH_JOB", "FABLAUNCH_HOST", "TORCHELASTIC_ERROR_FILE", *RANK_ENV})
_INSTEAD = {"MASTER_ADDR": "--master-addr (spec key master_addr)", "MASTER_PORT": "--port (spec key port)"}


class RemotePath(str):
    """A path under the remote user's home (`~/...`), expanded on the host where it is used."""


def on_host(path: str) -> str:
    """A path as written for the hosts: `~/x` (or `~`) is the remote user's home there, never this machine's.

    A relative path is under that home too, spelt out: where a session's shell starts is tmux's
    choice (its server's directory), not the home where ssh lands.
    """
    if path == "~":
        return RemotePath("~/")
    if path.startswith("~/"):
        return RemotePath(path)
    return path if path.startswith("/") else RemotePath(f"~/{path}")


@dataclass(frozen=True)
class Session:
    """One tmux session of a job: a rank (per-GPU mode) or a torchrun agent (per-node mode)."""

    host: Host
    name: str
    stem: str
    node: int
    rank: int | None
    local_rank: int | None
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    dir: RemotePath

    def path(self, suffix: str) -> RemotePath:
        """The session's file with that suffix, e.g. `.log`, `.exit`, `.sh`."""
        return RemotePath(f"{self.dir}/{self.stem}{suffix}")

    @property
    def script(self) -> RemotePath:
        return self.path(".sh")

    @property
    def log(self) -> RemotePath:
        return self.path(".log")

    @property
    def exit_file(self) -> RemotePath:
        return self.path(".exit")

    @property
    def error_file(self) -> RemotePath:
        return self.path(".error.json")

    @property
    def tag(self) -> str:
        return self.env_dict[TAG_VAR]

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)


@dataclass(frozen=True)
class Plan:
    """Everything a launch will do, per host, before any host is touched."""

    job: str
    mode: str
    hosts: tuple[Host, ...]
    sessions: tuple[Session, ...]
    command: tuple[str, ...]
    workdir: str
    master_addr: str
    port: int
    extra: dict[str, object] = field(default_factory=dict)
    secrets: frozenset[str] = frozenset()  # env keys the user marked secret (--secret): a dry run masks them

    def on(self, host: Host) -> list[Session]:
        """The sessions planned on one host, in rank order."""
        return list(self._by_host.get(host, ()))

    @functools.cached_property
    def _by_host(self) -> dict[Host, list[Session]]:
        """Every host's sessions in rank order, grouped once.

        `on` is asked for every host (payloads, tables, records): a scan of all sessions per call
        costs hosts x sessions comparisons, half a million at 256 hosts x 8 ranks. Built on first use
        (a frozen dataclass's cached_property lives in the instance's __dict__; `replace` starts afresh).
        """
        grouped: dict[Host, list[Session]] = {}
        for session in self.sessions:
            grouped.setdefault(session.host, []).append(session)
        return grouped

    def host_dir(self, host: Host) -> RemotePath:
        return job_dir(self.job, host)


def job_dir(job: str, host: Host) -> RemotePath:
    """Where one host keeps a job's files; the host is in the path so NFS homes never mix."""
    return RemotePath(f"{JOBS_DIR}/{job}/{host.label}")


def lock_file(job: str, host: Host) -> RemotePath:
    """The file a host's launches (and prunes) of a job lock, beside its job directory."""
    return RemotePath(f"{JOBS_DIR}/{job}/.{host.label}.lock")


def tag(job: str, host: Host) -> str:
    """The marker value every process of `job` on `host` inherits."""
    return f"{job}@{host.label}"


def _unique(hosts: list[Host]) -> list[Host]:
    seen: dict[str, Host] = {}
    for host in hosts:
        seen.setdefault(host.spec, host)
    return list(seen.values())


def _master(spec: JobSpec, hosts: list[Host], resolve: Callable[[Host], str]) -> str:
    if spec.master_addr:
        return spec.master_addr
    first = hosts[0]
    if first.is_local and any(not h.is_local for h in hosts):
        raise UsageError(
            "--master-addr",
            f"the first host is {first.spec!r}, which other hosts cannot reach; "
            "list this machine by its network name or give --master-addr",
        )
    return resolve(first)


def reserved_env(key: str) -> str | None:
    """Why a user may not set `key` (None if they may): fablaunch or torchrun sets it for every rank.

    OMP_NUM_THREADS and PYTHONUNBUFFERED are only defaults and stay the user's to change.
    """
    if key not in _RESERVED and not key.startswith("FABLAUNCH_"):
        return None
    instead = f"; use {_INSTEAD[key]} instead" if key in _INSTEAD else ""
    return f"{key} is set by fablaunch for each rank (by torchrun in torchrun mode) and cannot be overridden{instead}"


DEFAULT_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # every rank's, unless the user sets them


def check_user_env(env: dict[str, str]) -> None:
    """Refuse a user variable that fablaunch (or torchrun) sets for each rank."""
    for key in env:
        problem = reserved_env(key)
        if problem:
            raise UsageError("--env", problem)


def host_env(spec: JobSpec, host: Host) -> dict[str, str]:
    """One host's own variables, which win over the job-wide ones there: the spec's `host_env:` entry,
    then the `KEY=VALUE` words of its host-file line."""
    from .environment import for_host

    return {**for_host(spec.host_env, host.spec, host.name), **dict(host.env)}


def _base_env(spec: JobSpec, job: str, host: Host, error_file: RemotePath) -> dict[str, str]:
    """Defaults, then the user's variables (a host's own last), then the ones fablaunch must own."""
    check_user_env(spec.env)
    env = dict(DEFAULT_ENV)
    env.update(spec.env)
    env.update(host_env(spec, host))
    env.update({
        "FABLAUNCH_JOB": job,
        "FABLAUNCH_HOST": host.spec,
        TAG_VAR: tag(job, host),
        "TORCHELASTIC_ERROR_FILE": error_file,
    })
    return env


def program(command: Sequence[str], python: str) -> list[str]:
    """The command as the user typed it, under the interpreter if it is a script or `-m`."""
    first = command[0]
    if first.endswith(".py") or first == "-m":
        return [python, *command]
    return list(command)


def torchrun_argv(python: str, rdzv_id: str, endpoint: str, nnodes: str, nproc: str, log_dir: str,
                  max_restarts: int | None, torchrun_args: Sequence[str], command: Sequence[str]) -> list[str]:
    """torchrun's own arguments for one node, up to (not including) the user's command."""
    argv = [python, "-m", "torch.distributed.run", "--rdzv-id", rdzv_id, "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint, "--nnodes", nnodes, "--nproc-per-node", nproc,
            "--redirects", "3", "--log-dir", log_dir]
    if max_restarts is not None:
        argv += ["--max-restarts", str(max_restarts)]
    argv += torchrun_args
    if not (command[0].endswith(".py") or command[0].startswith("-")):
        argv.append("--no-python")
    return argv


def plan_gpus(spec: JobSpec, gpus: list[Host], job: str, python: str, workdir: str,
              resolve: Callable[[Host], str] = lambda h: h.name) -> Plan:
    """One session per `gpus` line with the torchrun environment contract set by hand."""
    workdir = on_host(workdir)
    hosts = _unique(gpus)
    master = _master(spec, hosts, resolve)
    node_of = {h.spec: i for i, h in enumerate(hosts)}
    per_host = {h.spec: sum(1 for g in gpus if g.spec == h.spec) for h in hosts}
    seen = dict.fromkeys(per_host, 0)
    argv = tuple(program(spec.command, python))
    sessions = []
    for rank, line in enumerate(gpus):
        host = hosts[node_of[line.spec]]
        local_rank = seen[host.spec]
        seen[host.spec] += 1
        d = job_dir(job, host)
        stem = f"rank-{rank}"
        env = _base_env(spec, job, host, RemotePath(f"{d}/{stem}.error.json"))
        env.update({
            "RANK": str(rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(len(gpus)),
            "LOCAL_WORLD_SIZE": str(per_host[host.spec]),
            "GROUP_RANK": str(node_of[host.spec]),
            "NODE_RANK": str(node_of[host.spec]),
            "GROUP_WORLD_SIZE": str(len(hosts)),
            "ROLE_RANK": str(rank),
            "ROLE_WORLD_SIZE": str(len(gpus)),
            "MASTER_ADDR": master,
            "MASTER_PORT": str(spec.port),
        })
        sessions.append(Session(host, f"{job}-{stem}", stem, node_of[host.spec], rank, local_rank,
                                argv, tuple(env.items()), d))
    return Plan(job, "gpus", tuple(hosts), tuple(sessions), tuple(spec.command), workdir, master, spec.port,
                secrets=frozenset(spec.secrets))


def plan_torchrun(spec: JobSpec, hosts: list[Host], job: str, python: str, workdir: str,
                  resolve: Callable[[Host], str] = lambda h: h.name) -> Plan:
    """One torchrun agent per `hosts` line, meeting at a c10d rendezvous on the first host."""
    workdir = on_host(workdir)
    master = _master(spec, hosts, resolve)
    sessions = []
    for node, host in enumerate(hosts):
        d = job_dir(job, host)
        stem = f"node-{node}"
        nproc = spec.nproc_per_node or (str(host.slots) if host.slots else "gpu")
        argv = [*torchrun_argv(python, job, f"{_bracket(master)}:{spec.port}", str(len(hosts)), nproc,
                               RemotePath(f"{d}/{stem}.torchrun"), spec.max_restarts, spec.torchrun_args,
                               spec.command), *spec.command]
        env = _base_env(spec, job, host, RemotePath(f"{d}/{stem}.error.json"))
        sessions.append(Session(host, f"{job}-{stem}", stem, node, None, None,
                                tuple(argv), tuple(env.items()), d))
    return Plan(job, "torchrun", tuple(hosts), tuple(sessions), tuple(spec.command), workdir, master, spec.port,
                secrets=frozenset(spec.secrets))


def _bracket(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
