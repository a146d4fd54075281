"""Ship the working directory to every host: rsync in parallel, shared directories detected and skipped.

Launches assume the code is already on every host, at the job's working directory. This copies it
there: one local `rsync` per host, at most `parallel` at once, over ssh with the settings every
other fablaunch connection uses (the ssh_config of `fab -S` or the user's, the host's user and port,
`fab -i` keys, the connect deadline), so a host that fab can reach rsync can reach too. Which files
go is what git would track: in a git checkout, `git ls-files` (tracked, and untracked that no
.gitignore excludes: nested ones, .git/info/exclude and the global excludes included, negations
too); elsewhere rsync's own reading of every .gitignore. `.git/` and `.fablaunch/` (this project's
launch records) and `.fablaunch.env` never go, nor what `--exclude` names.

Hosts that already see the directory (an NFS home, the machine fab runs on) must not be copied to:
rsync onto the same files from several hosts at once is wasted work at best. So before anything is
copied, a marker with a random name is put in the local directory, and every host is asked (one
round trip, through the Executor and its deadlines) whether it sees it at the destination; those
hosts are `shared`. Hosts that share a directory with each other but not with this machine (a
cluster's NFS, launched from a laptop) are found the same way: each leaves a marker of its own at
the destination, each lists what it sees there, and only the first host of each such group is
copied to. Every marker is removed before the copying starts, and on any failure or Ctrl-C.

Deadlines: the round trips have the Executor's; every rsync has `--timeout` (no data for that long
ends it) and a wall deadline (SYNC_SECONDS, or `fab -T`), after which its process group is killed
and the host reported `timed out`, beside the other hosts' results.

`code_manifest` and `verify_payload` serve `fab doctor`: whether the tracked files on a host are
the same as here, by sha256 of every tracked file, checked on the host by `sha256sum -c`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .environment import DEFAULT_ENV_FILE
from .errors import UsageError
from .executor import CONNECT_SECONDS, REMOTE_SHELL, Executor, Outcome, _configured, _seconds
from .hostfile import Host
from .plan import RemotePath
from .scripts import sh

MARKER_PREFIX = ".fablaunch-sync-"
# Never copied: git's own files (a submodule's `.git` is a file), this project's launch records and
# locks, its env file (its values reach the ranks in the session scripts, mode 0600: a copy would
# spread what may be secrets), and any marker of this or an interrupted earlier sync.
ALWAYS_EXCLUDED = (".git", "/.fablaunch/", f"/{DEFAULT_ENV_FILE}", f"{MARKER_PREFIX}*")
PROBE_SECONDS = 30.0  # each round trip of the detection
SYNC_SECONDS = 600.0  # wall deadline of one host's rsync; `fab -T N` replaces it
IO_SECONDS = 60  # rsync --timeout: no data moving for this long means the host or the link is stuck
RSYNC_TIMEOUT_CODE = 30  # rsync's "timeout in data send/receive"
RSYNC_VANISHED_CODE = 24  # "some files vanished before they could be transferred": a log being rotated
SSH_FAILED_CODE = 255  # rsync passes on ssh's exit code when the connection itself failed

# One line of `--out-format='%i %n%L'` (a dry run's listing): the itemized change, then the name.
_ITEM = re.compile(r"([<>ch.*][fdLDS][^ ]{9}) (.*)")
# One update of `--info=progress2`: the bytes moved so far lead the line.
_PROGRESS = re.compile(r"\s*([0-9][0-9,.]*)\s+[0-9]+%")


@dataclass
class HostSync:
    """One host's part of a sync: its result, where the code went, and what moved.

    `result` is `synced`, `shared` (the host sees the directory already: skipped), `failed`,
    `timed out`, or, in a dry run, `would sync`.
    """

    host: str
    result: str
    dest: str = ""
    files: int | None = None
    bytes: int | None = None
    seconds: float = 0.0
    detail: str = ""
    would_copy: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.result in ("synced", "shared", "would sync")

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"host": self.host, "result": self.result, "dest": self.dest, "files": self.files,
                                "bytes": self.bytes, "seconds": round(self.seconds, 2), "detail": self.detail}
        if self.result == "would sync":
            data["would_copy"] = self.would_copy
        return data


# --- input ----------------------------------------------------------------------------------------------


def check_patterns(patterns: Sequence[str]) -> list[str]:
    """`--exclude` patterns as rsync takes them; an empty one, or one with a newline, is refused."""
    for pattern in patterns:
        if not pattern.strip():
            raise UsageError("--exclude", "an empty pattern excludes nothing: give e.g. --exclude 'data/'")
        if any(ch in pattern for ch in "\n\r\0"):
            raise UsageError("--exclude", f"{pattern!r} has a line break or NUL, which no rsync pattern can hold")
    return list(patterns)


def check_workdir(workdir: str, where: str = "--workdir") -> str:
    """A destination every host's shell and rsync can take: not empty, no line break or NUL."""
    if not workdir.strip():
        raise UsageError(where, "is empty: give the directory the code goes to on every host")
    if any(ch in workdir for ch in "\n\r\0"):
        raise UsageError(where, f"{workdir!r} has a line break or NUL")
    return workdir


