"""Choose part of a host file's world: `--include`/`--exclude` (DeepSpeed's syntax), `--num-nodes`, `--num-gpus`.

A cluster's host file rarely changes, while the hosts a run should use do (a node is down, a GPU is
bad, a debug run wants two nodes), so a launch can select from the file instead of editing a copy.
The syntax is DeepSpeed's, which many users already type: hosts separated by `@`, each optionally
followed by `:` and the indices of its GPUs (`node1:0,1@node2`); a host may be a ClusterShell range
(`gpu[01-04]:0`). A GPU index is a host's local index: in a gpus file its lines in order of
appearance (the Nth line of a host is its GPU N-1), in a hosts file its slots. The rules, in order:

- `include`: only these hosts (and of a host given with indices, only those GPUs);
- `exclude`: not these hosts (a host given with indices loses only those GPUs; a host left with none
  is dropped);
- `num_nodes`: the first N hosts that remain, in file order;
- `num_gpus`: the first N GPUs that remain, in rank order (a gpus file's lines; a hosts file's nodes
  and their slots in turn, the last node taking what is left);
- what remains keeps the file's order, so ranks are renumbered from 0 and MASTER_ADDR is the first
  remaining host, exactly as if the file listed only these.

Where a host is left with GPUs other than its first K, its sessions get `CUDA_VISIBLE_DEVICES` listing
them, so LOCAL_RANK k (or torchrun's worker k) runs on the kth selected GPU; a user's own
CUDA_VISIBLE_DEVICES is then refused rather than silently overridden. All of this is pure (no SSH),
so every rule is a unit test; `launcher.make_plan` applies it between reading hosts and planning.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from .errors import UsageError
from .hostfile import MAX_SLOTS, Host, expand
from .plan import Plan

_INDEX = re.compile(r"[0-9]{1,9}")  # ASCII digits only, as everywhere a number reaches a host
DEVICES_VAR = "CUDA_VISIBLE_DEVICES"
# A filter: host name -> its GPU indices, or None for the whole host.
Filter = dict[str, tuple[int, ...] | None]


@dataclass(frozen=True)
class Selection:
    """The selection flags of a launch (or the spec's keys of the same names); all None selects everything."""

    include: str | None = None
    exclude: str | None = None
    num_nodes: int | None = None
    num_gpus: int | None = None

    @classmethod
    def of(cls, spec: Any) -> Selection:
        """The selection a JobSpec asks for."""
        return cls(*(getattr(spec, f.name, None) for f in dataclasses.fields(cls)))

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) is not None for f in dataclasses.fields(self))

    def flags(self) -> str:
        """The selection as the flags that give it, for messages: `--exclude node2:1 --num-nodes 2`."""
        return " ".join(f"--{f.name.replace('_', '-')} {getattr(self, f.name)}" for f in dataclasses.fields(self)
                        if getattr(self, f.name) is not None)


@dataclass(frozen=True)
class World:
    """The hosts a selection leaves, ready to plan.

    `hosts` is what the planner takes: a gpus file's lines, or a hosts file's nodes with `slots` set
    to their workers wherever the selection decided them. `nproc_per_node` replaces the spec's (a
    number becomes each node's slots before selecting, so it is cleared). `devices` maps a host spec
    to the GPU indices its CUDA_VISIBLE_DEVICES must list: only hosts left with other than their first K.
    """

    hosts: list[Host]
    nproc_per_node: str | None = None
    devices: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


def parse_filter(text: str, flag: str) -> Filter:
    """Read DeepSpeed's `node1:0,1@node2` into {name: indices or None}; names may be ClusterShell ranges.

    Hosts are named as the file names them, without `user@` or `:port` (both characters are this
    syntax's own); a name given twice, an empty name or index, or an index that is not a number
    is refused, naming the flag.
    """
    found: Filter = {}
    for term in text.split("@"):
        if not term:
            raise UsageError(flag, f"{text!r} has an empty host name (write hosts as node1:0,1@node2)")
        name_part, colon, index_part = _split_indices(term)
        if "," in _outside_brackets(name_part):
            raise UsageError(flag, f"{term!r}: separate hosts with '@' and give GPU indices after ':' "
                                   "(node1:0,1@node2)")
        indices = _indices(index_part, term, flag) if colon else None
        for host in expand(name_part, flag):
            if host.user or host.port:
                raise UsageError(flag, f"{term!r}: name hosts without user@ or :port, as node1:0,1@node2")
            if host.name in found:
                raise UsageError(flag, f"{text!r} names {host.name} twice")
            found[host.name] = indices
    return found


