"""Run one command per host, hosts in parallel, over one SSH connection per host.

Everything that touches a host goes through `Executor`, so the rules live in one place: a bounded
pool (a default sshd drops handshakes beyond `MaxStartups`), retries with back-off when it does,
one cached connection per host reused across phases (preflight, launch, rollback), payloads on stdin
so no value shows in a process list, and per-host outcomes instead of tracebacks. `localhost` and
`127.0.0.1` run through a local bash, so a single machine without sshd works.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

from .hostfile import Host

logging.getLogger("paramiko").addHandler(logging.NullHandler())

RETRIES = 4
T = TypeVar("T")
# Every payload is a bash script sent on stdin: nothing of it shows in a process list or gets re-quoted.
REMOTE_SHELL = "bash -s"


@dataclass
class Outcome:
    """What happened on one host: the command's exit code and output, or why it never ran."""

    host: Host
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit_code == 0

    @property
    def reached(self) -> bool:
        return self.error is None

    def why(self) -> str:
        """A one-line reason for a failure, for tables."""
        if self.error:
            return self.error
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return text[-1] if text else f"exit code {self.exit_code}"


def describe_error(exc: BaseException) -> str:
    """Say in a few words why a host could not be reached."""
    import paramiko

    if isinstance(exc, socket.gaierror):
        return f"unreachable: cannot resolve host name ({exc.strerror})"
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError | ConnectionRefusedError):
        return "unreachable: connection refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "unreachable: connection timed out"
    if isinstance(exc, paramiko.AuthenticationException):
        return f"authentication failed: {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"unreachable: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


def _retryable(exc: BaseException) -> bool:
    """Handshakes dropped by a busy sshd (MaxStartups) or a reset: worth another try."""
    import paramiko

    if isinstance(exc, ConnectionResetError | EOFError | BrokenPipeError):
        return True
    return isinstance(exc, paramiko.SSHException) and "banner" in str(exc).lower()