# --- what to copy -----------------------------------------------------------------------------------------


def _git(source: Path, *args: str) -> bytes | None:
    """Run git in `source`; its stdout, or None where git is missing or this is not a checkout."""
    try:
        done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _names(output: bytes) -> list[bytes]:
    return [name for name in output.split(b"\0") if name]


def git_files(source: Path) -> list[bytes] | None:
    """Every file git would take from `source` (tracked, or untracked and not ignored), relative to it.

    None where `source` is not in a git checkout. Tracked files deleted here are left out (rsync
    would fail on them), and so are the names fablaunch never copies (see ALWAYS_EXCLUDED).
    """
    tracked = _git(source, "ls-files", "-z", "--cached", "--recurse-submodules")
    if tracked is None:
        return None
    untracked = _git(source, "ls-files", "-z", "--others", "--exclude-standard") or b""
    root = os.fsencode(source)
    keep = []
    for name in dict.fromkeys(_names(tracked) + _names(untracked)):
        path = os.path.join(root, name)
        # Directories here are submodules that were never checked out: nothing to copy in them.
        if not os.path.lexists(path) or (os.path.isdir(path) and not os.path.islink(path)):
            continue
        if never_copied(name):
            continue
        keep.append(name)
    return keep


def never_copied(name: bytes) -> bool:
    """Whether a path (relative to the directory) is one that fablaunch never copies (ALWAYS_EXCLUDED)."""
    parts = name.split(b"/")
    return (b".git" in parts or parts[0] == b".fablaunch" or name == DEFAULT_ENV_FILE.encode()
            or parts[-1].startswith(MARKER_PREFIX.encode()))


# --- ssh and rsync command lines --------------------------------------------------------------------------


def _rsync_word(word: str) -> str:
    """Quote one word of rsync's `-e` command, which rsync splits itself: at spaces, honouring quotes.

    rsync knows single and double quotes but no backslash escapes, so a word holding both kinds of
    quote cannot be passed.
    """
    if word and not re.search(r"[\s'\"]", word):
        return word
    if "'" not in word:
        return f"'{word}'"
    if '"' not in word:
        return f'"{word}"'
    raise UsageError("ssh settings", f"{word!r} holds both ' and \", which rsync's -e cannot pass")


