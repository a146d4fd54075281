"""Run one command per host, hosts in parallel, over one SSH connection per host.

Everything that touches a host goes through `Executor`, so the rules live in one place: a bounded
pool (a default sshd drops handshakes beyond `MaxStartups`), retries with back-off when it does,
one cached connection per host reused across phases (preflight, launch, rollback), payloads on stdin
so no value shows in a process list, and per-host outcomes instead of tracebacks. `localhost` and
`127.0.0.1` run through a local bash, so a single machine without sshd works.
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from .hostfile import Host

logging.getLogger("paramiko").addHandler(logging.NullHandler())

RETRIES = 4
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
        futures: dict[Future[Outcome], Host] = {
            self._pool.submit(self.run_one, host, cmd, stdin): host for host, (cmd, stdin) in commands.items()
        }
        results: dict[str, Outcome] = {}
        pending: Iterable[Future[Outcome]] = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in done:
                outcome = future.result()
                results[outcome.host.spec] = outcome
                if on_done:
                    on_done(outcome)
        return {h.spec: results[h.spec] for h in commands}

    def run_one(self, host: Host, command: str, stdin: str | None = None,
                on_output: Callable[[str], None] | None = None) -> Outcome:
        """Run one command on one host; never raises for host-side problems."""
        start = time.monotonic()
        outcome = Outcome(host)
        try:
            if host.is_local:
                outcome.exit_code, outcome.stdout, outcome.stderr = self._run_local(command, stdin, on_output)
            else:
                outcome.exit_code, outcome.stdout, outcome.stderr = self._run_remote(host, command, stdin, on_output)
        except Exception as exc:
            outcome.error = describe_error(exc)
            self._forget(host)
        outcome.seconds = time.monotonic() - start
        return outcome

    def _run_local(self, command: str, stdin: str | None,
                   on_output: Callable[[str], None] | None) -> tuple[int, str, str]:
        proc = subprocess.Popen(["bash", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        if on_output is None:
            out, err = proc.communicate(_bytes(stdin))
            return proc.returncode, _text(out), _text(err)
        assert proc.stdin and proc.stdout and proc.stderr
        proc.stdin.write(_bytes(stdin))
        proc.stdin.close()
        # stderr drains in a thread so a chatty command cannot block on a full pipe while stdout streams.
        err: list[bytes] = []
        drain = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
        drain.start()
        chunks = []
        try:
            for line in iter(proc.stdout.readline, b""):
                on_output(_text(line))
                chunks.append(line)
        except BaseException:  # Ctrl-C while following: the local command must not outlive us
            proc.terminate()
            raise
        code = proc.wait()
        drain.join()
        return code, _text(b"".join(chunks)), _text(b"".join(err))

    def connection(self, host: Host) -> Any:
        """The host's open connection, made (with retries) on first use."""
        with self._lock:
            conn = self._connections.get(host.spec)
        if conn is not None and conn.is_connected:
            return conn
        from fabric import Connection

        for attempt in range(RETRIES):
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

    def _run_remote(self, host: Host, command: str, stdin: str | None,
                    on_output: Callable[[str], None] | None) -> tuple[int, str, str]:
        channel = self.connection(host).client.get_transport().open_session()
        try:
            channel.exec_command(command)
            if stdin is not None:
                channel.sendall(_bytes(stdin))
            channel.shutdown_write()
            out: list[bytes] = []
            err: list[bytes] = []
            pending = b""
            while True:
                select.select([channel], [], [], 1.0)
                while channel.recv_ready():
                    data = channel.recv(65536)
                    out.append(data)
                    if on_output:
                        pending += data
                        *lines, pending = pending.split(b"\n")
                        for line in lines:
                            on_output(_text(line + b"\n"))
                while channel.recv_stderr_ready():
                    err.append(channel.recv_stderr(65536))
                if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
                    break
            if on_output and pending:
                on_output(_text(pending))
            return channel.recv_exit_status(), _text(b"".join(out)), _text(b"".join(err))
        finally:
            channel.close()


def _bytes(text: str | None) -> bytes:
    return b"" if text is None else text.encode("utf-8", "surrogateescape")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")
