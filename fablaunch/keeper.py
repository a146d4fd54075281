"""A per-user background keeper of SSH connections and remote shells, for repeated read-only calls.

Why: every `fab status`, `top`, `logs` or `wait` poll is a new process, so each paid an SSH handshake
and a new remote shell per host (the user's `.bashrc`: pyenv, conda, ~0.1 s of CPU each). The keeper
is a small detached process (`python -m fablaunch.keeper serve`) that the executor starts on demand the
first time a read-only call runs; it holds one paramiko connection and one remote `bash` per host, and
later calls hand it their payloads over a Unix socket. A second `fab status` then costs a process
start and one round trip per host over connections and shells that are already up.

What goes through it: only calls their caller marks read-only (`Executor.run(..., read_only=True)`):
the survey behind `status`, `wait`, `errors`, `attach` and `logs`, `logs` without `--follow`, and `top`'s
samples. Launch, stop, prune, sync, doctor and dump never do. A read-only payload may be retried or run
twice without harm, which is what lets the keeper retry once over a fresh connection when a kept one
turns out dead, and lets a caller fall back to a direct connection after any doubt. An action must run
exactly once, from the process the user started, with that process's signals, Ctrl-C and rollback, and
its deadline semantics (patient payloads); a connection opened by another process at another time
(whose host key, agent and ssh_config were those of then) is not where it should act.

Socket and trust:

* Directory: `$FABLAUNCH_KEEPER_DIR`, else `$XDG_RUNTIME_DIR/fablaunch`, else `/tmp/fablaunch-<uid>`;
  created 0700 and used only while it is a real directory (no symlink) owned by this uid and closed to
  group and others. Anything else there means no keeper (direct connections), never a repair.
* Socket: `keeper-<key>.sock`, mode 0600, made under another name and renamed into place once it listens
  (so the name never points at a socket that is not yet or no longer served). A client uses it only if
  it is a socket, owned by its uid, mode 0600, and the process answering it has its uid (SO_PEERCRED);
  the keeper answers only peers of its own uid. One keeper per key holds `keeper-<key>.lock` (flock)
  for its whole life, so two clients starting one at once end up with one keeper.
* Key: a digest of everything a connection is made from: uid, the ssh_config file (`fab -S`, else the
  user's and the system's) and a digest of its contents, `-i` identity files, `-t`/`timeouts.connect`,
  the configured user and port, agent forwarding, `SSH_AUTH_SOCK`, the working directory (relative paths
  in an ssh_config), the keeper's mode and idle time, and this module's own source. A call with other
  settings never reuses a connection made with different ones; a config this cannot express (a
  password, a passphrase, a gateway object, an auth strategy) is never kept.

Framing: each host's kept shell is `bash -s` running a fixed loop (LOOP) that reads a request as two
lines, a fresh random marker and the payload in base64, runs the payload in its own `bash -s` (the same
shell a direct call gets: script on stdin, its own variables, `cd`, `exit`), then prints
`\\x1e<marker> <exit code>` on stdout and `\\x1e<marker>` on stderr. The keeper cuts the answer at
those markers; output is data and may contain anything, but not a marker it has never seen. A shell
with output after its marker (a background process still writing), or one that ended, is discarded.
`FABLAUNCH_KEEPER_MODE=exec` keeps only the connections and opens a fresh `bash -s` per request (no
handshake, but a shell start): the first step, kept for measurement.

Deadlines: each request carries what is left of the caller's deadline; the keeper connects within it
(the executor's own connect code, retries included) and kills the host's shell when it passes (answer:
timed out, with what arrived), and every request runs in its own thread, so a stuck host delays no
other. The caller waits for the answer until its deadline plus a short grace.

Fallback: a missing, stale (nobody listening), foreign or badly-permissioned socket, a keeper that
cannot start within START_WAIT, breaks protocol or does not answer, and any shell the keeper could not
bring to a framed answer: the call goes direct, silently (a debug line on the `fablaunch.keeper`
logger), within what is left of the same deadline. What the keeper reports itself is only ever a whole
framed answer, a host it could not reach (the executor's own words, with the same settings), or a
timeout: never a partial answer as a complete one.

Idle: after `FABLAUNCH_KEEPER_IDLE` seconds (default 600) without a request, the keeper closes every
shell and connection (the hosts' shells end with their channels), removes its socket, lock file and
the directory if empty, and exits; SIGTERM does the same at once. `python -m fablaunch.keeper list|stop`
shows or stops this user's keepers.

On by default (DEFAULT); `FABLAUNCH_KEEPER=0` or a task's `--no-keeper` turns it off. A kept
connection, like an OpenSSH ControlMaster, outlives changes made after it was opened (a host's new key,
a listener stopped while the host stays up, a new `.bashrc`) until the keeper exits; a host that goes
down takes its connections with it, and a dead kept connection is retried once afresh. The test suite
turns it off (tests/conftest.py) except in its own tests: its faults stop a host's sshd listener, which
a kept connection would outlive, and its leak checks count every process on a fake host.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .executor import (
    REMOTE_SHELL,
    Executor,
    HostTimeout,
    Outcome,
    _bytes,
    _signal,
    _text,
    _Watch,
    describe_error,
    readable,
)
from .hostfile import Host

log = logging.getLogger("fablaunch.keeper")

PROTOCOL = 1
IDLE_SECONDS = 600.0
START_WAIT = 5.0  # seconds a client waits for a keeper it started to listen (imports fabric: ~0.5 s)
GRACE = 2.0  # seconds past its deadline a client waits for the keeper's answer (which is due at the deadline)
MAX_MESSAGE = 1 << 30
KEEP_IDLE_SHELLS = 2  # idle shells kept per host (concurrent callers open more; the rest are closed)
SWITCH = "FABLAUNCH_KEEPER"  # 0, off, no, false: never use a keeper
MODES = ("shell", "exec")

# The kept shell's loop (see the module docstring). pipefail: a base64 that fails must not become an
# empty script that "succeeds"; no base64 at all is exit 97 before the first request (then: direct).
LOOP = r"""set -o pipefail
command -v base64 >/dev/null 2>&1 || exit 97
while IFS= read -r fl_m && IFS= read -r fl_s; do
  printf '%s' "$fl_s" | base64 -d | bash -s
  fl_rc=$?
  printf '\036%s %s\n' "$fl_m" "$fl_rc"
  printf '\036%s\n' "$fl_m" >&2