def ssh_argv(config: Any, host: Host) -> list[str]:
    """The ssh command rsync runs for this host, with the settings every fablaunch connection uses.

    The ssh_config file of `fab -S` (else ssh's own, ~/.ssh/config, as Fabric reads), `fab -i` keys,
    the host file's port, and the connect deadline (`fab -t`, else ssh_config's ConnectTimeout, else
    CONNECT_SECONDS). BatchMode: parallel copies cannot share a terminal for a password prompt (and
    fab's own connections never prompt either). A host key not yet known is accepted and remembered
    where ssh_config says nothing about it, as Fabric accepts it; a changed key is still refused.
    """
    from fabric import Connection

    conn = Connection(host.name.strip("[]"), user=host.user, port=host.port, config=config)
    argv = ["ssh"]
    ssh_config = getattr(config, "_runtime_ssh_path", None) or config.get("ssh_config_path")
    if ssh_config:
        argv += ["-F", str(ssh_config)]
    keys = config.get("connect_kwargs", {}).get("key_filename") or []
    for key in [keys] if isinstance(keys, str) else keys:
        argv += ["-i", str(key)]
    if host.port:
        argv += ["-p", str(host.port)]
    # As the Executor's connect deadline: `fab -t` (connect_kwargs.timeout), ssh_config, the default.
    seconds = _configured(conn.connect_kwargs, "timeout") or _seconds(conn.connect_timeout) or CONNECT_SECONDS
    argv += ["-o", f"ConnectTimeout={max(1, math.ceil(seconds))}", "-o", "BatchMode=yes"]
    if "stricthostkeychecking" not in conn.ssh_config:
        argv += ["-o", "StrictHostKeyChecking=accept-new"]
    return argv


def rsync_argv(source: str, dest: str, *, ssh: Sequence[str] | None, files_from: str | None,
               excludes: Sequence[str] = (), io_timeout: int = IO_SECONDS, dry_run: bool = False) -> list[str]:
    """The rsync command line that copies `source` into `dest` (`[user@]host:path`, or a local path).

    `ssh` None: the destination is on this machine (no remote shell). `files_from`: a file of
    NUL-separated names relative to `source` (git's list); without it, every file but what the
    .gitignore files (each directory's own, nested ones included) and the excludes rule out.
    Files are compared by size and time (`-t` keeps times), so a second sync copies nothing
    unchanged; nothing on the host is ever deleted (its outputs and checkpoints live there too).
    """
    argv = ["rsync", "--links", "--perms", "--times", "--no-human-readable", f"--timeout={io_timeout}",
            # Arguments go to the remote rsync over its protocol, not through the remote shell: spaces and
            # quotes in paths arrive as they are.
            "--protect-args"]
    if ssh is not None:
        argv += ["-e", " ".join(_rsync_word(w) for w in ssh)]
    argv += [f"--exclude={pattern}" for pattern in ALWAYS_EXCLUDED]
    argv += [f"--exclude={pattern}" for pattern in excludes]
    if files_from is not None:
        argv += [f"--files-from={files_from}", "--from0"]
    else:
        argv += ["--recursive", "--filter=:- .gitignore"]
    if dry_run:
        argv += ["--dry-run", "--stats", "--out-format=%i %n%L"]
    else:
        argv += ["--info=progress2", "--stats"]
    return [*argv, source.rstrip("/") + "/", dest.rstrip("/") + "/"]


def destination(host: Host, path: str) -> str:
    """rsync's name for `path` on the host: `[user@]host:path`, or the path itself on this machine."""
    if host.is_local:
        return path
    return f"{host.user + '@' if host.user else ''}{host.name}:{path}"


# --- the detection round trips ----------------------------------------------------------------------------


def _dest_word(workdir: str) -> str:
    """The destination as a shell word: `~/x` is under the host's home, a relative path under the
    directory its shell starts in (the home, as for a launch's `cd`)."""
    return sh(RemotePath(workdir)) if workdir.startswith("~/") else sh(workdir)