def _split_indices(term: str) -> tuple[str, str, str]:
    """A term split at its last `:` outside brackets (inside are IPv6 addresses): name, ':', indices."""
    outside = _outside_brackets(term)
    cut = outside.rfind(":")
    return (term, "", "") if cut < 0 else (term[:cut], ":", term[cut + 1:])


def _outside_brackets(text: str) -> str:
    """The text with whatever is inside brackets blanked out (same length), to find separators."""
    depth, kept = 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        kept.append(ch if depth == 0 else " ")
        if ch == "]" and depth > 0:
            depth -= 1
    return "".join(kept)


def _indices(text: str, term: str, flag: str) -> tuple[int, ...]:
    """GPU indices `0,1,3`: ASCII numbers below MAX_SLOTS, each once, kept in ascending order."""
    numbers = []
    for item in text.split(","):
        if not _INDEX.fullmatch(item) or int(item) >= MAX_SLOTS:
            raise UsageError(flag, f"{term!r}: GPU indices are numbers from 0 to {MAX_SLOTS - 1} separated by "
                                   f"commas, not {item!r}")
        if int(item) in numbers:
            raise UsageError(flag, f"{term!r} names GPU {item} twice")
        numbers.append(int(item))
    return tuple(sorted(numbers))


def select(mode: str, hosts: list[Host], selection: Selection, nproc_per_node: str | None = None) -> World:
    """Apply a selection to a host file's hosts (`mode` "gpus": GPU lines; "torchrun": nodes); see the module.

    `nproc_per_node` is the spec's: a number is every node's GPU count; a word (`gpu`, `cpu`, `auto`)
    leaves the count to each host when it starts, so selecting GPUs by index or count is refused
    beside it. Anything that selects nothing, names a host or GPU the file does not have, or asks
    for more than remains is a UsageError naming the flag.
    """
    if not selection:
        return World(list(hosts), nproc_per_node)
    include = parse_filter(selection.include, "--include") if selection.include is not None else None
    exclude = parse_filter(selection.exclude, "--exclude") if selection.exclude is not None else None
    for flag, value in (("--num-nodes", selection.num_nodes), ("--num-gpus", selection.num_gpus)):
        if value is not None and value < 1:
            raise UsageError(flag, f"must be at least 1, not {value}")
    numeric = nproc_per_node is not None and nproc_per_node.isdigit()
    word = nproc_per_node if mode != "gpus" and not numeric else None
    if mode != "gpus" and numeric:
        hosts = [dataclasses.replace(h, slots=int(str(nproc_per_node))) for h in hosts]
    nodes = list({h.spec: h for h in hosts}.values())  # a gpus file's hosts, first appearance first
    count: dict[str, int | None] = {
        h.spec: sum(1 for line in hosts if line.spec == h.spec) if mode == "gpus" else None if word else h.slots
        for h in nodes}
    for flag, given in (("--include", include), ("--exclude", exclude)):
        _check_names(flag, given, nodes, word)
    # Each remaining host (file order) and its remaining GPUs: local indices, or None for all of an unknown number.
    kept: dict[str, list[int] | None] = {h.spec: _all(count[h.spec]) for h in nodes}
    if include is not None:
        included: dict[str, list[int] | None] = {}
        for h in nodes:
            if h.name in include:
                indices = include[h.name]
                included[h.spec] = kept[h.spec] if indices is None else _chosen(indices, count[h.spec], h, "--include")
        kept = included
    if exclude is not None:
        kept = _excluded(kept, exclude, nodes, count)
    if selection.num_nodes is not None:
        if selection.num_nodes > len(kept):
            raise UsageError("--num-nodes", f"asks for {selection.num_nodes} hosts, but {_left(selection, len(kept))}")
        kept = dict(list(kept.items())[:selection.num_nodes])
    if selection.num_gpus is not None:
        order = [(line.spec, i) for line, i in _local(hosts)] if mode == "gpus" else \
            [(spec, i) for spec, gpus in kept.items() for i in gpus or ()]
        kept = _first_gpus(kept, order, selection, word)
    if not kept:
        raise UsageError(selection.flags(), "selects no host at all")
    devices = {spec: tuple(g) for spec, g in kept.items() if g is not None and g != list(range(len(g)))}
    if mode == "gpus":
        return World([line for line, i in _local(hosts) if i in (kept.get(line.spec) or ())], nproc_per_node,
                     devices)
    chosen = [h if (g := kept[h.spec]) is None else dataclasses.replace(h, slots=len(g))
              for h in nodes if h.spec in kept]
    return World(chosen, None if numeric else nproc_per_node, devices)