done
"""


# --- where, and for which settings -----------------------------------------------------------------------------


DEFAULT = "1"  # what an unset FABLAUNCH_KEEPER means


def enabled() -> bool:
    """Whether a keeper may be used at all (FABLAUNCH_KEEPER, else DEFAULT)."""
    return os.environ.get(SWITCH, DEFAULT).strip().lower() not in ("", "0", "off", "no", "false")


def _private_dir(path: Path, create: bool) -> Path | None:
    """`path` if it is a real directory of this uid closed to others (made 0700 if missing and `create`)."""
    if create:
        with contextlib.suppress(FileExistsError, FileNotFoundError):
            os.mkdir(path, 0o700)
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        log.debug("keeper: %s is not a private directory of uid %d: not used", path, os.getuid())
        return None
    return path


def runtime_dir(create: bool = True) -> Path | None:
    """This user's keeper directory (see the module docstring), or None where none is safe to use."""
    chosen = os.environ.get("FABLAUNCH_KEEPER_DIR")
    if chosen:
        return _private_dir(Path(chosen), create)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and _private_dir(Path(xdg), False):
        return _private_dir(Path(xdg) / "fablaunch", create)
    return _private_dir(Path(tempfile.gettempdir()) / f"fablaunch-{os.getuid()}", create)


def _digest(path: str | None) -> str | None:
    try:
        return hashlib.sha256(Path(os.path.expanduser(path or "")).read_bytes()).hexdigest() if path else None
    except OSError:
        return None