class Executor:
    """A pool of per-host connections that runs one command (and stdin) per host at once."""

    def __init__(self, config: Any, parallel: int = 32) -> None:
        self.config = config
        self.parallel = parallel
        self._connections: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._live: set[_Shell] = set()
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="fablaunch")

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for conn in list(self._connections.values()):
            with contextlib.suppress(Exception):
                conn.close()
        self._connections.clear()

    def run(
        self,
        commands: Mapping[Host, tuple[str, str | None]],
        on_done: Callable[[Outcome], None] | None = None,
    ) -> dict[str, Outcome]:
        """Run each host's (command, stdin) and return outcomes keyed by host spec.

        `on_done` is called in the caller's thread as each host finishes (for progress bars).
        A KeyboardInterrupt propagates at once; hosts already running finish in the background.
        """
        return self._gather({h.spec: functools.partial(self.run_one, h, cmd, stdin)
                             for h, (cmd, stdin) in commands.items()}, on_done)

    def run_one(self, host: Host, command: str, stdin: str | None = None,
                on_output: Callable[[str], None] | None = None) -> Outcome:
        """Run one command on one host; never raises for host-side problems."""
        return self._attempt(host, lambda: self._start(host, command).finish(stdin, on_output))

    def hold(self, commands: Mapping[Host, tuple[str, str]]) -> dict[str, Held]:
        """Start each host's shell with the first part of its script and wait until every host ran it.

        The first part must end by printing `hold_line(status)`; its status becomes the outcome's exit
        code. The shells then wait for `release` to send the rest of their scripts, so a check and the
        action it guards cost one remote shell start each, not two (each one runs the user's .bashrc).
        """

        def one(host: Host, command: str, first: str) -> Held:
            started: list[_Shell] = []

            def first_part() -> tuple[int, str, str]:
                started.append(self._start(host, command))
                started[0].send(first)
                return started[0].read_until_hold()

            outcome = self._attempt(host, first_part)
            return Held(outcome, started[0] if outcome.reached and started and started[0].waiting else None)

        return self.each(lambda h: one(h, *commands[h]), commands)

    def each(self, fn: Callable[[Host], T], hosts: Iterable[Host]) -> dict[str, T]:
        """Call fn(host) for every host in the pool: for per-host work made of more than one command."""
        futures = {h.spec: self._pool.submit(fn, h) for h in hosts}
        return {spec: f.result() for spec, f in futures.items()}

    def release(self, held: Mapping[str, Held], rest: Mapping[str, str | None],
                on_done: Callable[[Outcome], None] | None = None) -> dict[str, Outcome]:
        """Send each held shell the rest of its script (None: end it unused) and collect the outcomes."""

        def one(spec: str) -> Outcome:
            host, shell = held[spec].outcome.host, held[spec].shell
            if shell is None:
                return Outcome(host, error=held[spec].outcome.error or "the shell ended before its script was complete")
            return self._attempt(host, lambda: shell.finish(rest.get(spec), None))

        return self._gather({spec: functools.partial(one, spec) for spec in held}, on_done)

    def _attempt(self, host: Host, work: Callable[[], tuple[int, str, str]]) -> Outcome:
        """Time `work` (exit code, stdout, stderr) on a host; a host-side failure becomes the outcome's error."""
        start = time.monotonic()
        outcome = Outcome(host)
        try:
            outcome.exit_code, outcome.stdout, outcome.stderr = work()
        except Exception as exc:
            outcome.error = describe_error(exc)
            self._forget(host)
        outcome.seconds = time.monotonic() - start
        return outcome

    def _gather(self, work: Mapping[str, Callable[[], Outcome]],
                on_done: Callable[[Outcome], None] | None) -> dict[str, Outcome]:
        """Run each host's work in the pool; call `on_done` in this thread as each finishes."""
        futures = {self._pool.submit(fn): spec for spec, fn in work.items()}
        results: dict[str, Outcome] = {}
        pending: Iterable[Future[Outcome]] = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in done:
                results[futures[future]] = outcome = future.result()
                if on_done:
                    on_done(outcome)
        return {spec: results[spec] for spec in work}

    def _start(self, host: Host, command: str) -> _Shell:
        if host.is_local:
            shell: _Shell = _LocalShell(command, self._live.discard)
        else:
            channel = self.connection(host).client.get_transport().open_session()
            channel.exec_command(command)
            shell = _RemoteShell(channel, self._live.discard)
        with self._lock:
            self._live.add(shell)
        return shell

    def cancel(self) -> None:
        """Cut off every command still in flight (Ctrl-C): a payload that has not yet reached its
        guard (a write to its stdout) stops there instead of starting sessions after a rollback."""
        with self._lock:
            live = list(self._live)
        for shell in live:
            with contextlib.suppress(Exception):
                shell.cancel()

    def connection(self, host: Host) -> Any:
        """The host's open connection, made (with retries) on first use."""
        with self._lock:
            conn = self._connections.get(host.spec)
        if conn is not None and conn.is_connected:
            return conn
        from fabric import Connection

        for attempt in range(RETRIES):
            # Building a Connection reads and merges the shared Fabric config, which is not thread-safe
            # (seen: "No attribute or config key found for 'user'" under 32 threads); the handshake in
            # open() is what takes time, and that stays parallel.
            with self._build_lock:
                conn = Connection(host.name.strip("[]"), user=host.user, port=host.port, config=self.config)
            try:
                conn.open()
                break
            except Exception as exc:
                conn.close()
                if attempt == RETRIES - 1 or not _retryable(exc):
                    raise
                time.sleep(0.2 * 2**attempt + random.random() * 0.3)
        with self._lock:
            self._connections[host.spec] = conn
        return conn

    def _forget(self, host: Host) -> None:
        with self._lock:
            conn = self._connections.pop(host.spec, None)
        if conn is not None:
            conn.close()


HOLD = "\x1eFABLAUNCH_HOLD"


def hold_line(status: str) -> str:
    """The shell line that ends the first part of a held script, reporting `status` (a shell word)."""
    return f"printf '\\036FABLAUNCH_HOLD %s\\n' {status}"


def _parse_hold(out: bytes) -> tuple[int, str] | None:
    """(status, stdout before it) once the hold line has arrived."""
    mark = out.find(HOLD.encode())
    if mark < 0 or b"\n" not in out[mark:]:
        return None
    line = out[mark:].split(b"\n", 1)[0].decode(errors="replace")
    status = line.split()[-1]
    return (int(status) if status.lstrip("-").isdigit() else 1), _text(out[:mark])


class _Shell:
    """A shell on one host reading its script from stdin, possibly in two parts."""

    waiting = False  # true while it has run a first part and waits for the rest

    def __init__(self, on_end: Callable[[_Shell], None]) -> None:
        self.on_end = on_end

    def send(self, text: str) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError

    def read_until_hold(self) -> tuple[int, str, str]:
        raise NotImplementedError

    def finish(self, stdin: str | None, on_output: Callable[[str], None] | None) -> tuple[int, str, str]:
        raise NotImplementedError