def _local(lines: list[Host]) -> list[tuple[Host, int]]:
    """Each gpus-file line with its local index: how many lines of its host came before it."""
    seen: dict[str, int] = {}
    found = []
    for line in lines:
        seen[line.spec] = seen.get(line.spec, -1) + 1
        found.append((line, seen[line.spec]))
    return found


def _all(count: int | None) -> list[int] | None:
    return None if count is None else list(range(count))


def _check_names(flag: str, chosen: Filter | None, nodes: list[Host], word: str | None) -> None:
    """Every name a filter gives is a host of the file; GPU indices need a GPU count, which a word leaves open."""
    if chosen is None:
        return
    names = {h.name for h in nodes}
    for name, indices in chosen.items():
        if name not in names:
            listed = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "")
            raise UsageError(flag, f"{name!r} is not one of the job's hosts ({listed})")
        if indices is not None and word is not None:
            raise UsageError(flag, f"GPU indices ({name}:{','.join(map(str, indices))}) do not go with "
                                   f"--nproc-per-node {word}: the indices decide each node's workers")


def _chosen(indices: tuple[int, ...], count: int | None, host: Host, flag: str) -> list[int]:
    """The GPUs a filter names on a host, each one it has (any, where its count is unknown)."""
    for index in indices:
        if count is not None and index >= count:
            raise UsageError(flag, f"{host.spec} has no GPU {index} (it has {count}: 0-{count - 1})")
    return list(indices)


def _excluded(kept: dict[str, list[int] | None], exclude: Filter, nodes: list[Host],
              count: dict[str, int | None]) -> dict[str, list[int] | None]:
    """`kept` without the excluded hosts and GPUs; a host left with no GPU is dropped."""
    left: dict[str, list[int] | None] = {}
    for h in nodes:
        if h.spec not in kept:
            continue
        gpus, indices = kept[h.spec], exclude.get(h.name, ())
        if indices is None:
            continue  # the whole host
        if indices and gpus is None:
            raise UsageError("--exclude", f"{h.spec} has no slots=N in the hosts file (nor --nproc-per-node N), so "
                                          "which GPUs would remain is unknown: give its slots, or --include the "
                                          "GPUs to use")
        _chosen(indices, count[h.spec], h, "--exclude")
        remaining = None if gpus is None else [g for g in gpus if g not in indices]
        if remaining != []:
            left[h.spec] = remaining
    return left