def settings(config: Any) -> dict[str, Any] | None:
    """What the connections of `config` are made from, as plain data; None if it cannot be kept."""
    try:
        kwargs = dict(config.connect_kwargs or {})
        auth = config.get("authentication") or {}
        if set(kwargs) - {"key_filename", "timeout"} or config.get("gateway") or auth.get("strategy_class"):
            return None
        keys = kwargs.get("key_filename") or []
        keys = [keys] if isinstance(keys, str) else list(keys)
        runtime = getattr(config, "_runtime_ssh_path", None) or config.get("ssh_config_path")
        files = ([runtime] if runtime else
                 [getattr(config, "_user_ssh_path", "~/.ssh/config"), getattr(config, "_system_ssh_path", "")]
                 if config.get("load_ssh_configs", True) else [])
        timeouts = config.get("timeouts") or {}
        return {
            "protocol": PROTOCOL,
            "uid": os.getuid(),
            "ssh_config": os.path.abspath(os.path.expanduser(runtime)) if runtime else None,
            "load_ssh_configs": bool(config.get("load_ssh_configs", True)),
            "ssh_files": {str(f): _digest(str(f)) for f in files if f},
            "key_filename": [os.path.abspath(os.path.expanduser(str(k))) for k in keys],
            "identities": [os.path.abspath(os.path.expanduser(str(k))) for k in auth.get("identities") or []],
            "timeout": kwargs.get("timeout"),
            "connect_timeout": timeouts.get("connect"),
            "user": config.get("user"),
            "port": config.get("port"),
            "forward_agent": bool(config.get("forward_agent")),
            "agent": os.environ.get("SSH_AUTH_SOCK"),
            # Relative paths in an ssh_config (an IdentityFile) are read from here, as by the caller.
            "cwd": os.getcwd(),
            "mode": os.environ.get("FABLAUNCH_KEEPER_MODE", "shell"),
            "idle": float(os.environ.get("FABLAUNCH_KEEPER_IDLE") or IDLE_SECONDS),
            "code": _digest(__file__),
        }
    except (AttributeError, TypeError, ValueError, KeyError):
        return None


def key_of(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:24]


def _config(values: dict[str, Any]) -> Any:
    """A Fabric config that makes the same connections as the client's (see `settings`)."""
    import fabric

    config = fabric.Config(runtime_ssh_path=values["ssh_config"]) if values["ssh_config"] else fabric.Config()
    config.load_ssh_configs = values["load_ssh_configs"]
    kwargs: dict[str, Any] = {}
    if values["key_filename"]:
        kwargs["key_filename"] = values["key_filename"]
    if values["timeout"] is not None:
        kwargs["timeout"] = values["timeout"]
    config.connect_kwargs = kwargs
    config.authentication.identities = [Path(p) for p in values["identities"]]
    config.timeouts.connect = values["connect_timeout"]
    config.user = values["user"]
    config.port = values["port"]
    config.forward_agent = values["forward_agent"]
    return config


# --- the wire: a 4-byte length, then JSON ------------------------------------------------------------------------


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise EOFError("connection closed mid-message")
        data += chunk
    return bytes(data)


def _recv(sock: socket.socket) -> dict[str, Any]:
    (size,) = struct.unpack(">I", _recv_exact(sock, 4))
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes")
    message = json.loads(_recv_exact(sock, size))
    if not isinstance(message, dict):
        raise ValueError("not a message")
    return message


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not base64 text")
    return base64.b64decode(text, validate=True)


def _peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return int(uid)


class NotOurs(Exception):
    """A socket that is not this user's private keeper socket: never used, never removed."""


