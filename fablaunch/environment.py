"""Where a rank's environment comes from: the launching shell, an env file, the spec, flags and per host.

Multi-node jobs fail in ways that only show at scale when a variable set on the head node
(`NCCL_SOCKET_IFNAME`, `NCCL_DEBUG`, `WANDB_API_KEY`, `HF_HOME`) never reaches the ranks: DeepSpeed users
lose `WANDB_*` this way, and everybody writes `--env` ten times. So the variables whose prefixes mark
them as the job's business are carried from the launching shell by default, as DeepSpeed's launcher does,
an env file adds the team's settings, and a host's own values (one node's network interface) win for
that host. The layers, later ones winning:

1. fablaunch's defaults (OMP_NUM_THREADS=1, PYTHONUNBUFFERED=1);
2. variables of the launching shell with a forwarded prefix (`--no-forward-env` turns this off);
3. the env file: `--env-file FILE`, else the spec's `env_file:`, else `.fablaunch.env` if present;
4. the spec's `env:`;
5. `--env KEY=VALUE`;
6. per host: the spec's `host_env:` for that host, then the host file's `KEY=VALUE` on that host's line.

Each layer is pure data here; reading the shell's environment and files happens once, when the spec
is built, and the result records where each variable came from so a dry run can say so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from .errors import UsageError

# Prefixes of variables carried from the launching shell: the communication libraries (NCCL, UCX,
# libfabric), CUDA and torch settings, Python's own, and the experiment trackers and hubs.
DEFAULT_FORWARD = ("NCCL_", "CUDA_", "TORCH_", "PYTHON", "UCX_", "FI_", "WANDB_", "HF_")
# Variables that match a prefix but describe the head node, not the ranks: each rank's device is chosen
# by its LOCAL_RANK, and the head node's Python installation is not the hosts'.
NEVER_FORWARD = frozenset({"CUDA_VISIBLE_DEVICES", "PYTHONHOME", "PYTHONSTARTUP"})
DEFAULT_ENV_FILE = ".fablaunch.env"
MAX_ENV_FILE_BYTES = 1 << 20
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

FORWARDED = "forwarded from this shell"


def check_prefixes(prefixes: list[str], where: str) -> list[str]:
    """Forwarded prefixes are the start of variable names: letters, digits and underscores."""
    for prefix in prefixes:
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise UsageError(where, f"{prefix!r} is not the start of an environment variable name (e.g. NCCL_)")
    return prefixes


def forwarded(environ: Mapping[str, str], prefixes: list[str] | tuple[str, ...],
              skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """The launching shell's variables that start with one of `prefixes`, in name order.

    `skip` names variables the caller may not set (the rank contract): those are left behind, as are
    the head-node-only ones (NEVER_FORWARD) and values no remote environment could hold.
    """
    found = {}
    for key in sorted(environ):
        value = environ[key]
        if key in NEVER_FORWARD or key in skip or not _KEY.fullmatch(key) or "\0" in value:
            continue
        if any(key.startswith(p) for p in prefixes):
            found[key] = value
    return found


def read_env_file(path: Path) -> dict[str, str]:
    """`KEY=VALUE` lines (`export KEY=VALUE` too); blank lines and `#` comments skipped.

    A value wrapped in matching single or double quotes loses them, and nothing else is interpreted:
    no `$VAR` expansion, no escapes, so what is written is what the rank gets. A bad line is a
    UsageError naming FILE:LINE.
    """
    try:
        if path.stat().st_size > MAX_ENV_FILE_BYTES:
            raise UsageError(str(path), f"over {MAX_ENV_FILE_BYTES} bytes: not an env file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(str(path), "env file not found") from None
    except IsADirectoryError:
        raise UsageError(str(path), "is a directory, not an env file") from None
    except OSError as exc:
        raise UsageError(str(path), f"cannot read the env file: {exc.strerror or exc}") from None
    if b"\0" in data:
        raise UsageError(str(path), "has NUL bytes: not a text env file")
    text = data.decode("utf-8", "surrogateescape")
    env: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{path}:{number}"
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export ") or line.startswith("export\t"):
            line = line[len("export"):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            raise UsageError(where, f"{raw.strip()[:60]!r} is not KEY=VALUE")
        if not _KEY.fullmatch(key):
            raise UsageError(where, f"{key[:60]!r} is not a valid environment variable name")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key in env:
            raise UsageError(where, f"{key} is set twice in this file")
        env[key] = value
    return env


def env_file_path(given: str | None, spec_value: str | None, cwd: Path | None = None) -> tuple[Path | None, str]:
    """The env file to read and how it was named: the flag's, else the spec's, else ./.fablaunch.env if present."""
    if given:
        return Path(given).expanduser(), "--env-file"
    if spec_value:
        return Path(spec_value).expanduser(), "env_file"
    default = (cwd or Path.cwd()) / DEFAULT_ENV_FILE
    return (default, DEFAULT_ENV_FILE) if default.is_file() else (None, "")


def for_host(host_env: Mapping[str, Mapping[str, str]], spec: str, name: str) -> dict[str, str]:
    """A host's own variables from the spec's `host_env:`: the entry for its spec as written, else its name."""
    return dict(host_env.get(spec) or host_env.get(name) or {})
