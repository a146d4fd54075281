"""Job specs: the options of a launch, from a YAML file and the command line.

A spec file (`--spec job.yaml`) can hold every launch option and the command, so a job can be kept
in version control and rerun; flags given on the command line override it. The file is read with
PyYAML's safe loader and checked key by key, because a typo such as `nproc_per_nodes:` silently
ignored would launch the wrong job on every host. YAML 1.1 also silently rewrites plain scalars
(`1.10` becomes 1.1, `010` becomes 8, `12:30` becomes 750, `on` becomes true) and keeps only the last
of two equal keys, so the file is checked as YAML nodes, whose text is still what the user wrote:
`env:` values must be strings (quoted where YAML would read something else), argument lists keep each
item as written, and a key given twice is refused.

The job's name is the key `job:`, like the `--job` flag; `name:`, its first spelling, still works but
prints a warning, and a spec giving both is refused.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import UsageError
from .hostfile import MAX_SLOTS

DEFAULT_PORT = 5001
DEFAULT_PARALLEL = 32
# Most hosts contacted at once: each is an SSH connection and a thread, so more only exhausts this machine.
MAX_PARALLEL = 1024
# What one session's command and environment may hold. Linux refuses to start a program (E2BIG) when
# one argument or one KEY=VALUE string is over MAX_ARG_STRLEN (131072 bytes), or all of them together
# are over ARG_MAX (typically 2 MiB, a quarter of the stack limit); the tmux session then vanishes
# with nothing in its log. These limits stay well under both, leaving room for the hosts' own
# environment, and turn that into an error naming the value before anything is launched.
MAX_VALUE_BYTES = 100_000
MAX_TOTAL_BYTES = 1_000_000
_JOB_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Integers as the user means them: YAML 1.1 also reads 0x1f, 0b101, 017 (octal), 1_000 and 1:30 as ints.
_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() and int() also take full-width digits
_YAML = "tag:yaml.org,2002:"


@dataclass
class JobSpec:
    """Every option of a launch, after the spec file and the command line are merged."""

    command: list[str] = field(default_factory=list)
    name: str | None = None  # the spec's `job:` key, the --job flag
    hosts: str = "hosts"
    gpus: str = "gpus"
    # Part of the hosts to use (selection.py): DeepSpeed's `node1:0,1@node2` filters, then the first N.
    include: str | None = None
    exclude: str | None = None
    num_nodes: int | None = None
    num_gpus: int | None = None
    python: str | None = None
    workdir: str | None = None
    port: int = DEFAULT_PORT
    port_given: bool = field(default=False, compare=False)  # else a Slurm job derives its port from its id
    master_addr: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    parallel: int = DEFAULT_PARALLEL
    nproc_per_node: str | None = None
    max_restarts: int | None = None
    torchrun_args: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)  # env keys a dry run masks besides secret-looking ones
    slurm: dict[str, Any] = field(default_factory=dict)  # the `slurm:` section and --slurm flags (SLURM_KEYS)
    # Where the environment comes from besides `env` (see environment.py): the shell's variables with these
    # prefixes (None: the defaults; [] none), an env file, and per-host values.
    forward_env: list[str] | None = None
    env_file: str | None = None
    host_env: dict[str, dict[str, str]] = field(default_factory=dict)
    env_sources: dict[str, str] = field(default_factory=dict, compare=False)  # variable -> where it came from


# What each spec key must be, for the error message and the check.
_KINDS: dict[str, tuple[type, ...]] = {
    "command": (list, str),
    "job": (str,),
    "hosts": (str,),
    "gpus": (str,),
    "include": (str,),
    "exclude": (str,),
    "num_nodes": (int,),
    "num_gpus": (int,),
    "python": (str,),
    "workdir": (str,),
    "port": (int,),
    "master_addr": (str,),
    "env": (dict,),
    "parallel": (int,),
    "nproc_per_node": (str, int),
    "max_restarts": (int,),
    "torchrun_args": (list,),
    "secrets": (list,),
    "slurm": (dict,),
    "forward_env": (list, bool),
    "env_file": (str,),
    "host_env": (dict,),
}
# The keys of a spec's `slurm:` section (the --slurm launch flags), with their kinds.
SLURM_KEYS: dict[str, type] = {
    "nodes": int, "gpus_per_node": int, "partition": str, "time": str, "account": str, "nodelist": str,
    "exclude": str, "sbatch_args": list, "logdir": str,
}
_KIND_NAMES = {list: "a list", str: "a string", int: "an integer", dict: "a mapping"}
# Spec keys whose JobSpec field has another name.
_FIELDS = {"job": "name"}
# Deprecated spellings of a key, still read (with a warning): old key -> key.
_ALIASES = {"name": "job"}
_warned: set[str] = set()


def _say_once(message: str) -> None:
    """Print a warning on stderr once per process: `fab doctor` reads its spec twice."""
    from . import ui  # deferred: keeps `fab -l` fast

    if message not in _warned:
        _warned.add(message)
        ui.say(message, "yellow", stderr=True)


def read_spec(path: str, warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load and check a spec file; return only the options it sets, named as JobSpec's fields (`job:` as `name`).

    A deprecated key is read with a warning line passed to `warn` (default: printed once on stderr).
    """
    import yaml  # deferred: keeps `fab -l` fast

    loader = yaml.SafeLoader(_spec_text(path))
    try:
        root = loader.get_single_node()
        return {} if root is None else _spec_data(path, loader, root, warn or _say_once)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an int of over 4300 digits
        raise UsageError(path, f"cannot read spec: {exc}") from None
    finally:
        loader.dispose()