def _connect(path: Path, timeout: float = 2.0) -> socket.socket:
    """A connection to the keeper at `path`, after checking whose it is (see the module docstring)."""
    st = os.lstat(path)  # FileNotFoundError: no keeper
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o177:
        raise NotOurs(f"{path}: not a mode-0600 socket of uid {os.getuid()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))  # ConnectionRefusedError: stale, its keeper is gone
        if _peer_uid(sock) != os.getuid():
            raise NotOurs(f"{path}: answered by another uid")
    except BaseException:
        sock.close()
        raise
    return sock


# --- the client side: what the executor calls ---------------------------------------------------------------------


class Client:
    """The executor's way to the keeper for one config: starts it if needed, falls back (None) on any doubt."""

    def __init__(self, values: dict[str, Any], directory: Path) -> None:
        self.settings = values
        self.key = key_of(values)
        self.dir = directory
        self.socket = directory / f"keeper-{self.key}.sock"
        self._lock = threading.Lock()
        self._state: str | None = None  # None: not tried yet; "up"; "off" (this process goes direct)
        self._asking: set[socket.socket] = set()  # requests in flight, for close()

    @classmethod
    def for_config(cls, config: Any) -> Client | None:
        """A client for this config's connections, or None where a keeper may not be used."""
        if not enabled():
            return None
        values = settings(config)
        directory = runtime_dir() if values is not None else None
        return cls(values, directory) if values is not None and directory is not None else None

    def _off(self, why: str) -> None:
        if self._state not in ("off", "closed"):
            log.debug("keeper: not used (%s): direct connections", why)
            self._state = "off"

    def _ready(self) -> bool:
        """Whether a keeper of our own answers on our socket: connect, else start one and wait for it."""
        with self._lock:
            if self._state is None:
                try:
                    _connect(self.socket).close()
                    self._state = "up"
                except (FileNotFoundError, ConnectionRefusedError):
                    self._start()
                except (NotOurs, OSError) as exc:
                    self._off(str(exc))
            return self._state == "up"

    def _start(self) -> None:
        """Start a keeper detached (its own session, this directory) and wait until it listens."""
        env = dict(os.environ)
        # The same fablaunch, installed or not: its package's parent directory first on the path.
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        err = self._log_file()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "fablaunch.keeper", "serve", self.key],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                                    cwd=self.settings["cwd"], env=env, start_new_session=True, close_fds=True)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(self.settings).encode())
            proc.stdin.close()
        except OSError as exc:
            self._off(f"cannot start: {exc}")
            return
        finally:
            if err != subprocess.DEVNULL:
                os.close(err)
        end = time.monotonic() + START_WAIT
        while time.monotonic() < end:
            try:
                _connect(self.socket).close()
                self._state = "up"
                return
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.02)
            except (NotOurs, OSError) as exc:
                self._off(str(exc))
                return
        self._off(f"did not start within {START_WAIT:g}s")

    @staticmethod
    def _log_file() -> int:
        """Where the keeper's stderr goes: never this process's own (a pipe a caller waits on would never
        close), but FABLAUNCH_KEEPER_LOG's file (with debug lines), else nowhere."""
        path = os.environ.get("FABLAUNCH_KEEPER_LOG")
        if path:
            with contextlib.suppress(OSError):
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return subprocess.DEVNULL

    def run(self, host: Host, stdin: str | None, watch: _Watch,
            on_output: Callable[[str], None] | None = None) -> Outcome | None:
        """The host's outcome for a read-only REMOTE_SHELL payload, or None: then the caller goes direct.

        `watch` is the call's deadline (what is left of it goes to the keeper); it is finished here
        when an outcome is returned, and left running for the direct call otherwise.
        """
        if not self._ready():  # (a keeper it had to start took its time out of the deadline)
            return None
        left = watch.remaining()
        if left is None or left <= 0.05:
            return None
        start = time.monotonic()
        try:
            with contextlib.closing(_connect(self.socket)) as sock, self._in_flight(sock):
                sock.settimeout(left + GRACE)
                _send(sock, {"op": "run", "host": {"name": host.name, "user": host.user, "port": host.port},
                             "stdin": _b64(_bytes(stdin)), "deadline": left})
                reply = _recv(sock)
        except (OSError, EOFError, ValueError, NotOurs, struct.error) as exc:
            # Dead, wedged or replaced under us: the rest of this process goes direct.
            self._off(f"{type(exc).__name__}: {exc}")
            return None
        try:
            outcome = self._outcome(host, reply, watch)
        except (KeyError, TypeError, ValueError) as exc:
            self._off(f"bad answer: {exc}")
            return None
        if outcome is None:
            log.debug("keeper: %s: %s: direct connection", host.spec, reply.get("why"))
            return None
        if on_output is not None:
            _feed(outcome.stdout, on_output, complete=outcome.reached)
        watch.finish()
        outcome.seconds = time.monotonic() - start
        return outcome

    @contextlib.contextmanager
    def _in_flight(self, sock: socket.socket) -> Iterator[None]:
        with self._lock:
            if self._state == "closed":
                raise OSError("closed")
            self._asking.add(sock)
        try:
            yield
        finally:
            with self._lock:
                self._asking.discard(sock)

    def close(self) -> None:
        """End the requests in flight (Ctrl-C, SIGTERM: `with Executor` ends); no new ones start."""
        with self._lock:
            self._state = "closed"
            asking = list(self._asking)
        for sock in asking:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _outcome(self, host: Host, reply: dict[str, Any], watch: _Watch) -> Outcome | None:
        kind = reply["kind"]
        if kind == "done":
            code = reply["exit_code"]
            if not isinstance(code, int):
                raise ValueError("exit code")
            return Outcome(host, code, _text(_unb64(reply["stdout"])), _text(_unb64(reply["stderr"])), started=True)
        if kind == "unreachable":
            return Outcome(host, error=str(reply["error"]))
        if kind == "timeout":
            return Outcome(host, None, _text(_unb64(reply["stdout"])), _text(_unb64(reply["stderr"])),
                           error=watch.message(), started=bool(reply.get("started")))
        if kind == "fallback":
            return None
        raise ValueError(f"kind {kind!r}")

    def request(self, op: str) -> dict[str, Any] | None:
        """A control request (`stats`, `stop`) to a running keeper; None if none answers."""
        return _ask(self.socket, op)