def _first_gpus(kept: dict[str, list[int] | None], order: list[tuple[str, int]], selection: Selection,
                word: str | None) -> dict[str, list[int] | None]:
    """The first N remaining GPUs of `order` (host spec, local index: rank order), hosts kept in file order."""
    unknown = [spec for spec, g in kept.items() if g is None]
    if unknown:
        why = f"--nproc-per-node {word}" if word else "no slots=N in the hosts file"
        raise UsageError("--num-gpus", f"{unknown[0]} has {why}, so its GPU count is unknown: give slots=N or "
                                       "a number to --nproc-per-node")
    remaining = [(spec, i) for spec, i in order if i in (kept.get(spec) or ())]
    wanted = selection.num_gpus or 0
    if wanted > len(remaining):
        raise UsageError("--num-gpus", f"asks for {wanted} GPUs, but {_left(selection, len(remaining), 'GPUs')}")
    taken = remaining[:wanted]
    return {spec: sorted(i for s, i in taken if s == spec) for spec in kept if any(s == spec for s, _ in taken)}


def _left(selection: Selection, number: int, what: str = "hosts") -> str:
    """What remains for a request of more, for its message: `only 2 hosts remain after --exclude node1`."""
    before = Selection(selection.include, selection.exclude,
                       selection.num_nodes if what == "GPUs" else None).flags()
    return f"only {number} {what} remain" + (f" after {before}" if before else " in the host file")


def pin_devices(plan: Plan, world: World, sources: dict[str, str] | None = None) -> Plan:
    """The plan with CUDA_VISIBLE_DEVICES set on the hosts whose selected GPUs are not simply their first K.

    A CUDA_VISIBLE_DEVICES the ranks already get (from --env, the spec, an env file, this shell) would
    either be overwritten or make the indices mean other GPUs, so giving both is refused, naming
    where it came from (`sources`, variable -> origin).
    """
    if not world.devices:
        return plan
    sessions = []
    for s in plan.sessions:
        if s.host.spec in world.devices:
            pinned = ",".join(map(str, world.devices[s.host.spec]))
            if DEVICES_VAR in s.env_dict:
                origin = (sources or {}).get(DEVICES_VAR, "host_env")  # else a host's own value
                raise UsageError(origin, f"{DEVICES_VAR} is set for the ranks, and the selection gives {s.host.spec} "
                                         f"the GPUs {pinned}, which fablaunch sets {DEVICES_VAR} for: give one "
                                         "or the other")
            s = dataclasses.replace(s, env=(*s.env, (DEVICES_VAR, pinned)))
        sessions.append(s)
    return dataclasses.replace(plan, sessions=tuple(sessions))


def world_of(plan: Plan) -> dict[str, Any]:
    """The world a plan starts, as a launch with a selection shows it: WORLD_SIZE, MASTER_ADDR, and per host
    its node rank, its ranks (per-GPU mode) or workers (torchrun mode, whose global ranks the rendezvous
    decides) and the GPUs it uses (`CUDA_VISIBLE_DEVICES` where pinned, else its first K; `all` where the
    host decides)."""
    hosts: list[dict[str, Any]] = []
    for host in plan.hosts:
        sessions = plan.on(host)
        pinned = sessions[0].env_dict.get(DEVICES_VAR)
        if plan.mode == "gpus":
            ranks: list[int] = [s.rank for s in sessions if s.rank is not None]
            hosts.append({"host": host.spec, "node": sessions[0].node, "ranks": ranks,
                          "gpus": pinned or spans(range(len(ranks)))})
        else:
            argv = sessions[0].argv
            workers = argv[argv.index("--nproc-per-node") + 1]
            gpus = pinned or (spans(range(int(workers))) if workers.isdigit() else "all")
            hosts.append({"host": host.spec, "node": sessions[0].node, "workers": workers, "gpus": gpus})
    if plan.mode == "gpus":
        size: int | None = len(plan.sessions)
    else:
        counts = [h["workers"] for h in hosts]
        size = sum(int(c) for c in counts) if all(c.isdigit() for c in counts) else None
    return {"world_size": size, "master_addr": plan.master_addr, "hosts": hosts}


def spans(numbers: Any) -> str:
    """Numbers as compact text: `0-3,6`."""
    numbers = list(numbers)
    parts: list[str] = []
    start = 0
    for i in range(1, len(numbers) + 1):
        if i == len(numbers) or numbers[i] != numbers[i - 1] + 1:
            first, last = numbers[start], numbers[i - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return ",".join(parts)