def _spec_text(path: str) -> str:
    """The file's text; a binary or non-UTF-8 file is a usage error, not a traceback from the YAML reader."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(path, "no such spec file") from None
    except OSError as exc:
        raise UsageError(path, f"cannot read spec: {exc}") from None
    if b"\0" in data:
        raise UsageError(path, "not a text YAML file (it has NUL bytes): is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(path, f"not a text YAML file: byte {exc.start} is not UTF-8 (is it the right file?)") from None


def _spec_data(path: str, loader: Any, root: Any, warn: Callable[[str], None]) -> dict[str, Any]:
    """The options a spec's top-level YAML node sets, each checked against its kind."""
    if root.id != "mapping":
        if root.tag == _YAML + "null":  # a file holding only `~` or `null` sets nothing, like an empty one
            return {}
        raise UsageError(path, "a spec must be a mapping of option names to values")
    pairs = _mapping(path, loader, root, "")
    lines = {key: line for key, line, _ in pairs}
    for old, new in _ALIASES.items():
        if old in lines and new in lines:
            raise UsageError(f"{path}: key {new!r}",
                             f"given twice, as {old!r} on line {lines[old]} and as {new!r} on line {lines[new]} "
                             f"({old!r} is the deprecated spelling of {new!r}): keep only {new!r}")
    data: dict[str, Any] = {}
    for key, _, node in pairs:
        if key in _ALIASES:
            warn(f"fablaunch: {path}: key {key!r} is deprecated, write {_ALIASES[key]!r}")
        elif key not in _KINDS:
            known = ", ".join(sorted(_KINDS))
            raise UsageError(f"{path}: key {key!r}", f"unknown key (known keys: {known})")
        key_now = _ALIASES.get(key, key)
        data[_FIELDS.get(key_now, key_now)] = _option(path, loader, key, node)
    return data