class _RemoteShell(_Shell):
    def __init__(self, channel: Any, on_end: Callable[[_Shell], None]) -> None:
        super().__init__(on_end)
        self.channel = channel
        self.out = bytearray()
        self.err = bytearray()

    def send(self, text: str) -> None:
        self.channel.sendall(_bytes(text))

    def cancel(self) -> None:
        self.channel.close()

    def _pump(self, on_output: Callable[[str], None] | None = None, pending: bytearray | None = None) -> bool:
        """Move what has arrived into the buffers; False once the command has ended and all is read."""
        select.select([self.channel], [], [], 1.0)
        # Whether it had ended is read before draining: all data precedes the status and the close.
        ended = self.channel.closed or self.channel.exit_status_ready()
        while self.channel.recv_ready():
            data = self.channel.recv(65536)
            self.out += data
            if on_output is not None and pending is not None:
                pending += data
                *lines, rest = bytes(pending).split(b"\n")
                pending[:] = rest
                for line in lines:
                    on_output(_text(line + b"\n"))
        while self.channel.recv_stderr_ready():
            self.err += self.channel.recv_stderr(65536)
        # A channel closed under us (Executor.close after Ctrl-C) never gets a status.
        return not ended

    def _status(self) -> int:
        # recv_exit_status() would wait forever on a channel that was closed before its status came.
        return self.channel.exit_status if self.channel.exit_status_ready() else -1

    def read_until_hold(self) -> tuple[int, str, str]:
        while True:
            held = _parse_hold(bytes(self.out))
            if held:
                self.waiting = True
                self.out = bytearray(self.out[bytes(self.out).find(b"\n", bytes(self.out).find(HOLD.encode())) + 1:])
                err, self.err = _text(bytes(self.err)), bytearray()
                return held[0], held[1], err
            if not self._pump():
                code = self._status()
                self.channel.close()
                self.on_end(self)
                return code, _text(bytes(self.out)), _text(bytes(self.err))

    def finish(self, stdin: str | None, on_output: Callable[[str], None] | None) -> tuple[int, str, str]:
        try:
            if stdin is not None:
                self.channel.sendall(_bytes(stdin))
            self.channel.shutdown_write()
            pending = bytearray()
            if on_output and self.out:
                pending += self.out
            while self._pump(on_output, pending):
                pass
            if on_output and pending:
                on_output(_text(bytes(pending)))
            return self._status(), _text(bytes(self.out)), _text(bytes(self.err))
        finally:
            self.channel.close()
            self.on_end(self)


class _LocalShell(_Shell):
    def __init__(self, command: str, on_end: Callable[[_Shell], None]) -> None:
        super().__init__(on_end)
        self.proc = subprocess.Popen(["bash", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        # stderr drains in a thread so a chatty command cannot block on a full pipe while stdout is read.
        self.err: list[bytes] = []
        self.drain = threading.Thread(target=lambda: self.err.append(self.proc.stderr.read()),  # type: ignore[union-attr]
                                      daemon=True)
        self.drain.start()
        self.out = bytearray()

    def send(self, text: str) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(_bytes(text))
        self.proc.stdin.flush()

    def cancel(self) -> None:
        # Its own process group: tmux servers it started have left it and are not touched.
        os.killpg(self.proc.pid, signal.SIGKILL)

    def read_until_hold(self) -> tuple[int, str, str]:
        assert self.proc.stdout
        for line in iter(self.proc.stdout.readline, b""):
            if line.startswith(HOLD.encode()):
                self.waiting = True
                held = _parse_hold(bytes(self.out) + line)
                assert held
                out, self.out = bytes(self.out), bytearray()
                return held[0], _text(out), ""
            self.out += line
        self.proc.wait()
        self.drain.join()
        self.on_end(self)
        return self.proc.returncode, _text(bytes(self.out)), _text(b"".join(self.err))

    def finish(self, stdin: str | None, on_output: Callable[[str], None] | None) -> tuple[int, str, str]:
        assert self.proc.stdin and self.proc.stdout
        try:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write(_bytes(stdin))
                self.proc.stdin.close()
            for line in iter(self.proc.stdout.readline, b""):
                if on_output:
                    on_output(_text(line))
                self.out += line
        except BaseException:  # Ctrl-C while following: the local command must not outlive us
            self.proc.terminate()
            raise
        finally:
            self.on_end(self)
        code = self.proc.wait()
        self.drain.join()
        return code, _text(bytes(self.out)), _text(b"".join(self.err))


@dataclass
class Held:
    """A host's shell after the first part of its script: that part's outcome, and the waiting shell."""

    outcome: Outcome
    shell: _Shell | None


def _bytes(text: str | None) -> bytes:
    return b"" if text is None else text.encode("utf-8", "surrogateescape")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")