def probe_payload(workdir: str, marker: str, index: int, dry_run: bool) -> str:
    """Resolve the destination, look for this machine's marker there, and (unless a dry run) make the
    directory and leave this host's own marker in it. Prints `key=value` lines."""
    own = f"{marker}-{index}"
    lines = [
        f"d={_dest_word(workdir)}",
        'case "$d" in /*) ;; *) d="$PWD/$d" ;; esac',
        "printf 'dest=%s\\n' \"$d\"",
        f'if [ -e "$d"/{sh(marker)} ]; then echo shared=here; exit 0; fi',
        "if command -v rsync >/dev/null 2>&1; then echo rsync=yes; else echo rsync=no; exit 0; fi",
    ]
    if dry_run:
        lines.append('if [ -d "$d" ]; then echo exists=yes; else echo exists=no; fi')
    else:
        lines += [
            f'if err=$({{ mkdir -p -- "$d" && : > "$d"/{sh(own)}; }} 2>&1); then echo mark=ok;',
            "else printf 'mark=%s\\n' \"$(printf '%s\\n' \"$err\" | tail -n 1)\"; fi",
        ]
    return "\n".join([*lines, ""])


def seen_payload(dest: str, marker: str) -> str:
    """List the markers of this sync at the destination: `seen=<index>` per host that left one there."""
    return "\n".join([
        f"for f in {sh(dest)}/{sh(marker)}-*; do",
        '  [ -e "$f" ] && printf \'seen=%s\\n\' "${f##*-}"',
        "done",
        "true",
        "",
    ])


def unmark_payload(workdir: str, marker: str, index: int) -> str:
    """Remove this host's own marker (the destination resolved again, as the probe did)."""
    return "\n".join([f"d={_dest_word(workdir)}", 'case "$d" in /*) ;; *) d="$PWD/$d" ;; esac',
                      f'rm -f -- "$d"/{sh(f"{marker}-{index}")}', ""])


def parse_fields(stdout: str) -> dict[str, list[str]]:
    """`key=value` lines into lists of values per key (other lines ignored)."""
    fields: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[a-z_]+", key):
            fields.setdefault(key, []).append(value)
    return fields


def groups(seen: Mapping[int, set[int]]) -> dict[int, int]:
    """Each host (by index) to the host that is copied to for it: the first of those that see one
    another's markers (itself, where it shares its directory with no other host)."""
    return {index: min(others | {index}) for index, others in seen.items()}


# --- running rsync ------------------------------------------------------------------------------------------


@dataclass
class _Run:
    code: int
    lines: list[str]
    stderr: str
    timed_out: bool
    seconds: float


class _Rsyncs:
    """The rsync processes in flight, each in its own process group, so that a wall deadline or
    Ctrl-C ends each with everything it started (its ssh)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen[bytes]] = set()
        self.closed = False

    def run(self, argv: list[str], wall: float, on_bytes: Callable[[int], None]) -> _Run:
        start = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
        except OSError as exc:  # out of processes or file descriptors: this host's failure, not a traceback
            return _Run(-1, [], f"cannot start rsync: {exc.strerror or exc}", False, 0.0)
        with self._lock:
            self._live.add(proc)
            closed = self.closed
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _kill(proc)

        timer = threading.Timer(wall, expire)
        timer.daemon = True
        timer.start()
        if closed:
            _kill(proc)
        errors: list[bytes] = []
        drain = threading.Thread(target=lambda: errors.append(proc.stderr.read() if proc.stderr else b""),
                                 daemon=True)
        drain.start()
        lines: list[str] = []
        try:
            pending = b""
            assert proc.stdout
            for chunk in iter(lambda: os.read(proc.stdout.fileno(), 65536), b""):  # type: ignore[union-attr]
                *done, pending = re.split(rb"[\r\n]", pending + chunk)
                for raw in done:
                    line = raw.decode("utf-8", "replace")
                    progress = _PROGRESS.match(line)
                    if progress:
                        on_bytes(_number(progress.group(1)) or 0)
                    elif line.strip():
                        lines.append(line)
            if pending.strip():
                lines.append(pending.decode("utf-8", "replace"))
            code = proc.wait()
        finally:
            timer.cancel()
            _kill(proc)
            drain.join(5)
            with self._lock:
                self._live.discard(proc)
        return _Run(code, lines, b"".join(errors).decode("utf-8", "replace"), expired.is_set(),
                    time.monotonic() - start)

    def close(self) -> None:
        """Kill every rsync still running (Ctrl-C, SIGTERM); later ones are killed as they start."""
        with self._lock:
            self.closed = True
            live = list(self._live)
        for proc in live:
            _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    # Only while it is not reaped: until then its pid, the group's id, cannot be reused.
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _number(text: str) -> int | None:
    """A count as rsync prints it (`--no-h`, though a locale may still group digits): digits only."""
    digits = re.sub(r"[^0-9]", "", text)
    return int(digits) if digits else None


def parse_stats(lines: Sequence[str]) -> tuple[int | None, int | None]:
    """(regular files transferred, their bytes) from rsync's `--stats`; None where absent."""
    files = size = None
    for line in lines:
        if line.startswith("Number of regular files transferred:"):
            files = _number(line.split(":", 1)[1])
        elif line.startswith("Total transferred file size:"):
            size = _number(line.split(":", 1)[1])
    return files, size


