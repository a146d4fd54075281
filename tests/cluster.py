"""A real multi-host cluster on one machine, for end-to-end tests.

Each fake host is its own sshd listening on its own loopback address (127.0.0.X, one shared
port) and its own tmux server (sshd's ``SetEnv TMUX_TMPDIR`` points each host's sessions at
its own directory). All hosts share this machine's filesystem, like nodes with an NFS home.
Needs root (sshd runs sessions as root), openssh-server and tmux.
Only loopback addresses are ever used.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

SSHD = "/usr/sbin/sshd"
# Longest AF_UNIX socket path Linux accepts (sun_path is 108 bytes, NUL included).
_MAX_SOCKET_PATH = 107


def _quote(value: str) -> str:
    """Quote one argument for sshd_config / ssh_config (both split lines like a shell, roughly)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def port_open(address: str, port: int) -> bool:
    """Tell whether something accepts TCP connections on address:port."""
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    """Return the last lines of a log file, or a note that it is missing."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


class Cluster:
    """A cluster of fake hosts on this machine: one sshd per loopback address, one tmux server per host."""

    def __init__(
        self,
        root: Path,
        size: int,
        *,
        port: int = 2222,
        base: int = 11,
        env: dict[str, str] | None = None,
        max_startups: str = "1000:30:1000",
        host_env: dict[str, dict[str, str]] | None = None,
        stuck: set[str] | None = None,
    ) -> None:
        """Describe the cluster; nothing is created or started before start().

        `env` is every host's environment; `host_env` adds to or overrides it for single hosts by
        name (e.g. one host with an `nvidia-smi` on its PATH and one without). The hosts named in
        `stuck` accept SSH connections but their remote shells never answer (see stuck_script).
        """
        # Addresses run 127.0.0.1-254, then 127.0.1.1-254 and so on (see address()): up to 65024 hosts.
        if size < 1 or base < 1 or base + size - 1 > 254 * 256:
            raise ValueError(f"hosts {base}..{base + size - 1} do not all fit in 127.0.0.0/16")
        self.root = Path(root).resolve()
        self.size = size
        self.port = port
        self.base = base
        self.env = dict(env or {})
        self.host_env = {name: dict(values) for name, values in (host_env or {}).items()}
        self.max_startups = max_startups
        self.names = [f"node{i}" for i in range(1, size + 1)]
        self.stuck = set(stuck or ())
        if self.stuck - set(self.names):
            raise ValueError(f"stuck hosts {sorted(self.stuck - set(self.names))} are not in {self.names}")
        # A hung NFS home or a .bashrc that blocks, as sshd's non-interactive bash sees it: BASH_ENV
        # (set by sshd's SetEnv) is read by `bash -c COMMAND` before COMMAND runs, so it never runs
        # (until unstick(): a home that recovers).
        self.stuck_script = self.root / "stuck.sh"
        self._unstuck = self.root / "unstuck"
        self.ssh_config = self.root / "ssh_config"
        self.host_key = self.root / "host_ed25519_key"
        self.client_key = self.root / "client_ed25519_key"
        self.authorized_keys = self.root / "authorized_keys"
        # tmux puts its socket at $TMUX_TMPDIR/tmux-<uid>/default; a too long path fails late
        # and obscurely ("File name too long"), so refuse it here.
        socket_path = self.tmux_dir(self.names[-1]) / f"tmux-{os.getuid()}" / "default"
        if len(str(socket_path)) > _MAX_SOCKET_PATH:
            raise ValueError(f"root too deep for a tmux socket path: {socket_path}")

    # -- paths -------------------------------------------------------------------------------

    def address(self, name: str) -> str:
        """Return the loopback address of a host ("127.0.0.11" for node1 when base=11).

        Past 127.0.0.254 the next host is 127.0.1.1 (a benchmark's 256 hosts need more than one /24);
        the .0 and .255 of each /24 are skipped, so no host looks like a network or broadcast address.
        """
        offset = self.base + self.names.index(name) - 1
        return f"127.0.{offset // 254}.{offset % 254 + 1}"

    def host_dir(self, name: str) -> Path:
        """Return the directory holding one host's sshd config, pid file, log and tmux dir."""
        return self.root / "hosts" / name

    def tmux_dir(self, name: str) -> Path:
        """Return the TMUX_TMPDIR of one host's tmux server."""
        return self.host_dir(name) / "tmux"

    def _sshd_config(self, name: str) -> Path:
        return self.host_dir(name) / "sshd_config"

    def _pid_file(self, name: str) -> Path:
        return self.host_dir(name) / "sshd.pid"

    def _log(self, name: str) -> Path:
        return self.host_dir(name) / "sshd.log"

    # -- setup -------------------------------------------------------------------------------

    def _keygen(self, key: Path) -> None:
        """Create an ed25519 key pair without passphrase unless it exists already."""
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fablaunch-test", "-f", str(key)],
                check=True,
                capture_output=True,
            )
        # ssh refuses private keys readable by others.
        key.chmod(0o600)

    def _write_files(self) -> None:
        """Generate keys, authorized_keys, one sshd config per host and the client ssh_config."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.stuck:
            self.stuck_script.write_text(f"while [ ! -e {shlex.quote(str(self._unstuck))} ]; do sleep 0.2; done\n")
        # sshd's privilege separation needs this directory; Debian creates it only via systemd.
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        self._keygen(self.host_key)
        self._keygen(self.client_key)
        self.authorized_keys.write_text(self.client_key.with_suffix(".pub").read_text())
        self.authorized_keys.chmod(0o600)
        client: list[str] = []
        for name in self.names:
            self.tmux_dir(name).mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode is masked by umask and ignored for existing dirs; tmux wants it private.
            self.tmux_dir(name).chmod(0o700)
            setenv = {"TMUX_TMPDIR": str(self.tmux_dir(name)), **self.env, **self.host_env.get(name, {})}
            if name in self.stuck:
                setenv["BASH_ENV"] = str(self.stuck_script)
            lines = [
                f"ListenAddress {self.address(name)}",
                f"Port {self.port}",
                f"HostKey {_quote(str(self.host_key))}",
                f"PidFile {_quote(str(self._pid_file(name)))}",
                # Our own key file, so /root/.ssh is never touched.
                f"AuthorizedKeysFile {_quote(str(self.authorized_keys))}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                # Test files live under tmp dirs whose modes sshd would otherwise reject.
                "StrictModes no",
                # Many parallel handshakes (64 hosts x clients) must not be dropped.
                f"MaxStartups {self.max_startups}",
                "MaxSessions 100",
                # No AcceptEnv: the remote environment is only what SetEnv gives, like a clean host.
                "Subsystem sftp internal-sftp",
                "SetEnv " + " ".join(_quote(f"{k}={v}") for k, v in setenv.items()),
            ]
            self._sshd_config(name).write_text("\n".join(lines) + "\n")
            client += [
                f"Host {name}",
                f"    HostName {self.address(name)}",
                f"    Port {self.port}",
                "    User root",
                f"    IdentityFile {_quote(str(self.client_key))}",
                "    IdentitiesOnly yes",
                "    StrictHostKeyChecking no",
                "    UserKnownHostsFile /dev/null",
                "    LogLevel ERROR",
                "    BatchMode yes",
                "",
            ]
        self.ssh_config.write_text("\n".join(client))

    def _validate(self) -> None:
        """Run `sshd -t` on every host config (in parallel) and raise with its stderr on failure."""
        procs = {
            name: subprocess.Popen(
                [SSHD, "-t", "-f", str(self._sshd_config(name))],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in self.names
        }
        for name, proc in procs.items():
            out, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"sshd -t rejected {self._sshd_config(name)}:\n{err}{out}")

    # -- processes ---------------------------------------------------------------------------

    def _launch(self, names: list[str]) -> None:
        """Start the sshd of each named host, then wait until all listen (20 s in all)."""
        for name in names:
            # A listener already there (a leftover cluster) would make the wait below lie.
            if port_open(self.address(name), self.port):
                raise RuntimeError(f"{self.address(name)}:{self.port} is already in use ({name})")
        procs = {
            name: subprocess.Popen(
                [SSHD, "-f", str(self._sshd_config(name)), "-E", str(self._log(name))],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in names
        }
        # sshd binds, then daemonizes: its foreground process exits at once.
        for name, proc in procs.items():
            out, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"sshd for {name} exited {proc.returncode}:\n{err}{out}\n{_tail(self._log(name))}")
        deadline = time.monotonic() + 20
        for name in names:
            # The pid file is written just after daemonizing; stop() needs it.
            while not (port_open(self.address(name), self.port) and self._pid(name) is not None):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"sshd for {name} not listening on {self.address(name)}:{self.port} "
                        f"after 20 s; log tail:\n{_tail(self._log(name))}"
                    )
                time.sleep(0.05)

    def _pid(self, name: str) -> int | None:
        """Return the pid of this host's running sshd listener, or None.

        The pid file is only trusted if that process was started with this host's config,
        so a stale file never makes us signal an unrelated process.
        """
        try:
            pid = int(self._pid_file(name).read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (OSError, ValueError, IndexError):
            return None
        # A zombie (PID 1 here may not reap orphans) is as good as gone.
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return None
        return pid if str(self._sshd_config(name)).encode() in cmdline else None

    def sshd_pid(self, name: str) -> int | None:
        """The pid of one host's sshd listener (every process of the host descends from it), or None."""
        return self._pid(name)

    def _kill(self, names: list[str]) -> None:
        """SIGTERM the sshd listeners of the named hosts, then wait until their ports refuse."""
        for name in names:
            pid = self._pid(name)
            if pid is not None:
                # It may have exited since _pid looked.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name in names:
            while port_open(self.address(name), self.port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.address(name)}:{self.port} still accepts after 10 s ({name})")
                time.sleep(0.05)

    # -- public ------------------------------------------------------------------------------

    def start(self) -> Cluster:
        """Generate keys and configs, start every sshd and wait until each one listens."""
        self._write_files()
        self._validate()
        self._launch(self.names)
        return self

    def stop_host(self, name: str) -> None:
        """Stop one host's sshd so new connections are refused; running sessions survive."""
        self._kill([name])

    def start_host(self, name: str) -> None:
        """Start one stopped host's sshd again and wait until it listens."""
        self._launch([name])

    def tmux(self, name: str, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run `tmux ARGS` locally against one fake host's own tmux server."""
        env = dict(os.environ, TMUX_TMPDIR=str(self.tmux_dir(name)))
        # Inside a tmux session $TMUX would point the client at that session's server instead.
        env.pop("TMUX", None)
        return subprocess.run(
            ["tmux", *args], env=env, check=check, text=True, capture_output=True, stdin=subprocess.DEVNULL
        )

    def ssh(self, name: str, command: str, *, timeout: float | None = 60) -> subprocess.CompletedProcess[str]:
        """Run one command on a fake host with the OpenSSH client and this cluster's ssh_config."""
        return subprocess.run(
            ["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", name, command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def unstick(self) -> None:
        """Let the stuck hosts' shells go on past their startup, as a hung home that recovers."""
        self._unstuck.touch()

    def stick(self) -> None:
        """Make the stuck hosts' shells block again (the default)."""
        self._unstuck.unlink(missing_ok=True)

    def stuck_pids(self, name: str | None = None) -> list[int]:
        """Live processes of remote shells stuck on a stuck host (or any), found through /proc.

        Every process such a shell starts inherits the host's TMUX_TMPDIR and the BASH_ENV that
        blocks it, so the blocking `sleep` and the shells waiting on it are all found.
        """
        wanted = f"BASH_ENV={self.stuck_script}".encode()
        dirs = [f"TMUX_TMPDIR={self.tmux_dir(n)}".encode() for n in ([name] if name else sorted(self.stuck))]
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                values = environ.read_bytes().split(b"\0")
                state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            # A zombie waits only for its reaper (PID 1 here may not reap orphans): it runs nothing.
            if state != "Z" and wanted in values and any(d in values for d in dirs):
                found.append(int(environ.parent.name))
        return found

    def stop(self) -> None:
        """Kill every sshd and tmux server of this cluster; safe to repeat or after a failed start."""
        for name in self.names:
            if self.tmux_dir(name).is_dir():
                # Ignore "no server running": nothing to kill.
                self.tmux(name, "kill-server")
        # Stuck shells a failed test left behind must not outlive the cluster.
        for pid in self.stuck_pids() if self.stuck else []:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        # Only our own listeners are signalled (see _pid); a port held by someone else raises.
        self._kill([name for name in self.names if self._pid(name) is not None])

    def __enter__(self) -> Cluster:
        """Start the cluster."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the cluster."""
        self.stop()


@contextlib.contextmanager
def silent_listener(address: str, port: int) -> Iterator[list[socket.socket]]:
    """Accept TCP connections on a loopback address:port and never send a byte (a hung sshd).

    Accepted connections stay open until the block ends, so a client waits for an SSH banner that
    never comes instead of seeing the connection close. Yields the list of accepted connections.
    """
    if not address.startswith("127."):
        raise ValueError(f"only loopback addresses are used, not {address}")
    listener = socket.create_server((address, port), reuse_port=False)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=serve, name=f"silent-{address}:{port}", daemon=True)
    thread.start()
    try:
        yield accepted
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in accepted:
            conn.close()
