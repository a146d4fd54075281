"""Run one command per host, hosts in parallel, over one SSH connection per host.

Everything that touches a host goes through `Executor`, so the rules live in one place: a bounded
pool (a default sshd drops handshakes beyond `MaxStartups`), retries with back-off when it does,
one cached connection per host reused across phases (preflight, launch, rollback), payloads on stdin
so no value shows in a process list, and per-host outcomes instead of tracebacks. `localhost` and
`127.0.0.1` run through a local bash, so a single machine without sshd works.

Deadlines, so that no command of fablaunch hangs on one host:

* Connecting (TCP, SSH banner, authentication) has the connect deadline: `fab -t` / `timeouts.connect`
  (or the host's ssh_config `ConnectTimeout`), else CONNECT_SECONDS. Retries after a dropped handshake
  (MaxStartups) stay within it, and a banner that never came is not retried: the host is hung, not busy.
* Each command has a deadline, counted from when its host's turn starts (connecting included): the
  executor's (`Executor(deadline=)`, replaced by the user's `fab -T`), or the call's own. At the deadline
  the host's outcome says `timed out after Ns`, the other hosts' outcomes are kept, and the command's
  remote shell is ended (see `_RemoteShell.kill`).
* A *patient* deadline only cuts a host whose remote shell has not started its script by then (a hung
  NFS home, a blocking .bashrc); once the script runs, it runs as long as it needs (a launch payload on
  a slow host, `logs --follow`). The rest of a held script is patient by default: its shell already ran
  the first part.
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
from types import EllipsisType
from typing import Any, TypeVar

from .hostfile import Host

logging.getLogger("paramiko").addHandler(logging.NullHandler())

RETRIES = 4
# Connect deadline when neither `fab -t`, `timeouts.connect` nor ssh_config's ConnectTimeout sets one.
CONNECT_SECONDS = 10.0
# How often a connected transport's thread wakes when nothing arrives (paramiko's own: 0.1; see _poll_less).
TRANSPORT_POLL_SECONDS = 1.0
T = TypeVar("T")
# A call's deadline: seconds, None for none, or ... (the default) for the executor's.
DeadlineArg = float | EllipsisType | None
# Every payload is a bash script sent on stdin: nothing of it shows in a process list or gets re-quoted.
REMOTE_SHELL = "bash -s"
# The executor's own first line of every REMOTE_SHELL script (stripped from the output): its arrival
# says the remote shell got past its startup files and runs the script (what a patient deadline
# waits for), and a shell that only gets there after fab gave up on it dies writing it (its channel
# is closed) instead of running the rest of its script blind.
STARTED = "\x1eFABLAUNCH_STARTED"
_STARTED_LINE = (STARTED + "\n").encode()
_START_SCRIPT = "printf '\\036FABLAUNCH_STARTED\\n' || exit 141\n"
# bash reads a script from a pipe one byte per read(2), so that a command it runs can read the rest of
# stdin: the 33 KB launch payload of 8 ranks cost a host about 9 ms of CPU that way. A script of
# BULK_MIN bytes or more therefore travels as one `head -c` read and an eval. Its end mark must arrive
# too: a script cut short (a launcher gone mid-send) then runs nothing, where bash reading it line by
# line would run its first half.
BULK_MIN = 4096
_BULK_END = "#FABLAUNCH_END"
_BULK_READ = ("fablaunch_script=$(head -c {size}) || exit 141; case $fablaunch_script in "
              "*$'\\n'" + _BULK_END + ") eval \"$fablaunch_script\" ;; "
              "*) echo 'fablaunch: the script arrived cut short; nothing of it ran' >&2; exit 141 ;; esac\n")


@dataclass
class Outcome:
    """What happened on one host: the command's exit code and output, or why it never ran."""

    host: Host
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    seconds: float = 0.0
    # The remote shell got past its startup files and ran (part of) its script: a host that timed out
    # with this False ran nothing of it, one with it True may have (a rollback must include it).
    started: bool = False

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


class HostTimeout(Exception):
    """A connection phase that passed its deadline (the message says which and how long)."""


def seconds_text(seconds: float) -> str:
    """`10s`, `2.5s`: how deadlines are named in messages."""
    return f"{seconds:g}s"