def listed(lines: Sequence[str]) -> list[str]:
    """The files (and links) a dry run would copy, from its `%i %n%L` lines; directories and files whose
    attributes alone would change are left out."""
    found = []
    for line in lines:
        m = _ITEM.fullmatch(line)
        if m and m.group(1)[0] != "." and m.group(1)[1] != "d":
            found.append(m.group(2))
    return found


def failure(run: _Run, wall: float, io_timeout: int) -> tuple[str, str] | None:
    """(result, why) for an rsync that did not succeed, or None. Text from the host stays data: it is
    only ever shown literally."""
    if run.timed_out:
        return "timed out", f"timed out after {wall:g}s"
    if run.code == 0:
        return None
    if run.code == RSYNC_TIMEOUT_CODE:
        return "timed out", f"timed out: no data moved for {io_timeout}s (rsync --timeout)"
    text = [line.strip() for line in run.stderr.splitlines() if line.strip()]
    useful = [line for line in text if not line.startswith(("rsync error:", "rsync: connection unexpectedly closed",
                                                            "rsync: [sender] write error"))]
    why = (useful or text or [f"rsync exit code {run.code}"])[-1]
    if run.code == SSH_FAILED_CODE and not why.startswith("ssh"):
        why = f"ssh: {why}"
    return "failed", why


# --- the whole sync -----------------------------------------------------------------------------------------


@dataclass
class SyncPlan:
    """What a sync would do, fixed before any host is asked."""

    source: Path
    workdir: str
    hosts: list[Host]
    excludes: list[str]
    files: list[bytes] | None  # git's list, or None: rsync's .gitignore filter
    parallel: int
    dry_run: bool


def plan(hosts: Sequence[Host], workdir: str | None = None, *, source: str | Path | None = None,
         excludes: Sequence[str] = (), parallel: int = 32, dry_run: bool = False) -> SyncPlan:
    """Check the input and fix what to copy (raises UsageError; touches no host).

    `workdir` defaults to `source`'s absolute path (the same path on every host, as a launch assumes).
    Each host is synced once, however often its host file lists it.
    """
    root = Path(os.path.abspath(source or os.getcwd()))
    if not root.is_dir():
        raise UsageError("source", f"{root} is not a directory")
    if shutil.which("rsync") is None:
        raise UsageError("rsync", "is not installed on this machine (e.g. apt-get install rsync); nothing was copied")
    unique = list({h.spec: h for h in hosts}.values())
    return SyncPlan(root, check_workdir(workdir or str(root)), unique, check_patterns(excludes), git_files(root),
                parallel, dry_run)


