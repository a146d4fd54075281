"""The Python API: launch, watch and stop jobs from a notebook or a sweep script, as `fab` does.

The same engine as the `fab` tasks (the tasks only add flags, help and printing), with the same
keywords as the CLI flags. Errors are exceptions that carry data (`UsageError.where`,
`LaunchError.outcomes` per host, `HostError.hosts`), never exit codes or printed tables.

    import fablaunch
    job = fablaunch.launch_gpus(["train.py", "--lr", "1e-3"], gpus="gpus", job="sweep-1")
    code = job.wait(timeout=3600)      # the exit code `fab wait` gives
    print(job.logs(rank=0, tail=20))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import launcher
from .errors import HostError, UsageError
from .executor import Executor
from .hostfile import Host
from .jobs import after_launch, order, show_logs, stop_job, take_survey, targets, watch
from .spec import DEFAULT_PARALLEL, JobSpec, build_spec

STATUS_DEADLINE = 20.0


def _config(ssh_config: str | None) -> Any:
    """A Fabric config as `fab` builds one: ~/.ssh/config, or the given ssh_config file (`fab -S`)."""
    import fabric

    return fabric.Config(runtime_ssh_path=ssh_config) if ssh_config else fabric.Config()


class Job:
    """A job on its hosts: ask what it does, wait for it, read its logs, stop it.

    Every call asks the hosts afresh (one round trip each, in parallel, with deadlines), so a Job
    made from a name (`Job("sweep-1")`) sees the same as the one a launch returned.
    """

    def __init__(self, name: str, hosts: Iterable[Host] | None = None, *, ssh_config: str | None = None,
                 parallel: int = DEFAULT_PARALLEL, gpus: str | None = None, hosts_file: str | None = None) -> None:
        self.name = name
        self.hosts = list(hosts) if hosts is not None else targets(name, hosts_file, gpus)
        self.parallel = parallel
        self._config = _config(ssh_config)

    def __repr__(self) -> str:
        return f"Job({self.name!r}, hosts={[h.spec for h in self.hosts]!r})"

    def _executor(self, deadline: float | None = STATUS_DEADLINE) -> Executor:
        return Executor(self._config, self.parallel, deadline=deadline)

    def status(self) -> list[dict[str, Any]]:
        """Every session of the job, as `fab status --json` prints them (`state`, `exit_code`, `signal`, ...).

        Sessions on a host that did not answer have state `unknown`.
        """
        with self._executor() as ex:
            return _status(ex, self.hosts, self.name)

    def wait(self, timeout: float | None = None, fail_fast: bool = False, interval: float = 2.0) -> int:
        """Wait until every session ended; return the exit code `fab wait` gives (124 after `timeout`)."""
        with self._executor() as ex:
            code, _ = watch(ex, self.hosts, self.name, timeout, fail_fast, interval)
        return code

    def logs(self, rank: int | Iterable[int] | None = None, tail: int | None = None) -> str:
        """The ranks' last log lines (50 per file unless `tail`), prefixed `[host rank N]` as `fab logs` prints them.

        `rank` is a global rank (a per-GPU job's session, or one torchrun worker), or several. A host
        that does not answer raises HostError.
        """
        ranks = [] if rank is None else [rank] if isinstance(rank, int) else list(rank)
        lines: list[str] = []
        with self._executor() as ex:
            unreachable = show_logs(ex, self.hosts, self.name, ranks, [], 50 if tail is None else tail, False,
                                    write=lines.append)
        if unreachable:
            raise HostError(f"logs of job {self.name}: {len(unreachable)} hosts did not answer", unreachable)
        return "".join(lines)

    def stop(self, grace: float = 10.0) -> list[dict[str, Any]]:
        """Stop every process of the job (SIGINT, `grace` seconds, SIGTERM, SIGKILL), then its sessions.

        Returns per host what `fab stop --json` prints: processes found, sessions removed, `result`,
        and `ended`: how each rank's (node's) processes ended (`exited on SIGINT`, `needed SIGTERM`,
        `KILL needed`). Raises HostError naming each host that could not be verified clean.
        """
        with after_launch(self.name), self._executor(grace + 20) as ex:  # a launch of it from here first
            done = stop_job(ex, self.hosts, self.name, grace)
        bad = {d.host: d.result for d in done if not d.clean}
        if bad:
            raise HostError(f"job {self.name}: {len(bad)} hosts not verified clean", bad)
        return [d.as_json(self.name) for d in done]


def _launch(mode: str, command: Iterable[str], *, spec: str | None, env: Mapping[str, str] | None,
            secrets: Iterable[str] | None, ssh_config: str | None, replace: bool, rollback: bool, preflight: bool,
            **flags: Any) -> Job:
    if isinstance(command, str):
        raise UsageError("command", "give the command as a list of argv strings, e.g. ['train.py', '--lr', '1e-3']")
    job_spec: JobSpec = build_spec(spec, [str(arg) for arg in command], env=dict(env) if env else None,
                                   secrets=list(secrets) if secrets else None, **flags)
    config = _config(ssh_config)
    plan = launcher.make_plan(config, mode, job_spec)
    hostfile = job_spec.gpus if mode == "gpus" else job_spec.hosts
    launcher.launch(config, plan, job_spec, hostfile, replace=replace, rollback_on_failure=rollback,
                    preflight=preflight)
    return Job(plan.job, plan.hosts, ssh_config=ssh_config, parallel=job_spec.parallel)


def launch_gpus(command: Iterable[str], *, gpus: str = "gpus", job: str | None = None, spec: str | None = None,
                env: Mapping[str, str] | None = None, port: int | None = None, python: str | None = None,
                workdir: str | None = None, master_addr: str | None = None, parallel: int | None = None,
                secrets: Iterable[str] | None = None, replace: bool = False, rollback: bool = True,
                preflight: bool = True, ssh_config: str | None = None, env_file: str | None = None,
                forward_env: Iterable[str] | None = None, no_forward_env: bool = False) -> Job:
    """Start one tmux session per line of the `gpus` file, each a rank with the torchrun environment.

    Like `fab launch-gpus`; raises UsageError for bad input (nothing launched) and LaunchError when
    a host could not start its part (the rest rolled back unless `rollback=False`).
    """
    return _launch("gpus", command, spec=spec, env=env, secrets=secrets, ssh_config=ssh_config, replace=replace,
                   rollback=rollback, preflight=preflight, gpus=gpus, name=job, port=port, python=python,
                   workdir=workdir, master_addr=master_addr, parallel=parallel, env_file=env_file,
                   forward_env=list(forward_env) if forward_env else None, no_forward_env=no_forward_env)


def launch_torchrun(command: Iterable[str], *, hosts: str = "hosts", job: str | None = None, spec: str | None = None,
                    env: Mapping[str, str] | None = None, port: int | None = None, python: str | None = None,
                    workdir: str | None = None, master_addr: str | None = None, parallel: int | None = None,
                    nproc_per_node: int | str | None = None, max_restarts: int | None = None,
                    secrets: Iterable[str] | None = None, replace: bool = False, rollback: bool = True,
                    preflight: bool = True, ssh_config: str | None = None, env_file: str | None = None,
                    forward_env: Iterable[str] | None = None, no_forward_env: bool = False) -> Job:
    """Start torchrun on every node of the `hosts` file (one tmux session each), meeting at c10d rendezvous.

    Like `fab launch-torchrun`; errors as for `launch_gpus`.
    """
    return _launch("torchrun", command, spec=spec, env=env, secrets=secrets, ssh_config=ssh_config,
                   replace=replace, rollback=rollback, preflight=preflight, hosts=hosts, name=job, port=port,
                   python=python, workdir=workdir, master_addr=master_addr, parallel=parallel,
                   nproc_per_node=None if nproc_per_node is None else str(nproc_per_node), max_restarts=max_restarts,
                   env_file=env_file, forward_env=list(forward_env) if forward_env else None,
                   no_forward_env=no_forward_env)


def status(job: str | None = None, *, hosts: str | None = None, gpus: str | None = None,
           ssh_config: str | None = None) -> list[dict[str, Any]]:
    """Every session of a job (or of every job the hosts know), as `fab status --json` prints them."""
    host_list = targets(job, hosts, gpus)
    with Executor(_config(ssh_config), DEFAULT_PARALLEL, deadline=STATUS_DEADLINE) as ex:
        return _status(ex, host_list, job)


def _status(ex: Executor, hosts: list[Host], job: str | None) -> list[dict[str, Any]]:
    """The sessions of a job (every job: None) on these hosts, as `fab status --json` prints them."""
    result = take_survey(ex, hosts, job)
    return [s.as_json() for s in sorted(result.states, key=order) if job is None or s.job == job]