def _feed(stdout: str, on_output: Callable[[str], None], complete: bool) -> None:
    """Pass output on line by line, as the direct path streams it (a last partial line only when complete)."""
    *lines, rest = stdout.split("\n")
    for line in lines:
        on_output(line + "\n")
    if rest and complete:
        on_output(rest)


# --- the keeper ---------------------------------------------------------------------------------------------------


class _Broken(Exception):
    """A kept shell that gave no framed answer (it ended, or broke the protocol)."""


class _Stale(Exception):
    """A kept connection that could not open a shell any more: connect afresh and try once more."""


class _Expired(Exception):
    """The request's deadline passed (or its caller went away); carries what arrived."""

    def __init__(self, out: bytes, err: bytes) -> None:
        super().__init__("deadline")
        self.out, self.err = out, err


def _gone(caller: socket.socket) -> bool:
    """Whether the caller closed its end (Ctrl-C, SIGTERM): it sends nothing after its request."""
    try:
        return caller.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class _Shell:
    """One kept `bash -s` running LOOP on a host (mode shell), or one `bash -s` per request (mode exec)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.served = 0
        self.dirty = False
        # The caller of the request in progress: when it goes away, so does its payload (as a direct
        # call's remote command ends with `with Executor` on Ctrl-C or SIGTERM).
        self.caller: socket.socket | None = None

    def usable(self) -> bool:
        ch = self.channel
        return not (self.dirty or ch.closed or ch.exit_status_ready() or ch.eof_received
                    or ch.recv_ready() or ch.recv_stderr_ready())

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            if not self.channel.closed:
                _signal(self.channel, "KILL")
        with contextlib.suppress(Exception):
            self.channel.close()

    def _pump(self, out: bytearray, err: bytearray, end: float) -> bool:
        """Move what arrived into out/err; False once the channel ended and all is read."""
        left = end - time.monotonic()
        if left <= 0:
            raise _Expired(bytes(out), bytes(err))
        ready = readable([self.channel, *([self.caller] if self.caller else [])], min(left, 1.0))
        if self.caller is not None and self.caller in ready and _gone(self.caller):
            raise _Expired(bytes(out), bytes(err))
        ch = self.channel
        ended = ch.closed or ch.exit_status_ready() or ch.eof_received
        while ch.recv_ready():
            data = ch.recv(65536)
            if not data:
                break
            out += data
        while ch.recv_stderr_ready():
            data = ch.recv_stderr(65536)
            if not data:
                break
            err += data
        return not ended

    def ask(self, payload: bytes, end: float) -> tuple[int, bytes, bytes]:
        """Run one payload through the loop; its (exit code, stdout, stderr), cut at a fresh marker."""
        marker = secrets.token_hex(16).encode()
        self.channel.settimeout(max(end - time.monotonic(), 0.1))
        self.channel.sendall(marker + b"\n" + base64.b64encode(payload) + b"\n")
        self.served += 1
        out, err = bytearray(), bytearray()
        status_mark, err_mark = b"\x1e" + marker + b" ", b"\x1e" + marker + b"\n"
        code: int | None = None
        body = b""
        ended = False
        while True:
            if code is None and (i := out.find(status_mark)) >= 0 and (nl := out.find(b"\n", i)) >= 0:
                word = bytes(out[i + len(status_mark):nl])
                if not word.isdigit():
                    raise _Broken(f"status {word[:20]!r}")
                code, body, after = int(word), bytes(out[:i]), bytes(out[nl + 1:])
                self.dirty = self.dirty or bool(after)
            if code is not None and (j := err.find(err_mark)) >= 0:
                self.dirty = self.dirty or len(err) > j + len(err_mark)
                return code, body, bytes(err[:j])
            if ended:  # what the last pump brought was looked at: no framed answer will come
                raise _Broken("the kept shell ended")
            ended = not self._pump(out, err, end)

    def once(self, payload: bytes, end: float) -> tuple[int, bytes, bytes]:
        """Mode exec: the channel ran `bash -s`; send the payload, read everything until it ends."""
        self.channel.settimeout(max(end - time.monotonic(), 0.1))
        self.channel.sendall(payload)
        self.channel.shutdown_write()
        out, err = bytearray(), bytearray()
        while self._pump(out, err, end):
            pass
        # sshd sends the exit status just after the end of output.
        if not self.channel.status_event.wait(max(end - time.monotonic(), 0.1)):
            raise _Expired(bytes(out), bytes(err))
        return self.channel.exit_status, bytes(out), bytes(err)


class _Kept:
    """A host's kept connection and idle shells."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connecting = threading.Lock()
        self.conn: Any = None
        self.idle: list[_Shell] = []


