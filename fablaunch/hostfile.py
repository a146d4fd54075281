"""Read the `hosts` and `gpus` files that name the machines of a job.

Both formats are the distributed-training guide's: one entry per line, with blank lines and `#`
comments allowed. `hosts` lists each node once and may give its GPU count as ` slots=N` (DeepSpeed's
hostfile syntax); `gpus` lists a host once per GPU, in rank order, and a host's lines need not be
adjacent. Every entry is checked strictly here because it ends up in ssh arguments, tmux session
options and file paths on other machines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1"})
# Most GPUs (or workers) one node may claim: far above any real machine, so a bigger number is a typo.
MAX_SLOTS = 1024

_METACHARACTERS = set(";|&$`'\"<>()\\*?{}!~^%,=")
_NAME = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]")
_USER = re.compile(r"[A-Za-z0-9_.-]+")
# ASCII digits only: str.isdigit() and int() also take full-width and other Unicode digits,
# which ssh and torchrun do not.
_DIGITS = re.compile(r"[0-9]+")
_LABEL = str.maketrans({":": "+", "[": "=", "]": "="})


@dataclass(frozen=True)
class Host:
    """One host as written in a host file: `[user@]name[:port]`.

    `spec` is the text as written; it is the host's identity throughout fablaunch (tables, file
    paths, launch records), so two aliases of one address stay two hosts.
    """

    spec: str
    name: str
    user: str | None = None
    port: int | None = None
    slots: int | None = None

    @property
    def is_local(self) -> bool:
        """Whether the host is this machine, reached without SSH."""
        return self.name in LOCAL_HOSTS and self.port is None

    @property
    def label(self) -> str:
        """The host spec as a file-name component, one-to-one (`:` is not portable in paths).

        The replacements are characters a host spec cannot contain, so two hosts never share a
        label, and with it a job directory or a process marker.
        """
        return self.spec.translate(_LABEL)


def parse_host(text: str, where: str) -> Host:
    """Parse one `[user@]host[:port]` entry, naming `where` in any error."""
    if any(ch.isspace() for ch in text):
        raise UsageError(where, f"{text!r} is not a valid host: whitespace inside")
    bad = sorted(set(text) & _METACHARACTERS)
    if bad:
        raise UsageError(where, f"{text!r} is not a valid host: shell metacharacter {' '.join(bad)}")
    user, at, rest = text.rpartition("@")
    # An empty user (`@host`) would silently become "no user"; say so rather than guess.
    if at and not _USER.fullmatch(user):
        why = "nothing before '@' (drop the '@' or name the user)" if not user else f"bad user name {user!r}"
        raise UsageError(where, f"{text!r} is not a valid host: {why}")
    if not rest:
        raise UsageError(where, f"{text!r} is not a valid host: no host name after '@'")
    name, port = rest, None
    if rest.count(":") == 1 or (rest.startswith("[") and "]:" in rest):
        name, _, port_text = rest.rpartition(":")
        if not _DIGITS.fullmatch(port_text) or len(port_text) > 5 or not 0 < int(port_text) < 65536:
            raise UsageError(where, f"{text!r} is not a valid host: port {port_text!r} is not 1-65535")
        port = int(port_text)
    if not _NAME.fullmatch(name) or name.startswith(("-", ".")):
        raise UsageError(where, f"{text!r} is not a valid host name")
    return Host(spec=text, name=name, user=user or None, port=port)


def _entries(path: Path) -> list[tuple[str, str]]:
    """Yield (where, text) for every non-blank, non-comment line of a host file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(str(path), "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(str(path), f"cannot read: {exc}") from None
    entries = []
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if text:
            entries.append((f"{path}:{number}", text))
    if not entries:
        raise UsageError(str(path), "no hosts listed (the file is empty or only comments)")
    return entries


def read_hosts(path: Path) -> list[Host]:
    """Read a `hosts` file: one node per line, optionally ` slots=N`, no node twice."""
    hosts: list[Host] = []
    seen: dict[str, str] = {}
    for where, text in _entries(path):
        fields = text.split()
        slots = None
        if len(fields) == 2 and fields[1].startswith("slots="):
            slots = _slots(fields[1].removeprefix("slots="), where)
            text = fields[0]
        host = parse_host(text, where)
        if host.spec in seen:
            raise UsageError(where, f"host {host.spec!r} is listed twice (first at {seen[host.spec]})")
        seen[host.spec] = where
        hosts.append(Host(host.spec, host.name, host.user, host.port, slots))
    return hosts


def _slots(value: str, where: str) -> int:
    """The N of ` slots=N`: ASCII digits, 1 to MAX_SLOTS."""
    if not _DIGITS.fullmatch(value) or not value.strip("0"):
        raise UsageError(where, f"slots must be a positive integer, not {value!r}")
    if len(value) > 9 or int(value) > MAX_SLOTS:  # int() of thousands of digits raises
        raise UsageError(where, f"slots must be at most {MAX_SLOTS}, not {value}")
    return int(value)


def read_gpus(path: Path) -> list[Host]:
    """Read a `gpus` file: one line per GPU (rank order), each host repeated once per GPU."""
    return [parse_host(text, where) for where, text in _entries(path)]
