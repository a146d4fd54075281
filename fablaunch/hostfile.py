"""Read the `hosts` and `gpus` files that name the machines of a job, or the same hosts given inline.

Both formats are the distributed-training guide's: one entry per line, with blank lines and `#`
comments allowed. `hosts` lists each node once and may give its GPU count as ` slots=N` (DeepSpeed's
hostfile syntax); `gpus` lists a host once per GPU, in rank order, and a host's lines need not be
adjacent. An entry may name many hosts: a ClusterShell range (`gpu[01-16]`, `user@gpu[1-3]:2222`) or
a comma-separated list of entries, expanded in the order written by ClusterShell's own parser, so
the bracket syntax means exactly what it means to `nodeset`, pdsh and Slurm. `--hosts`/`--gpus`
take either a file or such a list inline. After the host and its ` slots=N`, ` KEY=VALUE` words set
that host's own variables (`gpu03 NCCL_SOCKET_IFNAME=ens5`: one node's network interface), which win
over the job's there. Every expanded entry is checked strictly here because it ends up in ssh
arguments, tmux session options and file paths on other machines.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1"})
# Most GPUs (or workers) one node may claim: far above any real machine, so a bigger number is a typo.
MAX_SLOTS = 1024
# Most entries one host file or flag may expand to (a gpus file: GPUs). Far above any job launched over
# ssh; `n[1-99999999]` (a typo) would otherwise build a hundred million names before anything is said.
MAX_HOSTS = 65536

_METACHARACTERS = set(";|&$`'\"<>()\\*?{}!~^%,=")
_NAME = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]")
_USER = re.compile(r"[A-Za-z0-9_.-]+")
# ASCII digits only: str.isdigit() and int() also take full-width and other Unicode digits,
# which ssh and torchrun do not.
_DIGITS = re.compile(r"[0-9]+")
_LABEL = str.maketrans({":": "+", "[": "=", "]": "="})
# What a range may look like before ClusterShell parses it: name characters and bracket groups of
# numbers, `N-M` spans and `/STEP`s. Everything else NodeSet knows (`@group`, `!`, `&`, `^`) is refused,
# so a host file never reads groups from /etc/clustershell or means a set operation.
_RANGE_NAME = re.compile(r"(?:[A-Za-z0-9_.-]|\[[^\[\]]*\])+")
_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_PIECE = re.compile(r"([0-9]+)(?:-([0-9]+)(?:/([0-9]+))?)?")


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
    # The host's own variables from its host-file line (`gpu03 NCCL_SOCKET_IFNAME=ens5`): they win there.
    env: tuple[tuple[str, str], ...] = ()

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


def expand(text: str, where: str, limit: int = MAX_HOSTS) -> list[Host]:
    """The hosts one entry names, in the order written, each checked like a single host.

    An entry is `[user@]name[:port]`, where the name may be a ClusterShell range (`gpu[01-04,07]`,
    `rack[1-2]-gpu[1-8]`), or several such entries separated by commas (`node1,gpu[3-4]:2222`). The
    user and port apply to every host of their range. A range must be written ascending with each
    number once, because it is expanded in that order and a host's place decides its ranks; hosts in
    another order are listed with commas. More than `limit` hosts is refused before any is built.
    """
    if any(ch.isspace() for ch in text):
        raise UsageError(where, f"{text!r} is not a valid host: whitespace inside")
    bad = sorted(set(text) & (_METACHARACTERS - {","}))
    if bad:
        raise UsageError(where, f"{text!r} is not a valid host: shell metacharacter {' '.join(bad)}")
    hosts: list[Host] = []
    for item in _items(text, where):
        user, at, rest = item.rpartition("@")
        if ("[" in rest or "]" in rest) and not _address_literal(rest):
            name, colon, port = rest.partition(":")
            for expanded in _expand_range(name, item, where, limit - len(hosts)):
                try:
                    hosts.append(parse_host(f"{user}{at}{expanded}{colon}{port}", where))
                except UsageError as exc:  # say which range made the bad host
                    raise UsageError(where, f"{exc.problem} (from {item!r})") from None
        else:
            hosts.append(parse_host(item, where))
        if len(hosts) > limit:
            raise UsageError(where, f"too many hosts: one file or flag may name at most {MAX_HOSTS} in all")
    return hosts


def _items(text: str, where: str) -> list[str]:
    """Split a list at the commas outside brackets (those inside belong to a range); one trailing comma is fine.

    The trailing comma is how a single host is written inline (`--gpus localhost,`): without a
    comma or a bracket, a value is a file name.
    """
    items, depth, start = [], 0, 0
    for index, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    items.append(text[start:])
    if len(items) > 1 and items[-1] == "":
        items.pop()
    if "" in items:
        raise UsageError(where, f"{text!r} has an empty entry between commas")
    return items


def _address_literal(rest: str) -> bool:
    """Whether `[...]` is an IPv6 (or bracketed IPv4) address, which ssh takes, rather than a range."""
    return rest.startswith("[") and bool(set(rest[1:rest.find("]")]) & set(":."))


def _expand_range(name: str, item: str, where: str, limit: int) -> list[str]:
    """Expand one ClusterShell range (`gpu[01-04,07]`) with NodeSet, in the order written."""
    bad = f"{item!r} is not a valid host range"
    if not _RANGE_NAME.fullmatch(name):
        why = "brackets must pair up, one range inside each (gpu[01-04,07], rack[1-2]-gpu[1-8])"
        raise UsageError(where, f"{bad}: {why}")
    size = 1
    for group in _BRACKET.findall(name):
        count = 0
        for piece in group.split(","):
            match = _PIECE.fullmatch(piece)
            if not match:
                raise UsageError(where, f"{bad}: [{group}] must hold numbers N, spans N-M or N-M/STEP, separated "
                                        "by commas")
            if any(len(number) > 9 for number in match.groups() if number):
                raise UsageError(where, f"{bad}: {piece!r} is too large a number")
            first, last, step = int(match[1]), int(match[2] or match[1]), int(match[3] or 1)
            count += (last - first) // step + 1 if last >= first and step else 0
        size *= count
    if size > limit:  # counted before NodeSet, which would build every name first
        raise UsageError(where, f"{bad}: it names {size} hosts, and one file or flag may name at most {MAX_HOSTS} "
                                "in all (a typo?)")
    from ClusterShell.NodeSet import RESOLVER_NOGROUP, NodeSet, NodeSetException  # deferred: keeps `fab -l` fast
    from ClusterShell.RangeSet import RangeSet, RangeSetException

    try:
        for group in _BRACKET.findall(name):
            written = [number for piece in group.split(",") for number in RangeSet(piece)]
            if written != list(RangeSet(group)):
                raise UsageError(where, f"{bad}: [{group}] must go up, name each number once and pad them alike, "
                                        "because hosts take their ranks in the order written (list hosts in another "
                                        "order with commas: node3,node1)")
        return list(NodeSet(name, resolver=RESOLVER_NOGROUP))
    except (NodeSetException, RangeSetException) as exc:
        raise UsageError(where, f"{bad}: {exc}") from None


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
    """Read a `hosts` file: one node per line (or a range of them), optionally ` slots=N`, no node twice."""
    return _hosts(_entries(path))


def read_gpus(path: Path) -> list[Host]:
    """Read a `gpus` file: one line per GPU (rank order), each host repeated once per GPU.

    A line naming several hosts (a range or a list) stands for one line per host, in order, and
    ` slots=N` for N lines of each: `gpu[1-2] slots=2` is gpu1, gpu1, gpu2, gpu2.
    """
    return _gpus(_entries(path))


def hosts_from(value: str, flag: str = "--hosts") -> list[Host]:
    """The nodes `--hosts VALUE` names: a hosts file, or one line of one written inline (see `entries_of`)."""
    return _hosts(entries_of(value, flag))


def gpus_from(value: str, flag: str = "--gpus") -> list[Host]:
    """The GPUs `--gpus VALUE` names: a gpus file, or one line of one written inline (see `entries_of`)."""
    return _gpus(entries_of(value, flag))


def entries_of(value: str, flag: str) -> list[tuple[str, str]]:
    """(where, text) of each entry a host flag's value gives: a file's lines, or the value itself.

    An existing path is always a file. Otherwise a value with a `[` or a `,` is hosts written inline
    (`node[1-3]`, `node1,node2`, `'gpu[01-04] slots=8'`), read as one line of such a file, its errors
    naming the flag; anything else is a missing file, never a host name, so a typo'd file name cannot
    launch on a machine of that name.
    """
    if os.path.exists(value):
        return _entries(Path(value))
    if "[" in value or "," in value:
        return [(flag, value.strip())]
    raise UsageError(value, f"no such file (to name hosts inline, write a range or a list: {flag} 'node[1-3]' or "
                            f"{flag} node1,node2; a single host: {flag} node1,)")


def _hosts(entries: list[tuple[str, str]]) -> list[Host]:
    """Nodes from hosts-file entries, each with its slots; a node listed twice is refused naming both places."""
    hosts: list[Host] = []
    seen: dict[str, str] = {}
    for where, text in entries:
        text, slots, env = _split_fields(text, where)
        for host in expand(text, where, MAX_HOSTS - len(hosts)):
            if host.spec in seen:
                raise UsageError(where, f"host {host.spec!r} is listed twice (first at {seen[host.spec]})")
            seen[host.spec] = where
            hosts.append(Host(host.spec, host.name, host.user, host.port, slots, env))
    return hosts


def _gpus(entries: list[tuple[str, str]]) -> list[Host]:
    """GPU lines from gpus-file entries: each host of an entry once, or ` slots=N` times in a row."""
    lines: list[Host] = []
    env_of: dict[str, tuple[tuple[str, tuple[tuple[str, str], ...]]]] = {}
    for where, text in entries:
        text, slots, env = _split_fields(text, where)
        hosts = expand(text, where, (MAX_HOSTS - len(lines)) // (slots or 1))
        for host in hosts:
            first = env_of.setdefault(host.spec, ((where, env),))[0]
            if first[1] != env:  # one host, one set of variables: its lines must agree
                raise UsageError(where, f"host {host.spec!r} has other variables here than at {first[0]}: give "
                                        "them on every line of the host alike")
        lines += [dataclasses.replace(host, env=env) for host in hosts for _ in range(slots or 1)]
    return lines


def _split_fields(text: str, where: str) -> tuple[str, int | None, tuple[tuple[str, str], ...]]:
    """An entry's host (or range), its ` slots=N` and its ` KEY=VALUE` variables, each checked."""
    from .spec import check_env_var  # deferred: spec imports this module

    host, *rest = text.split() or [""]
    slots: int | None = None
    env: dict[str, str] = {}
    for field in rest:
        key, sep, value = field.partition("=")
        if not sep:
            raise UsageError(where, f"{text.strip()!r} is not a valid host: whitespace inside (after the host "
                                    "only slots=N and KEY=VALUE words may follow)")
        if key == "slots":
            if slots is not None:
                raise UsageError(where, "slots= is given twice")
            slots = _slots(value, where)
            continue
        if key in env:
            raise UsageError(where, f"{key} is set twice")
        check_env_var(where, key, value)
        env[key] = value
    return host, slots, tuple(env.items())


def _slots(value: str, where: str) -> int:
    """The N of ` slots=N`: ASCII digits, 1 to MAX_SLOTS."""
    if not _DIGITS.fullmatch(value) or not value.strip("0"):
        raise UsageError(where, f"slots must be a positive integer, not {value!r}")
    if len(value) > 9 or int(value) > MAX_SLOTS:  # int() of thousands of digits raises
        raise UsageError(where, f"slots must be at most {MAX_SLOTS}, not {value}")
    return int(value)