def describe_error(exc: BaseException) -> str:
    """Say in a few words why a host could not be reached."""
    import paramiko

    if isinstance(exc, HostTimeout):
        return f"unreachable: {exc}"
    if isinstance(exc, socket.gaierror):
        return f"unreachable: cannot resolve host name ({exc.strerror})"
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError | ConnectionRefusedError):
        return "unreachable: connection refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "unreachable: connection timed out"
    if isinstance(exc, paramiko.AuthenticationException):
        return f"authentication failed: {exc}"
    if isinstance(exc, paramiko.SSHException) and "banner" in str(exc).lower():
        # What is left after the retries of a handshake that sshd kept dropping.
        return "unreachable: connection closed before the SSH banner (sshd busy: MaxStartups?)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"unreachable: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


def _banner_timeout(exc: BaseException) -> bool:
    """Whether paramiko gave up waiting for the SSH banner (rather than seeing the connection drop).

    paramiko words both the same ("Error reading SSH protocol banner"); the exception it turned into
    that message (the timeout, or EOF/reset) is kept as the context.
    """
    import paramiko

    return (isinstance(exc, paramiko.SSHException) and "banner" in str(exc).lower()
            and isinstance(exc.__cause__ or exc.__context__, TimeoutError | socket.timeout))


def _handshake_timeout(exc: BaseException, late: bool) -> bool:
    """Whether the SSH handshake (banner, key exchange) ran out of time, as opposed to failing."""
    import paramiko

    if _banner_timeout(exc):
        return True
    if "banner" in str(exc).lower():  # closed or reset before the banner: a busy sshd, not a timeout
        return False
    # Past its deadline, paramiko's key exchange just stops waiting and the next step fails
    # ("No existing session"); authentication says so itself ("Authentication timeout").
    return late and isinstance(exc, paramiko.SSHException) and not isinstance(exc, paramiko.AuthenticationException)