class Keeper:
    """The keeper process: a Unix socket server holding connections and shells per host."""

    def __init__(self, values: dict[str, Any], directory: Path, key: str) -> None:
        self.values = values
        self.mode = values["mode"] if values["mode"] in MODES else "shell"
        self.idle_seconds = float(values["idle"])
        self.dir = directory
        self.path = directory / f"keeper-{key}.sock"
        self.lock_path = directory / f"keeper-{key}.lock"
        self.ex = Executor(_config(values), parallel=1)  # its connect code (deadlines, retries); nothing else
        self.hosts: dict[tuple[str, str | None, int | None], _Kept] = {}
        self.mutex = threading.Lock()
        self.stats: dict[str, Any] = {"pid": os.getpid(), "mode": self.mode, "idle": self.idle_seconds, "requests": 0,
                      "handshakes": 0, "shells": 0, "retries": 0, "fallbacks": 0, "timeouts": 0}
        self.active = 0
        self.last = time.monotonic()
        self.stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._ino: int | None = None
        self._lock_fd: int | None = None  # held (flock) for the keeper's whole life

    # -- life ---------------------------------------------------------------------------------------------------

    def listen(self) -> bool:
        """Take the lock and the socket name; False if another keeper of this key is alive."""
        for _ in range(5):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            # The lock file may have been removed by a keeper that just exited: lock the file on disk.
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino:
                    self._lock_fd = fd
                    break
            os.close(fd)
        else:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # stale: its keeper held this lock and is gone
        temp = self.dir / f".keeper-{os.getpid()}-{secrets.token_hex(4)}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(temp))
        os.chmod(temp, 0o600)
        listener.listen(128)
        os.rename(temp, self.path)
        self._ino = os.lstat(self.path).st_ino
        listener.settimeout(1.0)
        self._listener = listener
        return True

    def serve(self) -> None:
        assert self._listener is not None
        try:
            while not self.stopping.is_set():
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    conn = None
                if conn is not None:
                    threading.Thread(target=self._client, args=(conn,), daemon=True).start()
                with self.mutex:
                    idle = self.active == 0 and time.monotonic() - self.last > self.idle_seconds
                if idle or not self._still_ours():
                    break
        finally:
            self.close()

    def _still_ours(self) -> bool:
        """Whether our socket is still in place (someone removing it means: go away)."""
        try:
            return os.lstat(self.path).st_ino == self._ino
        except OSError:
            return False

    def close(self) -> None:
        """Close every shell and connection and remove what the keeper made; the process then exits."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._still_ours():
            with contextlib.suppress(OSError):
                self.path.unlink()
        with self.mutex:
            kept = list(self.hosts.values())
            self.hosts.clear()
        for k in kept:
            for shell in k.idle:
                shell.kill()
        self.ex.close()  # the connections: every remote shell ends with its channel
        with contextlib.suppress(OSError):
            self.lock_path.unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # only if empty: another key's keeper may still be there

    # -- requests -----------------------------------------------------------------------------------------------

    def _client(self, conn: socket.socket) -> None:
        with contextlib.closing(conn):
            try:
                if _peer_uid(conn) != os.getuid():
                    return  # another user's process: not a byte
                conn.settimeout(10)
                message = _recv(conn)
            except (OSError, EOFError, ValueError, struct.error):
                return
            op = message.get("op")
            if op == "run":
                with self.mutex:
                    self.active += 1
                    self.last = time.monotonic()
                try:
                    reply = self.run(message, conn)
                except Exception as exc:  # whatever went wrong here, the caller must not take it for an answer
                    log.debug("request failed", exc_info=True)
                    reply = {"kind": "fallback", "why": f"keeper: {type(exc).__name__}: {exc}"}
                finally:
                    with self.mutex:
                        self.active -= 1
                        self.last = time.monotonic()
            elif op == "stats":
                with self.mutex:
                    reply = {**self.stats, "hosts": len(self.hosts)}
            elif op == "stop":
                self.stopping.set()
                reply = {"stopping": True}
            else:
                reply = {"kind": "fallback", "why": f"unknown op {op!r}"}
            if reply.get("kind") == "fallback":
                self._count("fallbacks")
            with contextlib.suppress(OSError):
                conn.settimeout(10)
                _send(conn, reply)

    def _count(self, name: str) -> None:
        with self.mutex:
            self.stats[name] += 1

    def run(self, message: dict[str, Any], caller: socket.socket | None = None) -> dict[str, Any]:
        """One read-only payload on one host, within the caller's deadline (see the module docstring).

        A `caller` that closes its connection meanwhile ends the payload like a deadline would.
        """
        self._count("requests")
        spec = message["host"]
        name, user, port = str(spec["name"]), spec.get("user"), spec.get("port")
        host = Host(spec=f"{user}@{name}:{port}", name=name, user=user, port=port)
        payload = _unb64(message["stdin"])
        end = time.monotonic() + float(message["deadline"])
        with self.mutex:
            kept = self.hosts.setdefault((name, user, port), _Kept())
        for attempt in range(2):
            try:
                shell, reused = self._shell(host, kept, end)
            except _Stale:
                self._count("retries")
                continue
            except HostTimeout as exc:
                # Connecting ran out of the call's deadline (a connect deadline of its own is "unreachable").
                if time.monotonic() >= end - 0.05:
                    return {"kind": "timeout", "stdout": "", "stderr": "", "started": False}
                return {"kind": "unreachable", "error": describe_error(exc)}
            except _Broken as exc:
                return {"kind": "fallback", "why": str(exc)}
            except Exception as exc:
                if time.monotonic() >= end:
                    return {"kind": "timeout", "stdout": "", "stderr": "", "started": False}
                return {"kind": "unreachable", "error": describe_error(exc)}
            shell.caller = caller
            try:
                code, out, err = shell.ask(payload, end) if self.mode == "shell" else shell.once(payload, end)
            except _Expired as exc:
                shell.kill()
                self._drop(host, kept)  # a host past its deadline may be gone: connect afresh next time
                self._count("timeouts")
                return {"kind": "timeout", "stdout": _b64(exc.out), "stderr": _b64(exc.err), "started": True}
            except Exception as exc:
                shell.kill()
                if reused and attempt == 0:
                    # A kept shell or connection that died since (a host rebooted, sshd restarted): the
                    # payload is read-only, so once more over fresh ones.
                    self._drop(host, kept)
                    self._count("retries")
                    continue
                return {"kind": "fallback", "why": f"{type(exc).__name__}: {exc}"}
            shell.caller = None
            self._done(kept, shell)
            return {"kind": "done", "exit_code": code, "stdout": _b64(out), "stderr": _b64(err)}
        return {"kind": "fallback", "why": "no answer after a retry"}

    def _shell(self, host: Host, kept: _Kept, end: float) -> tuple[_Shell, bool]:
        """An idle kept shell (reused: True), else a new one on the kept or a new connection."""
        if self.mode == "shell":
            with kept.lock:
                while kept.idle:
                    shell = kept.idle.pop()
                    if shell.usable():
                        return shell, True
                    shell.kill()
        with kept.connecting:  # one handshake per host, whoever asks at once
            conn = kept.conn
            reused = conn is not None and conn.is_connected
            if not reused:
                conn = self.ex.connection(host, max(end - time.monotonic(), 0.1))
                self._count("handshakes")
                kept.conn = conn
        try:
            left = end - time.monotonic()
            channel = conn.client.get_transport().open_session(timeout=max(min(left, 10.0), 0.1))
            channel.exec_command(REMOTE_SHELL)
            if self.mode == "shell":
                channel.sendall(LOOP.encode())
        except Exception as exc:
            if reused:
                self._drop(host, kept)
                raise _Stale(str(exc)) from exc
            raise _Broken(f"cannot open a shell: {type(exc).__name__}: {exc}") from exc
        self._count("shells")
        return _Shell(channel), reused

    def _done(self, kept: _Kept, shell: _Shell) -> None:
        """Keep a shell that answered cleanly for the next request; close the rest."""
        if self.mode == "shell" and shell.usable():
            with kept.lock:
                if len(kept.idle) < KEEP_IDLE_SHELLS:
                    kept.idle.append(shell)
                    return
        shell.kill()

    def _drop(self, host: Host, kept: _Kept) -> None:
        with kept.lock:
            idle, kept.idle = kept.idle, []
            conn, kept.conn = kept.conn, None
        for shell in idle:
            shell.kill()
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        self.ex._forget(host)


# --- the command line ---------------------------------------------------------------------------------------------


def _sockets(directory: Path) -> Iterator[Path]:
    yield from sorted(directory.glob("keeper-*.sock"))


def _ask(path: Path, op: str) -> dict[str, Any] | None:
    """A control request (`stats`, `stop`) to the keeper at `path`; None if none answers."""
    try:
        with contextlib.closing(_connect(path)) as sock:
            _send(sock, {"op": op})
            return _recv(sock)
    except (OSError, EOFError, ValueError, NotOurs, struct.error):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fablaunch.keeper",
                                     description="fablaunch's keeper of SSH connections for read-only calls.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a keeper (its settings as JSON on stdin); the executor starts these")
    serve.add_argument("key")
    sub.add_parser("list", help="this user's keepers and their counters")
    sub.add_parser("stop", help="stop this user's keepers (each closes its connections and removes its socket)")
    args = parser.parse_args(argv)
    directory = runtime_dir(create=args.command == "serve")
    if args.command == "serve":
        values = json.loads(sys.stdin.read())
        if directory is None or key_of(values) != args.key:
            return 2
        return _serve(values, directory, args.key)
    for path in _sockets(directory) if directory else []:
        answer = _ask(path, "stats" if args.command == "list" else "stop")
        print(f"{path}: {json.dumps(answer) if answer else 'not answering'}")
    return 0


def _serve(values: dict[str, Any], directory: Path, key: str) -> int:
    os.umask(0o077)
    stop = threading.Event()

    def ending(signum: int, frame: Any) -> None:
        stop.set()

    # Before the Executor is made: it installs its own handlers only where none is set.
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, ending)
    logging.getLogger("paramiko").addHandler(logging.NullHandler())
    if os.environ.get("FABLAUNCH_KEEPER_LOG"):  # its stderr is then the starting process's
        logging.basicConfig(level=logging.DEBUG, format=f"keeper {os.getpid()}: %(message)s")
    keeper = Keeper(values, directory, key)
    keeper.stopping = stop
    if not keeper.listen():
        keeper.ex.close()
        return 0  # another keeper of this key is alive and serves
    keeper.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