@contextlib.contextmanager
def _marker(source: Path) -> Iterator[str]:
    """A file with a random name in the local directory while the hosts look for it; always removed."""
    name = f"{MARKER_PREFIX}{secrets.token_hex(8)}"
    path = source / name
    try:
        path.write_bytes(b"")
    except OSError as exc:
        raise UsageError(str(source), f"cannot write a marker file here to tell which hosts share this "
                                      f"directory ({exc.strerror or exc})") from None
    try:
        yield name
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def sync(config: Any, p: SyncPlan, *, on_done: Callable[[HostSync], None] | None = None,
         on_bytes: Callable[[int], None] | None = None, on_phase: Callable[[str, int], None] | None = None
         ) -> list[HostSync]:
    """Copy the directory to every host of the plan that does not share it; one HostSync per host, in order.

    Never raises for a host's problem (that is the host's result); UsageError for a directory where
    no marker can be written. `on_phase(what, hosts)` says when the copying starts and to how many
    hosts; `on_done` is called as each host's result is known and `on_bytes` with the bytes moved so
    far over all hosts, both in the caller's thread. Ctrl-C (and SIGTERM, SIGHUP) kills every
    rsync, removes the markers and raises KeyboardInterrupt.
    """
    results: dict[str, HostSync] = {}

    def finish(result: HostSync) -> None:
        results[result.host] = result
        if on_done:
            on_done(result)

    with Executor(config, p.parallel, deadline=PROBE_SECONDS) as ex:
        targets, followers = detect(ex, p, finish)
        if on_phase:
            on_phase("dry run" if p.dry_run else "copying", len(targets))
        wall = _configured(config, "timeouts", "command") or SYNC_SECONDS
        copy(config, p, targets, wall, finish, on_bytes)
    # Hosts that share a directory with a host that was copied to: its result is theirs.
    for spec, leader in followers.items():
        done = results[leader]
        if done.ok:
            finish(HostSync(spec, "shared", done.dest, detail=f"sees the directory of {leader} (copied there)"))
        else:
            finish(HostSync(spec, "failed", done.dest,
                            detail=f"shares its directory with {leader}, which {done.result}: {done.detail}"))
    return [results[h.spec] for h in p.hosts]


def _unreached(host: Host, outcome: Outcome) -> HostSync:
    why = outcome.why()
    return HostSync(host.spec, "timed out" if why.startswith("timed out") else "failed", detail=why,
                    seconds=outcome.seconds)


def detect(ex: Executor, p: SyncPlan, finish: Callable[[HostSync], None]) -> tuple[dict[str, str], dict[str, str]]:
    """Ask every host where the code goes and whether it is there already (see the module).

    Calls `finish` for the hosts that are done with (shared with this machine, or failed) and
    returns the hosts to copy to (spec -> absolute destination) and the hosts that share the
    directory of one of those (spec -> that host's spec). Every marker is gone when it returns.
    """
    index = {h.spec: i for i, h in enumerate(p.hosts)}
    marked: dict[int, str] = {}
    candidates: dict[str, str] = {}
    with _marker(p.source) as marker:
        cut = True  # until every answer is in: then only the hosts known to have left a marker are asked
        try:
            answers = ex.run({h: (REMOTE_SHELL, probe_payload(p.workdir, marker, index[h.spec], p.dry_run))
                              for h in p.hosts})
            for host in p.hosts:
                outcome = answers[host.spec]
                fields = {k: v[0] for k, v in parse_fields(outcome.stdout).items()}
                dest = fields.get("dest", "")
                if fields.get("mark") == "ok":
                    marked[index[host.spec]] = dest
                if not outcome.ok:
                    finish(_unreached(host, outcome))
                elif "shared" in fields:
                    finish(HostSync(host.spec, "shared", dest, seconds=outcome.seconds,
                                    detail="sees this machine's directory"))
                elif fields.get("rsync") != "yes":
                    finish(HostSync(host.spec, "failed", dest, seconds=outcome.seconds,
                                    detail="rsync is not installed on the host (e.g. apt-get install rsync)"))
                elif not p.dry_run and fields.get("mark") != "ok":
                    finish(HostSync(host.spec, "failed", dest, seconds=outcome.seconds,
                                    detail=f"cannot write in {dest}: {fields.get('mark') or 'no answer'}"))
                else:
                    candidates[host.spec] = dest
            followers = _share(ex, p, marker, marked, candidates, finish)
            cut = False
        finally:
            _unmark(ex, p, marker, range(len(p.hosts)) if cut and not p.dry_run else marked)
    return {s: d for s, d in candidates.items() if s not in followers}, followers