def _mapping(path: str, loader: Any, node: Any, prefix: str) -> list[tuple[str, int, Any]]:
    """A YAML mapping's (key, line of the key, value node) triples: string keys only, none given twice.

    The safe loader would keep the last of two equal keys without a word; `<<` merges still work,
    and a key written in the mapping itself overrides a merged one, as YAML says.
    """
    first: dict[str, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _YAML + "merge":
            continue
        key, line = _key(path, loader, key_node, prefix), key_node.start_mark.line + 1
        if key in first:
            raise UsageError(f"{path}: key {prefix + key!r}",
                             f"given twice, on lines {first[key]} and {line} (YAML would silently keep the last)")
        first[key] = line
    loader.flatten_mapping(node)
    pairs = {_key(path, loader, k, prefix): (k.start_mark.line + 1, v) for k, v in node.value}
    return [(key, line, value) for key, (line, value) in pairs.items()]


def _key(path: str, loader: Any, node: Any, prefix: str) -> str:
    """A mapping key, which must be a string in the YAML (`ON:` and `1:` are not)."""
    if node.id == "scalar" and node.tag == _YAML + "str":
        return node.value
    if node.id != "scalar":
        raise UsageError(f"{path}: {prefix.rstrip('.') or 'spec'}", f"a key must be a name, not a {node.id}")
    raise UsageError(f"{path}: key {prefix + node.value!r}",
                     f"keys must be strings, but YAML reads {node.value} as {_reading(loader, node)}; "
                     f'write "{node.value}" in quotes')


def _reading(loader: Any, node: Any) -> str:
    """What YAML made of a scalar, for a message: `the number 1.1`, `true (a boolean)`."""
    value = loader.construct_object(node, deep=True)
    if value is None:
        return "null (no value)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return "a number" if str(value) == node.value else f"the number {value}"
    return f"{value} (a {type(value).__name__})"


def _option(path: str, loader: Any, key: str, node: Any) -> Any:
    """One top-level option's value, checked against its kind."""
    where = f"{path}: key {key!r}"
    if key == "env" and node.id == "mapping":
        return _env(path, loader, node)
    if key == "slurm" and node.id == "mapping":
        return _slurm(path, loader, node)
    if key == "host_env" and node.id == "mapping":
        return {host: _env(path, loader, value, f"host_env.{host}.")
                for host, _, value in _mapping(path, loader, node, "host_env.")}
    if key == "forward_env":
        return _forward_env(where, loader, node)
    if key in ("command", "torchrun_args", "secrets") and node.id == "sequence":
        words = [_word(where, item) for item in node.value]
        if key == "secrets":
            check_secret_names(where, words)
        return words
    value = loader.construct_object(node, deep=True)
    kinds = _KINDS[_ALIASES.get(key, key)]
    if not isinstance(value, kinds) or isinstance(value, bool):
        wanted = " or ".join(_KIND_NAMES[k] for k in kinds)
        raise UsageError(where, f"must be {wanted}, not {type(value).__name__}")
    if isinstance(value, int) and not _DECIMAL.fullmatch(node.value):
        if key == "nproc_per_node":
            return node.value  # as written; check_spec says what is wrong with it
        raise UsageError(where, f"write a plain decimal number: YAML reads {node.value} as {value}")
    if key == "command":  # a string, split like a shell would
        try:
            return shlex.split(str(value))
        except ValueError as exc:
            raise UsageError(where, f"cannot split into arguments: {exc}") from None
    return str(value) if key == "nproc_per_node" else value


def _slurm(path: str, loader: Any, node: Any) -> dict[str, Any]:
    """The `slurm:` section: known keys only, integers as plain decimals, words as written."""
    options: dict[str, Any] = {}
    for key, _, value in _mapping(path, loader, node, "slurm."):
        where = f"{path}: key 'slurm.{key}'"
        kind = SLURM_KEYS.get(key)
        if kind is None:
            raise UsageError(where, f"unknown key; the slurm section takes {', '.join(SLURM_KEYS)}")
        if kind is list:
            if value.id != "sequence":
                raise UsageError(where, "must be a list of arguments")
            options[key] = [_word(where, item) for item in value.value]
        elif value.id != "scalar" or (kind is int and not _DECIMAL.fullmatch(value.value)):
            raise UsageError(where, f"must be {'a plain decimal number' if kind is int else 'a string'}")
        else:
            options[key] = int(value.value) if kind is int else value.value
    return options


def _word(where: str, node: Any) -> str:
    """An argument list item exactly as written: `1.10` stays "1.10", `010` stays "010"."""
    if node.id != "scalar":
        raise UsageError(where, f"items must be strings, not a {node.id}")
    return node.value


def _forward_env(where: str, loader: Any, node: Any) -> list[str]:
    """`forward_env:` a list of prefixes (replacing the defaults), or false for none."""
    from .environment import check_prefixes

    if node.id == "sequence":
        return check_prefixes([_word(where, item) for item in node.value], where)
    if loader.construct_object(node, deep=True) is False:
        return []
    raise UsageError(where, "must be a list of prefixes (e.g. [NCCL_, WANDB_]) or false")


def _env(path: str, loader: Any, node: Any, prefix: str = "env.") -> dict[str, str]:
    """The `env:` mapping (or one host's under `host_env:`): string keys and values only, each variable checked."""
    if node.id != "mapping":
        raise UsageError(f"{path}: key {prefix.rstrip('.')!r}", "must be a mapping of variables")
    env = {}
    for key, _, value_node in _mapping(path, loader, node, prefix):
        where = f"{path}: key '{prefix}{key}'"
        env[key] = _env_value(where, loader, value_node)
        check_env_var(where, key, env[key])
    return env


def _env_value(where: str, loader: Any, node: Any) -> str:
    """A variable's value, which must be a string in the YAML: `1.10` would silently become 1.1."""
    if node.id != "scalar":
        raise UsageError(where, f"must be a string, not a {node.id}")
    if node.tag == _YAML + "str":
        return node.value
    if not node.value:
        raise UsageError(where, 'has no value (YAML reads it as null); write "" for an empty string')
    raise UsageError(where, f"must be a string, but YAML reads {node.value} as {_reading(loader, node)}; "
                            f'write "{node.value}" in quotes')


def check_env_var(where: str, key: str, value: str) -> None:
    """Refuse a variable a rank cannot get: a bad name, one fablaunch sets itself, a NUL or an oversized value."""
    from .plan import reserved_env  # deferred: plan imports this module for JobSpec

    if not _ENV_KEY.fullmatch(key):
        raise UsageError(where, f"{key!r} is not a valid environment variable name")
    problem = reserved_env(key)
    if problem:
        raise UsageError(where, problem)
    if "\0" in value:
        raise UsageError(where, f"the value of {key} has a NUL byte, which no environment variable can hold")
    size = _size(f"{key}={value}")
    if size > MAX_VALUE_BYTES:
        raise UsageError(where, f"{key}=VALUE is {size} bytes, over the limit of {MAX_VALUE_BYTES} per variable "
                                "(Linux will not start a program with one over 131072); pass big data in a file")


def check_secret_names(where: str, names: Iterable[str]) -> None:
    """Secrets name environment variables, so each must be a valid variable name."""
    for name in names:
        if not _ENV_KEY.fullmatch(name):
            raise UsageError(where, f"{name!r} is not a valid environment variable name")


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
    """Merge a spec file, the command after `--` and the flags given (None = not given).

    `env` and `secrets` add to the spec's (a flag's variable wins); every other flag replaces its key.
    The environment is layered as environment.py says: this process's environment gives the
    forwarded variables; `forward_env` (prefixes, adding to the spec's or the defaults),
    `no_forward_env` and `env_file` are the flags of that.
    """
    data = read_spec(spec_path) if spec_path else {}
    flag_env = flags.pop("env", None) or {}
    for key, value in flag_env.items():
        check_env_var("--env", key, value)
    data["env"], data["env_sources"] = _layered_env(data, flag_env, flags.pop("forward_env", None),
                                                    flags.pop("no_forward_env", None), flags.pop("env_file", None),
                                                    os.environ)
    flag_secrets = flags.pop("secrets", None) or []
    check_secret_names("--secret", flag_secrets)
    data["secrets"] = list(dict.fromkeys([*data.get("secrets", []), *flag_secrets]))
    if command:
        data["command"] = command
    for name, value in flags.items():
        if value is not None:
            data[name] = value
    data["port_given"] = "port" in data
    spec = JobSpec(**{f.name: data[f.name] for f in fields(JobSpec) if f.name in data})
    check_spec(spec)
    return spec


def _layered_env(data: dict[str, Any], flag_env: dict[str, str], more_prefixes: list[str] | None,
                 no_forward: bool | None, env_file: str | None,
                 environ: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Forwarded variables, then the env file, the spec's `env:` and `--env`: the variables and their sources."""
    from . import environment
    from .plan import reserved_env

    prefixes = list(environment.DEFAULT_FORWARD if data.get("forward_env") is None else data["forward_env"])
    prefixes += environment.check_prefixes(list(more_prefixes or []), "--forward-env")
    if no_forward:
        prefixes = []
    layers: list[tuple[str, dict[str, str]]] = [
        (environment.FORWARDED, environment.forwarded(environ, prefixes,
                                                      frozenset(k for k in environ if reserved_env(k))))]
    path, named = environment.env_file_path(env_file, data.get("env_file"))
    if path is not None:
        from_file = environment.read_env_file(path)
        for key, value in from_file.items():
            check_env_var(f"{path} ({key})", key, value)
        layers.append((f"env file {path}" if named != environment.DEFAULT_ENV_FILE else named, from_file))
    layers += [("spec", data.get("env", {})), ("--env", flag_env)]
    env: dict[str, str] = {}
    sources: dict[str, str] = {}
    for source, values in layers:
        for key, value in values.items():
            env[key] = value
            sources[key] = source
    return env, sources


def check_spec(spec: JobSpec) -> None:
    """Reject options that cannot make a working job, naming the flag."""
    _check_command(spec.command)
    if spec.name is not None:
        check_job_name(spec.name, "--job")
    if not 0 < spec.port < 65536:
        raise UsageError("--port", f"{spec.port} is not a TCP port (1-65535)")
    if not 1 <= spec.parallel <= MAX_PARALLEL:
        raise UsageError("--parallel", f"must be from 1 to {MAX_PARALLEL}, not {spec.parallel}")
    if spec.max_restarts is not None and spec.max_restarts < 0:
        raise UsageError("--max-restarts", f"must be 0 or more, not {spec.max_restarts}")
    _check_nproc(spec.nproc_per_node)
    if spec.master_addr is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]+", spec.master_addr):
        raise UsageError("--master-addr", f"{spec.master_addr!r} is not a host name or address")
    if spec.python is not None and "\n" in spec.python:
        raise UsageError("--python", "the interpreter path has a newline in it")
    for where, text in (("--python", spec.python), ("--workdir", spec.workdir), ("--hosts", spec.hosts),
                        ("--gpus", spec.gpus)):
        if text is not None and "\0" in text:
            raise UsageError(where, "has a NUL byte, which no path can hold")
    _check_words("torchrun_args", spec.torchrun_args)
    _check_total(spec)


def _check_nproc(nproc: str | None) -> None:
    """torchrun's --nproc-per-node: a word it knows, or 1 to MAX_SLOTS in ASCII digits."""
    if nproc is None or nproc in ("gpu", "cpu", "auto"):
        return
    if not _DIGITS.fullmatch(nproc) or not nproc.strip("0"):
        raise UsageError("--nproc-per-node", f"{nproc!r} is not a positive integer, gpu, cpu or auto")
    if len(nproc) > 9 or int(nproc) > MAX_SLOTS:  # int() of thousands of digits raises
        raise UsageError("--nproc-per-node", f"must be at most {MAX_SLOTS}, not {nproc}")


def _check_command(command: list[str]) -> None:
    """A command to run: its first word names a program or script, so it cannot be blank."""
    if not command:
        raise UsageError("command", "no training command given: put it after `--`, e.g. `-- train.py --lr 1e-3`")
    if not command[0].strip():
        raise UsageError("command", f"the first word, the program or script to run, is blank ({command[0]!r}): "
                                    "e.g. `-- train.py --lr 1e-3`")
    _check_words("command", command)


def _check_words(where: str, words: list[str]) -> None:
    """Arguments reach the program through exec, which cannot pass a NUL byte or one over MAX_VALUE_BYTES."""
    for index, word in enumerate(words):
        if "\0" in word:
            raise UsageError(where, f"argument {index + 1} has a NUL byte, which no argument can hold")
        size = _size(word)
        if size > MAX_VALUE_BYTES:
            raise UsageError(where, f"argument {index + 1} is {size} bytes, over the limit of {MAX_VALUE_BYTES} "
                                    "per argument (Linux will not start a program with one over 131072); "
                                    "pass big data in a file")


def _check_total(spec: JobSpec) -> None:
    """The whole command and environment of one session must fit what exec can pass, with room to spare."""
    strings = [*spec.command, *spec.torchrun_args, *(f"{k}={v}" for k, v in spec.env.items())]
    total = sum(_size(s) + 1 for s in strings)  # exec counts each string's terminating NUL
    total += max((sum(_size(f"{k}={v}") + 1 for k, v in values.items()) for values in spec.host_env.values()),
                 default=0)  # a host's own variables come on top (or in place) of the job's
    if total > MAX_TOTAL_BYTES:
        raise UsageError("command and --env", f"together {total} bytes, over the limit of {MAX_TOTAL_BYTES} per "
                                              "session (Linux's ARG_MAX is typically 2 MiB, shared with the "
                                              "hosts' environment); pass big data in a file")


def _size(text: str) -> int:
    """Bytes as exec sees them (arguments may carry undecodable bytes as surrogate escapes)."""
    return len(text.encode("utf-8", "surrogateescape"))


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
