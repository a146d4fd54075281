"""Job specs: the options of a launch, from a YAML file and the command line.

A spec file (`--spec job.yaml`) can hold every launch option and the command, so a job can be kept
in version control and rerun; flags given on the command line override it. The file is read with
`yaml.safe_load` and checked key by key, because a typo such as `nproc_per_nodes:` silently ignored
would launch the wrong job on every host.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import UsageError

DEFAULT_PORT = 5001
DEFAULT_PARALLEL = 32
_JOB_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class JobSpec:
    """Every option of a launch, after the spec file and the command line are merged."""

    command: list[str] = field(default_factory=list)
    name: str | None = None
    hosts: str = "hosts"
    gpus: str = "gpus"
    python: str | None = None
    workdir: str | None = None
    port: int = DEFAULT_PORT
    master_addr: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    parallel: int = DEFAULT_PARALLEL
    nproc_per_node: str | None = None
    max_restarts: int | None = None
    torchrun_args: list[str] = field(default_factory=list)


# What each spec key must be, for the error message and the check.
_KINDS: dict[str, tuple[type, ...]] = {
    "command": (list, str),
    "name": (str,),
    "hosts": (str,),
    "gpus": (str,),
    "python": (str,),
    "workdir": (str,),
    "port": (int,),
    "master_addr": (str,),
    "env": (dict,),
    "parallel": (int,),
    "nproc_per_node": (str, int),
    "max_restarts": (int,),
    "torchrun_args": (list,),
}
_KIND_NAMES = {list: "a list", str: "a string", int: "an integer", dict: "a mapping"}


def read_spec(path: str) -> dict[str, Any]:
    """Load and check a spec file; return only the keys it sets."""
    import yaml  # deferred: keeps `fab -l` fast

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(path, "no such spec file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(path, f"cannot read spec: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(path, "a spec must be a mapping of option names to values")
    for key, value in data.items():
        if key not in _KINDS:
            known = ", ".join(sorted(_KINDS))
            raise UsageError(f"{path}: key {key!r}", f"unknown key (known keys: {known})")
        kinds = _KINDS[key]
        if not isinstance(value, kinds) or isinstance(value, bool):
            wanted = " or ".join(_KIND_NAMES[k] for k in kinds)
            raise UsageError(f"{path}: key {key!r}", f"must be {wanted}, not {type(value).__name__}")
    if isinstance(data.get("command"), str):
        try:
            data["command"] = shlex.split(data["command"])
        except ValueError as exc:
            raise UsageError(f"{path}: key 'command'", f"cannot split into arguments: {exc}") from None
    for key in ("command", "torchrun_args"):
        for item in data.get(key, []):
            if not isinstance(item, (str, int, float)) or isinstance(item, bool):
                raise UsageError(f"{path}: key {key!r}", f"items must be strings, not {item!r}")
        if key in data:
            data[key] = [str(item) for item in data[key]]
    if "env" in data:
        data["env"] = {str(k): _env_value(path, k, v) for k, v in data["env"].items()}
    if "nproc_per_node" in data:
        data["nproc_per_node"] = str(data["nproc_per_node"])
    return data


def _env_value(path: str, key: object, value: object) -> str:
    if isinstance(value, (dict, list)) or value is None:
        raise UsageError(f"{path}: key 'env.{key}'", "must be a string or number")
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_env(items: list[str], where: str = "--env") -> dict[str, str]:
    """Parse repeated `KEY=VALUE` flags; the value is kept byte for byte."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(where, f"{item!r} is not KEY=VALUE")
        env[key] = value
    return env


def build_spec(spec_path: str | None, command: list[str], **flags: Any) -> JobSpec:
    """Merge a spec file, the command after `--` and the flags given (None = not given)."""
    data = read_spec(spec_path) if spec_path else {}
    env = dict(data.get("env", {}))
    env.update(flags.pop("env", None) or {})
    data["env"] = env
    if command:
        data["command"] = command
    for name, value in flags.items():
        if value is not None:
            data[name] = value
    spec = JobSpec(**{f.name: data[f.name] for f in fields(JobSpec) if f.name in data})
    check_spec(spec)
    return spec


def check_spec(spec: JobSpec) -> None:
    """Reject options that cannot make a working job, naming the flag."""
    if not spec.command:
        raise UsageError("command", "no training command given: put it after `--`, e.g. `-- train.py --lr 1e-3`")
    if spec.name is not None:
        check_job_name(spec.name, "--job")
    if not 0 < spec.port < 65536:
        raise UsageError("--port", f"{spec.port} is not a TCP port (1-65535)")
    if spec.parallel < 1:
        raise UsageError("--parallel", f"must be at least 1, not {spec.parallel}")
    if spec.max_restarts is not None and spec.max_restarts < 0:
        raise UsageError("--max-restarts", f"must be 0 or more, not {spec.max_restarts}")
    nproc = spec.nproc_per_node
    if nproc is not None and nproc not in ("gpu", "cpu", "auto") and (not nproc.isdigit() or int(nproc) < 1):
        raise UsageError("--nproc-per-node", f"{nproc!r} is not a positive integer, gpu, cpu or auto")
    for key in spec.env:
        if not _ENV_KEY.fullmatch(key):
            raise UsageError("--env", f"{key!r} is not a valid environment variable name")
    if spec.master_addr is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]+", spec.master_addr):
        raise UsageError("--master-addr", f"{spec.master_addr!r} is not a host name or address")
    if spec.python is not None and "\n" in spec.python:
        raise UsageError("--python", "the interpreter path has a newline in it")


def check_job_name(name: str, where: str) -> str:
    """Accept only names that tmux keeps as they are and that are safe in paths and shells."""
    if not _JOB_NAME.fullmatch(name):
        raise UsageError(
            where,
            f"{name!r} is not a valid job name: use letters, digits, '_' and '-' "
            "(at most 64, not starting with '-'; tmux rewrites '.' and ':')",
        )
    return name


def default_job_name(command: list[str], now: datetime | None = None) -> str:
    """Name a job after its script and the time, as `train-20261124-113000`."""
    stem = Path(command[0]).stem if command else "job"
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", stem).lstrip("-") or "job"
    return f"{stem[:40]}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def default_python() -> str:
    """The absolute path of `python` on the launcher's PATH, as `$(which python)` gives."""
    return shutil.which("python") or shutil.which("python3") or sys.executable


def default_workdir() -> str:
    """The directory `fab` was called from (neither fab nor `-r` changes it)."""
    return os.getcwd()