def _share(ex: Executor, p: SyncPlan, marker: str, marked: Mapping[int, str], candidates: dict[str, str],
           finish: Callable[[HostSync], None]) -> dict[str, str]:
    """Which candidates see another's marker: spec -> the first host of its group (only the first is copied to).

    A host that does not answer this round is failed and leaves the candidates.
    """
    hosts = [h for h in p.hosts if h.spec in candidates]
    if p.dry_run or len(hosts) < 2:  # a dry run leaves no markers: it cannot tell
        return {}
    answers = ex.run({h: (REMOTE_SHELL, seen_payload(candidates[h.spec], marker)) for h in hosts})
    seen: dict[int, set[int]] = {}
    for i, host in enumerate(p.hosts):
        if host.spec not in candidates:
            continue
        outcome = answers[host.spec]
        if not outcome.ok:
            del candidates[host.spec]
            finish(_unreached(host, outcome))
            continue
        numbers = {int(v) for v in parse_fields(outcome.stdout).get("seen", []) if v.isdigit()}
        seen[i] = {n for n in numbers if n < len(p.hosts) and p.hosts[n].spec in candidates}
    leaders = groups(seen)
    return {p.hosts[i].spec: p.hosts[lead].spec for i, lead in leaders.items()
            if lead != i and p.hosts[lead].spec in candidates}


def _unmark(ex: Executor, p: SyncPlan, marker: str, indices: Iterable[int]) -> None:
    """Remove the hosts' own markers (best effort: a leftover one is excluded from every copy)."""
    hosts = {p.hosts[i]: (REMOTE_SHELL, unmark_payload(p.workdir, marker, i)) for i in indices}
    if hosts:
        ex.run(hosts, deadline=10)


def copy(config: Any, p: SyncPlan, targets: Mapping[str, str], wall: float, finish: Callable[[HostSync], None],
         on_bytes: Callable[[int], None] | None = None) -> None:
    """Run one rsync per target host, `p.parallel` at once, and `finish` each host as its rsync ends."""
    if not targets:
        return
    hosts = {h.spec: h for h in p.hosts}
    io_timeout = max(1, min(IO_SECONDS, math.ceil(wall)))
    with contextlib.ExitStack() as stack:
        files_from = None
        if p.files is not None:
            listing = stack.enter_context(tempfile.NamedTemporaryFile(prefix="fablaunch-sync-", suffix=".list"))
            listing.write(b"".join(name + b"\0" for name in p.files))
            listing.flush()
            files_from = listing.name
        argvs = {spec: rsync_argv(str(p.source), destination(hosts[spec], dest),
                                  ssh=None if hosts[spec].is_local else ssh_argv(config, hosts[spec]),
                                  files_from=files_from, excludes=p.excludes, io_timeout=io_timeout,
                                  dry_run=p.dry_run)
                 for spec, dest in targets.items()}
        rsyncs = _Rsyncs()
        moved: dict[str, int] = {}
        lock = threading.Lock()

        def count(spec: str, n: int) -> None:
            with lock:
                moved[spec] = n

        pool = ThreadPoolExecutor(max_workers=p.parallel, thread_name_prefix="fablaunch-rsync")
        futures: dict[Future[_Run], str] = {
            pool.submit(rsyncs.run, argv, wall, lambda n, s=spec: count(s, n)): spec  # type: ignore[misc]
            for spec, argv in argvs.items()}
        try:
            pending: set[Future[_Run]] = set(futures)
            last = -1
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for future in done:
                    spec = futures[future]
                    finish(_result(spec, targets[spec], future.result(), wall, io_timeout, p.dry_run))
                if on_bytes:
                    with lock:
                        total = sum(moved.values())
                    if total != last:
                        on_bytes(total)
                        last = total
        finally:
            rsyncs.close()
            pool.shutdown(wait=True, cancel_futures=True)