def _poll_less(conn: Any) -> None:
    """Let a connected transport's thread wake once a second instead of ten times, once it is connected.

    paramiko's thread reads its socket with a 0.1 s timeout, only to look at its keepalive, rekey and
    handshake timers between packets. A launch holds a connection per host for its whole run, so at
    256 hosts that polling alone cost 76 ms of CPU per second (most of the launcher's CPU over a long
    launch), 8 ms once a second. The handshake, whose timeouts need the fine steps, is over by now;
    close() still ends at once (it does not wait for the thread, a daemon); a keepalive still goes out
    within a second of being due. Only plain sockets are touched (not a ProxyJump channel).
    """
    transport = conn.client.get_transport()
    sock = getattr(transport, "sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.settimeout(TRANSPORT_POLL_SECONDS)


def _quick_ssh_config(config: Any) -> None:
    """Make the config's ssh_config lookups skip paramiko's per-stanza user name look-up; same answers.

    paramiko's lookup asks every `Host` stanza's Match list, and each ask first reads the local user
    name (getpass: environment, then the password database) even when the list is empty, as it is
    for every plain `Host` stanza. One Connection per host against an ssh_config with a stanza per
    host is then quadratic: 1.8 s of CPU at 256 hosts, 0.3 s without the empty asks (which can only
    answer "no match"). Only paramiko's own class is changed, in place; a subclass of the user's is
    left alone.
    """
    from paramiko.config import SSHConfig

    ssh_config = getattr(config, "base_ssh_config", None)
    if type(ssh_config) is SSHConfig:
        ssh_config.__class__ = _quick_ssh_config_class()


@functools.cache
def _quick_ssh_config_class() -> type:
    """paramiko's SSHConfig answering an empty Match list without work (built on first use: paramiko is
    imported only where a connection is made)."""
    from paramiko.config import SSHConfig

    class QuickSSHConfig(SSHConfig):
        def _does_match(self, match_list: Any, *args: Any, **kwargs: Any) -> Any:
            # paramiko's own answer for an empty list, after reading the user name it never uses.
            return [] if not match_list else super()._does_match(match_list, *args, **kwargs)

    return QuickSSHConfig


def readable(sources: list[Any], timeout: float) -> list[Any]:
    """Those of `sources` (sockets, paramiko channels: anything with fileno()) readable within `timeout`.

    poll, not select.select: select cannot watch a descriptor numbered 1024 or more (FD_SETSIZE),
    and a launch holds a socket per host and a pipe pair per channel read this way, so a few hundred
    hosts pass that number.
    """
    poller = select.poll()
    by_fd: dict[int, Any] = {}
    for source in sources:
        fd = source.fileno()
        by_fd[fd] = source
        poller.register(fd, select.POLLIN | select.POLLPRI)
    return [by_fd[fd] for fd, _ in poller.poll(max(timeout, 0.0) * 1000)]


@functools.cache
def more_descriptors() -> None:
    """Raise this process's soft limit on open files to its hard limit (at most 65536), once.

    Each host holds a socket, and each channel read a pipe pair, for a whole launch: a few hundred hosts
    pass the soft limit of 1024 that many systems start with (EMFILE, "Too many open files"), while
    the hard limit is far higher. Raising the soft limit up to the hard one needs no privilege.
    """
    import resource

    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _retryable(exc: BaseException) -> bool:
    """Handshakes dropped by a busy sshd (MaxStartups) or a reset: worth another try.

    A banner that never came is not: the host is hung, and each retry would cost a whole deadline.
    """
    import paramiko

    if isinstance(exc, ConnectionResetError | EOFError | BrokenPipeError):
        return True
    return isinstance(exc, paramiko.SSHException) and "banner" in str(exc).lower() and not _banner_timeout(exc)


def _seconds(value: Any) -> float | None:
    """A positive number of seconds, or None (unset, 0 meaning "no timeout" to Invoke, not a number)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None


def _configured(config: Any, *path: str) -> float | None:
    """Seconds from a nested config value (a Fabric Config or dict), or None."""
    value: Any = config
    for key in path:
        try:
            value = value[key]
        except (KeyError, TypeError, AttributeError):
            return None
    return _seconds(value)


class _Watch:
    """One host's command against its deadline: when it passes, the host's shell is ended.

    A threading.Timer rather than checks in the read loops: the worker may be blocked anywhere
    (opening the channel, paramiko's exec_command wait, a full send window), and ending the shell
    (closing its channel, killing a local process group) unblocks all of those.
    """

    def __init__(self, seconds: float | None, patient: bool) -> None:
        self.seconds = seconds
        self.patient = patient
        self.shell: _Shell | None = None
        self.expired = False
        self._over = False
        self._lock = threading.Lock()
        self._end = None if seconds is None else time.monotonic() + seconds
        self._timer: threading.Timer | None = None
        if seconds is not None:
            self._timer = threading.Timer(seconds, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def remaining(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.monotonic())

    def attach(self, shell: _Shell) -> None:
        """Watch this shell; one attached after the deadline passed is ended at once."""
        with self._lock:
            self.shell = shell
            late = self.expired
        if late:
            shell.kill()

    def _expire(self) -> None:
        with self._lock:
            if self._over or (self.patient and self.shell is not None and self.shell.started()):
                return
            self.expired = True
            shell = self.shell
        if shell is not None:
            shell.kill()

    def finish(self) -> bool:
        """Stop watching; True if the deadline had passed (the outcome is then a timeout)."""
        with self._lock:
            self._over = True
        if self._timer is not None:
            self._timer.cancel()
        return self.expired

    def message(self) -> str:
        return f"timed out after {seconds_text(self.seconds or 0)}"


class Executor:
    """A pool of per-host connections that runs one command (and stdin) per host at once."""

    def __init__(self, config: Any, parallel: int = 32, deadline: float | None = None, patient: bool = False,
                 keeper: bool = False) -> None:
        """`deadline`: seconds each host's command may take (None: no limit); `fab -T N` replaces it.

        `patient`: the deadline only cuts hosts whose shell has not started its script by then.
        `keeper`: calls marked `read_only` may go through the user's keeper of kept connections and
        shells (fablaunch/keeper.py), falling back to direct connections on any doubt.
        """
        more_descriptors()
        self.config = config
        self.keeper: Any = None
        if keeper:
            from .keeper import Client  # imports this module: only here

            self.keeper = Client.for_config(config)
        self.parallel = parallel
        # The user's `fab -T` (Invoke's command timeout) wins over the caller's default.
        self.deadline = _configured(config, "timeouts", "command") or deadline
        self.patient = patient
        self._connections: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._live: set[_Shell] = set()
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="fablaunch")
        self._handlers: dict[int, Any] = {}
        # SIGTERM (a CI timeout, `kill`) and SIGHUP (a closed terminal) would end fab without unwinding,
        # leaving every remote command in flight running: treat them like Ctrl-C, so `with Executor`
        # ends those. Only where nobody else handles them (launch has its own handlers).
        if threading.current_thread() is threading.main_thread():
            for signum in _ENDING:
                if signal.getsignal(signum) == signal.SIG_DFL:
                    self._handlers[signum] = signal.signal(signum, _interrupt)

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End every command still in flight (Ctrl-C, SIGTERM, an error) and close the connections."""
        with self._lock:
            self._closed = True
            live = list(self._live)
        for shell in live:
            with contextlib.suppress(Exception):
                shell.kill()
        if self.keeper is not None:
            self.keeper.close()  # requests waiting on the keeper end too
        self._pool.shutdown(wait=False, cancel_futures=True)
        for conn in list(self._connections.values()):
            with contextlib.suppress(Exception):
                conn.close()
        self._connections.clear()
        # Put back what was there, unless someone replaced our handler since (theirs stays).
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._handlers.items():
                if signal.getsignal(signum) is _interrupt:
                    signal.signal(signum, handler)
            self._handlers.clear()

    def _limit(self, deadline: DeadlineArg, patient: bool | None) -> tuple[float | None, bool]:
        """A call's (seconds, patient): its own where given, else the executor's."""
        return (self.deadline if deadline is ... else deadline), (self.patient if patient is None else patient)

    def run(
        self,
        commands: Mapping[Host, tuple[str, str | None]],
        on_done: Callable[[Outcome], None] | None = None,
        *,
        deadline: DeadlineArg = ...,
        patient: bool | None = None,
        on_line: Callable[[str, str], None] | None = None,
        read_only: bool = False,
    ) -> dict[str, Outcome]:
        """Run each host's (command, stdin) and return outcomes keyed by host spec.

        `on_done` is called in the caller's thread as each host finishes (for progress bars);
        `on_line(host spec, line)` in a worker thread as each stdout line arrives.
        `deadline`/`patient` replace the executor's for this call (None: no deadline).
        A KeyboardInterrupt propagates at once; `close()` (the end of `with Executor`) ends the hosts
        still running. `read_only`: see run_one.
        """
        return self._gather({h.spec: functools.partial(self.run_one, h, cmd, stdin,
                                                       on_line and functools.partial(on_line, h.spec),
                                                       deadline=deadline, patient=patient, read_only=read_only)
                             for h, (cmd, stdin) in commands.items()}, on_done)

    def run_one(self, host: Host, command: str, stdin: str | None = None,
                on_output: Callable[[str], None] | None = None, *,
                deadline: DeadlineArg = ..., patient: bool | None = None, read_only: bool = False) -> Outcome:
        """Run one command on one host; never raises for host-side problems.

        `on_output` gets each stdout line as it arrives; following output forever needs a patient
        deadline or `deadline=None`. `read_only`: the caller says the payload changes nothing, so an
        executor made with `keeper=True` may run it over a kept connection and shell (one answer, no
        streaming); without an answer from there it runs here, within what is left of the deadline.
        """
        watch = _Watch(*self._limit(deadline, patient))
        if (read_only and self.keeper is not None and command == REMOTE_SHELL and not host.is_local
                and watch.seconds is not None and not watch.patient):
            kept = self.keeper.run(host, stdin, watch, on_output)
            if kept is not None:
                return kept
        return self._attempt(host, lambda watch: self._start(host, command, watch).finish(stdin, on_output), watch)

    def hold(self, commands: Mapping[Host, tuple[str, str]], *,
             deadline: DeadlineArg = ...) -> dict[str, Held]:
        """Start each host's shell with the first part of its script and wait until every host ran it.

        The first part must end by printing `hold_line(status)`; its status becomes the outcome's exit
        code. The shells then wait for `release` to send the rest of their scripts, so a check and the
        action it guards cost one remote shell start each, not two (each one runs the user's .bashrc).
        The first part has the deadline (never patient: it is the check that the host answers).
        """

        def one(host: Host, command: str, first: str) -> Held:
            started: list[_Shell] = []

            def first_part(watch: _Watch) -> tuple[int, str, str]:
                started.append(self._start(host, command, watch))
                started[0].send(first)
                return started[0].read_until_hold()

            outcome = self._attempt(host, first_part, _Watch(self._limit(deadline, False)[0], False))
            return Held(outcome, started[0] if outcome.reached and started and started[0].waiting else None)

        return self.each(lambda h: one(h, *commands[h]), commands)

    def each(self, fn: Callable[[Host], T], hosts: Iterable[Host]) -> dict[str, T]:
        """Call fn(host) for every host in the pool: for per-host work made of more than one command."""
        futures = {h.spec: self._pool.submit(fn, h) for h in hosts}
        return {spec: f.result() for spec, f in futures.items()}

    def release(self, held: Mapping[str, Held], rest: Mapping[str, str | None],
                on_done: Callable[[Outcome], None] | None = None, *,
                deadline: DeadlineArg = ..., patient: bool = True) -> dict[str, Outcome]:
        """Send each held shell the rest of its script (None: end it unused) and collect the outcomes.

        Patient by default: a held shell has shown that its host answers, so the rest (a launch
        payload) runs as long as it needs; pass `patient=False` for a hard deadline.
        """

        def one(spec: str) -> Outcome:
            host, shell = held[spec].outcome.host, held[spec].shell
            if shell is None:
                return Outcome(host, error=held[spec].outcome.error or "the shell ended before its script was complete")

            def rest_part(watch: _Watch) -> tuple[int, str, str]:
                watch.attach(shell)
                return shell.finish(rest.get(spec), None)

            return self._attempt(host, rest_part, _Watch(*self._limit(deadline, patient)))

        return self._gather({spec: functools.partial(one, spec) for spec in held}, on_done)

    def _attempt(self, host: Host, work: Callable[[_Watch], tuple[int, str, str]], watch: _Watch) -> Outcome:
        """Time `work` (exit code, stdout, stderr) on a host; a host-side failure becomes the outcome's error."""
        start = time.monotonic()
        outcome = Outcome(host)
        try:
            outcome.exit_code, outcome.stdout, outcome.stderr = work(watch)
        except Exception as exc:
            if not watch.finish():
                outcome.error = describe_error(exc)
                self._forget(host)
        if watch.finish():
            # Whatever the ended shell left behind (an exit status of -1, a read error) is not the answer.
            outcome.exit_code, outcome.error = None, watch.message()
            if watch.shell is not None:
                outcome.stdout, outcome.stderr = watch.shell.output()
        if watch.shell is not None:
            outcome.started = watch.shell.started()
            if not watch.shell.waiting:
                self._ended(watch.shell)
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

    def _start(self, host: Host, command: str, watch: _Watch) -> _Shell:
        """Start `command` on the host, its shell watched from before the command is sent."""
        script = command == REMOTE_SHELL
        if host.is_local:
            shell: _Shell = _LocalShell(command, self._ended, script)
        else:
            conn = self.connection(host, watch.remaining())
            if watch.expired:  # the deadline passed while connecting: do not start anything
                raise HostTimeout(watch.message())
            # Opening a channel is one round trip to sshd: the connect deadline bounds it.
            seconds, left = self._connect_seconds(conn), watch.remaining()
            channel = conn.client.get_transport().open_session(
                timeout=seconds if left is None else max(min(seconds, left), 0.1))
            shell = _RemoteShell(channel, self._ended, script)
        with self._lock:
            closed = self._closed
            self._live.add(shell)
        # Watched before exec: an sshd that never confirms the command is cut at the deadline too.
        watch.attach(shell)
        if closed:  # Executor.close ran while this host was connecting
            shell.kill()
        if isinstance(shell, _RemoteShell):
            shell.execute(command)
        return shell

    def _ended(self, shell: _Shell) -> None:
        with self._lock:
            self._live.discard(shell)

    def cancel(self) -> None:
        """Cut off every command still in flight (Ctrl-C), before a rollback: each is killed (see
        `_RemoteShell.kill`); where sshd refuses that, a payload that has not yet reached its guard (a
        write to its stdout) stops there instead of starting sessions after the rollback."""
        with self._lock:
            live = list(self._live)
        for shell in live:
            with contextlib.suppress(Exception):
                shell.kill()

    def _connect_seconds(self, conn: Any) -> float:
        """The connect deadline for one connection: `fab -t`, else ssh_config/`timeouts.connect`, else the default."""
        return _configured(conn.connect_kwargs, "timeout") or _seconds(conn.connect_timeout) or CONNECT_SECONDS

    def connection(self, host: Host, budget: float | None = None) -> Any:
        """The host's open connection, made (with retries, within the connect deadline) on first use.

        `budget` caps the connect deadline (what is left of the command's deadline).
        """
        with self._lock:
            conn = self._connections.get(host.spec)
        if conn is not None and conn.is_connected:
            return conn
        from fabric import Connection

        start = time.monotonic()
        for attempt in range(RETRIES):
            # Building a Connection reads and merges the shared Fabric config, which is not thread-safe
            # (seen: "No attribute or config key found for 'user'" under 32 threads); the handshake in
            # open() is what takes time, and that stays parallel.
            with self._build_lock:
                _quick_ssh_config(self.config)
                conn = Connection(host.name.strip("[]"), user=host.user, port=host.port, config=self.config)
            seconds = self._connect_seconds(conn)
            if budget is not None:
                seconds = min(seconds, budget)
            left = max(seconds - (time.monotonic() - start), 0.1)
            # paramiko waits 15 s for a banner and 30 s for authentication unless told: all three
            # phases get what is left of the connect deadline. (Also avoids Fabric's refusal of a
            # `-t` together with a ConnectTimeout.)
            conn.connect_timeout = None
            conn.connect_kwargs = {**dict(conn.connect_kwargs), "timeout": left, "banner_timeout": left,
                                   "auth_timeout": left}
            tried = time.monotonic()
            try:
                conn.open()
                break
            except Exception as exc:
                transport = conn.client.get_transport()
                conn.close()
                if _handshake_timeout(exc, time.monotonic() - tried >= left - 0.05):
                    # paramiko's negotiation wait (the TCP timeout) may end before its banner wait does.
                    what = "SSH handshake unfinished" if transport and transport.remote_version else "no SSH banner"
                    raise HostTimeout(f"{what} within {seconds_text(seconds)}") from exc
                pause = 0.2 * 2**attempt + random.random() * 0.3
                if attempt == RETRIES - 1 or not _retryable(exc) or time.monotonic() - start + pause >= seconds:
                    raise
                time.sleep(pause)
        _poll_less(conn)
        with self._lock:
            self._connections[host.spec] = conn
        return conn

    def _forget(self, host: Host) -> None:
        with self._lock:
            conn = self._connections.pop(host.spec, None)
        if conn is not None:
            conn.close()


_ENDING = (signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM/SIGHUP handler: unwind like Ctrl-C, so every `with Executor` ends its remote commands."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


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

    def __init__(self, on_end: Callable[[_Shell], None], script: bool) -> None:
        self.on_end = on_end
        self.script = script  # a REMOTE_SHELL: its script starts with the executor's STARTED line
        self.up = False  # the STARTED line arrived
        self.heard = False  # any output arrived
        self._start_sent = False

    def _with_start(self, text: str | None) -> bytes:
        """What to write to stdin: the STARTED line first, before the first text sent to a script shell;
        a long script in bulk (see BULK_MIN)."""
        if not self.script:
            return _bytes(text)
        data = _bulk(_bytes(text))
        if not self._start_sent:
            self._start_sent = True
            return _START_SCRIPT.encode() + data
        return data

    def started(self) -> bool:
        """Whether the shell has started its script (a command that is not a script: answered at all)."""
        return self.up if self.script else self.heard or self.ended()

    def ended(self) -> bool:
        raise NotImplementedError

    def send(self, text: str) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        """End the command and every process of it (its process group); safe to repeat."""
        raise NotImplementedError

    def output(self) -> tuple[str, str]:
        """What arrived so far: (stdout, stderr)."""
        raise NotImplementedError

    def read_until_hold(self) -> tuple[int, str, str]:
        raise NotImplementedError

    def finish(self, stdin: str | None, on_output: Callable[[str], None] | None) -> tuple[int, str, str]:
        raise NotImplementedError


def _signal(channel: Any, name: str) -> None:
    """Send an RFC 4254 (6.9) "signal" request for the channel's command; paramiko has no API for it.

    OpenSSH's sshd (7.9 and later) answers it with killpg() of the session's process group: the user's
    shell and everything it started that did not leave the group (tmux servers and setsid'd processes
    did). It refuses subsystem and forced-command sessions, and before 10.0 root logins (no privilege
    separation after a root login): there the channel close and the STARTED line are what is left.
    """
    from paramiko.common import cMSG_CHANNEL_REQUEST
    from paramiko.message import Message

    m = Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(channel.remote_chanid)
    m.add_string("signal")
    m.add_boolean(False)  # no reply wanted: paramiko closes a channel whose request failed
    m.add_string(name)
    channel.transport._send_user_message(m)


class _RemoteShell(_Shell):
    def __init__(self, channel: Any, on_end: Callable[[_Shell], None], script: bool) -> None:
        super().__init__(on_end, script)
        self.channel = channel
        self.out = bytearray()
        self.err = bytearray()
        self.execd = False
        self._streamed = 0  # how much of `out` went to on_output

    def execute(self, command: str) -> None:
        # Set first: a kill racing the request must still signal (sshd handles requests in order).
        self.execd = True
        self.channel.exec_command(command)

    def ended(self) -> bool:
        return self.channel.closed or self.channel.exit_status_ready()

    def send(self, text: str) -> None:
        self.channel.sendall(self._with_start(text))

    def kill(self) -> None:
        """Ask sshd to SIGKILL the command's process group, then close the channel.

        The close alone leaves a shell stuck in its startup files (a hung NFS home, a blocking .bashrc)
        running: sshd only closes its pipes. Its first write, the STARTED line, then kills it (EPIPE)
        before it runs anything of its script, should it ever get past its startup files.
        """
        if self.execd and not self.channel.closed:
            with contextlib.suppress(Exception):
                _signal(self.channel, "KILL")
        self.channel.close()

    def output(self) -> tuple[str, str]:
        return _text(bytes(self.out)), _text(bytes(self.err))

    def _pump(self, on_output: Callable[[str], None] | None = None) -> bool:
        """Move what has arrived into the buffers; False once the command has ended and all is read."""
        readable([self.channel], 1.0)
        # Whether it had ended is read before draining: all data precedes the status and the close.
        ended = self.ended()
        self._drain(self.channel.recv_ready, self.channel.recv, self.out)
        self._drain(self.channel.recv_stderr_ready, self.channel.recv_stderr, self.err)
        if self.script and not self.up:
            mark = self.out.find(_STARTED_LINE)
            if mark >= 0:
                del self.out[mark:mark + len(_STARTED_LINE)]
                self.up = True
        if on_output is not None:
            self._stream(on_output, final=False)
        # A channel closed under us (Executor.close after Ctrl-C) never gets a status.
        return not ended

    def _drain(self, ready: Callable[[], bool], recv: Callable[[int], bytes], into: bytearray) -> None:
        """Move what one of the channel's streams holds into its buffer."""
        while ready():
            data = recv(65536)
            if not data:
                break
            self.heard = True
            into += data

    def _stream(self, on_output: Callable[[str], None], final: bool) -> None:
        """Pass the complete lines that arrived (and, once `final`, the rest) to on_output.

        The STARTED line is cut out of `out` before this runs, and only after it is complete, so no line
        passed on ever holds it.
        """
        end = len(self.out) if final else self.out.rfind(b"\n") + 1
        if end <= self._streamed:
            return
        *lines, rest = bytes(self.out[self._streamed:end]).split(b"\n")
        self._streamed = end
        for line in lines:
            on_output(_text(line + b"\n"))
        if rest:
            on_output(_text(rest))

    def _status(self) -> int:
        # recv_exit_status() would wait forever on a channel that was closed before its status came.
        return self.channel.exit_status if self.channel.exit_status_ready() else -1

    def read_until_hold(self) -> tuple[int, str, str]:
        while True:
            held = _parse_hold(bytes(self.out))
            if held:
                self.waiting = True
                out = bytes(self.out)
                self.out = bytearray(out[out.find(b"\n", out.find(HOLD.encode())) + 1:])
                self._streamed = 0
                err, self.err = _text(bytes(self.err)), bytearray()
                return held[0], held[1], err
            if not self._pump():
                code = self._status()
                self.channel.close()
                self.on_end(self)
                return code, *self.output()

    def finish(self, stdin: str | None, on_output: Callable[[str], None] | None) -> tuple[int, str, str]:
        self.waiting = False
        try:
            data = self._with_start(stdin)
            if data:
                self.channel.sendall(data)
            self.channel.shutdown_write()
            while self._pump(on_output):
                pass
            if on_output:
                self._stream(on_output, final=True)
            return self._status(), *self.output()
        finally:
            self.channel.close()
            self.on_end(self)


class _LocalShell(_Shell):
    def __init__(self, command: str, on_end: Callable[[_Shell], None], script: bool) -> None:
        super().__init__(on_end, script)
        self.proc = subprocess.Popen(["bash", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        # stderr drains in a thread so a chatty command cannot block on a full pipe while stdout is read.
        self.err: list[bytes] = []
        self.drain = threading.Thread(target=self._drain, daemon=True)
        self.drain.start()
        self.out = bytearray()

    def _drain(self) -> None:
        assert self.proc.stderr
        # Chunks as they come (not one read to EOF): any of it shows the command answered.
        for chunk in iter(lambda: os.read(self.proc.stderr.fileno(), 65536), b""):  # type: ignore[union-attr]
            self.heard = True
            self.err.append(chunk)

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def send(self, text: str) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(self._with_start(text))
        self.proc.stdin.flush()

    def kill(self) -> None:
        # Its own process group: tmux servers it started have left it and are not touched. Only while
        # it is not reaped (returncode None): until then its pid, the group's id, cannot be reused.
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    def output(self) -> tuple[str, str]:
        return _text(bytes(self.out)), _text(b"".join(self.err))

    def _line(self, line: bytes) -> bytes:
        """A stdout line as the caller sees it: without the STARTED line."""
        self.heard = True
        if self.script and not self.up and _STARTED_LINE in line:
            self.up = True
            return line.replace(_STARTED_LINE, b"", 1)
        return line

    def read_until_hold(self) -> tuple[int, str, str]:
        assert self.proc.stdout
        for raw in iter(self.proc.stdout.readline, b""):
            line = self._line(raw)
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
        return self.proc.returncode, *self.output()

    def finish(self, stdin: str | None, on_output: Callable[[str], None] | None) -> tuple[int, str, str]:
        assert self.proc.stdin and self.proc.stdout
        self.waiting = False
        try:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write(self._with_start(stdin))
                self.proc.stdin.close()
            for raw in iter(self.proc.stdout.readline, b""):
                line = self._line(raw)
                if not line:
                    continue
                if on_output:
                    on_output(_text(line))
                self.out += line
        except BaseException:  # Ctrl-C while following: the local command must not outlive us
            self.kill()
            raise
        finally:
            self.on_end(self)
        code = self.proc.wait()
        self.drain.join()
        return code, *self.output()


@dataclass
class Held:
    """A host's shell after the first part of its script: that part's outcome, and the waiting shell."""

    outcome: Outcome
    shell: _Shell | None


def _bulk(script: bytes) -> bytes:
    """A script as the remote shell should read it: as it is if short, else one `head -c` read (BULK_MIN)."""
    if len(script) < BULK_MIN:
        return script
    body = script.rstrip(b"\n") + b"\n" + _BULK_END.encode()
    return _BULK_READ.format(size=len(body)).encode() + body


def _bytes(text: str | None) -> bytes:
    return b"" if text is None else text.encode("utf-8", "surrogateescape")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")