def _result(spec: str, dest: str, run: _Run, wall: float, io_timeout: int, dry_run: bool) -> HostSync:
    """One host's HostSync from its rsync's end."""
    files, size = parse_stats(run.lines)
    failed = failure(run, wall, io_timeout)
    if failed is not None and not (run.code == RSYNC_VANISHED_CODE and not run.timed_out):
        return HostSync(spec, failed[0], dest, files, size, run.seconds, failed[1])
    detail = "some files vanished while they were copied" if run.code == RSYNC_VANISHED_CODE else ""
    if dry_run:
        return HostSync(spec, "would sync", dest, files, size, run.seconds, detail, listed(run.lines))
    return HostSync(spec, "synced", dest, files, size, run.seconds, detail)


# --- is the code the same? (fab doctor) --------------------------------------------------------------------


def code_manifest(source: Path) -> bytes | None:
    """`sha256sum` lines for every tracked file here (None where this is not a git checkout).

    Only git's tracked files count (untracked ones, outputs and caches, may well differ between
    hosts), less those `fab sync` never copies.
    Names holding a backslash or a line break are written the way sha256sum escapes them; a name
    with a carriage return (escaped differently by different coreutils) is left out.
    """
    tracked = _git(source, "ls-files", "-z", "--cached", "--recurse-submodules")
    if tracked is None:
        return None
    lines = []
    for name in sorted(set(_names(tracked))):
        path = os.path.join(os.fsencode(source), name)
        # Deleted here, a submodule never checked out, or never copied (so never expected to match).
        if b"\r" in name or not os.path.isfile(path) or never_copied(name):
            continue
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        except OSError:
            continue
        if b"\\" in name or b"\n" in name:
            escaped = name.replace(b"\\", b"\\\\").replace(b"\n", b"\\n")
            lines.append(b"\\" + digest.hexdigest().encode() + b"  " + escaped + b"\n")
        else:
            lines.append(digest.hexdigest().encode() + b"  " + name + b"\n")
    return b"".join(lines)


def verify_payload(workdir: str, manifest: bytes, seconds: int = 30) -> str:
    """Check the tracked files' hashes in `workdir` on a host (`sha256sum -c`); prints `code_*=` lines:
    `code_rc` (0: all match), `code_diff` (how many differ or are missing) and `code_first` (one of them)."""
    data = base64.b64encode(manifest).decode()
    return "\n".join([
        f"if [ -d {sh(workdir)} ]; then",
        "  if command -v timeout >/dev/null 2>&1; then limit='timeout " + str(seconds) + "'; else limit=''; fi",
        f"  out=$(cd {sh(workdir)} && printf '%s' {sh(data)} | base64 -d | $limit sha256sum --quiet -c - 2>/dev/null)",
        "  rc=$?",
        "  printf 'code_rc=%s\\n' \"$rc\"",
        "  printf 'code_diff=%s\\n' \"$(printf '%s' \"$out\" | grep -c .)\"",
        "  printf 'code_first=%s\\n' \"$(printf '%s\\n' \"$out\" | head -n 1)\"",
        "fi",
        "",
    ])


def differing(first: str) -> str:
    """The file name in a line of `sha256sum -c` (`name: FAILED`, `name: FAILED open or read`)."""
    name = re.sub(r": FAILED( open or read)?$", "", first)
    return name[1:] if name.startswith("\\") else name
