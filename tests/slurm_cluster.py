"""A real Slurm cluster on one machine, for end-to-end tests of the Slurm backend.

One slurmctld and one slurmd per node, all on 127.0.0.1, each daemon on its own port, all
described by one slurm.conf in the cluster's directory (absolute paths only: the daemons chdir to
/). Authentication is the machine's munge daemon, started here if it is not running. Needs root
and Debian's slurmctld, slurmd, slurm-client and munge packages (22.05). Only loopback addresses
are ever used.

Every slurmctld and slurmd started here carries FABLAUNCH_SLURM_TEST_* variables in its
environment. They name the cluster's base port and the process that owns it, so a later run can
tell the daemons a killed test run left behind (owner gone, same ports) from a live run's: only
the former, and daemons naming this cluster's own slurm.conf, are killed. A slurmstepd (one per
job step, reparented to PID 1, environment blanked) is known by the slurmd log file it holds open.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tests.cluster import port_open

SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
MUNGED = "/usr/sbin/munged"
BINARIES = (SLURMCTLD, SLURMD, MUNGED, "/usr/bin/sinfo", "/usr/bin/srun", "/usr/bin/sbatch", "/usr/bin/scancel")
DEFAULT_PORT = 16817
# Longest AF_UNIX socket path Linux accepts (sun_path is 108 bytes, NUL included).
_MAX_SOCKET_PATH = 107
ADDRESS = "127.0.0.1"
# Environment markers of the daemons started here (see the module docstring).
_PORT_VAR = "FABLAUNCH_SLURM_TEST_PORT"
_OWNER_VAR = "FABLAUNCH_SLURM_TEST_OWNER"
_CONF_VAR = "FABLAUNCH_SLURM_TEST_CONF"
_DAEMONS = ("slurmctld", "slurmd", "slurmstepd")
# The name of every test cluster's log directory: a slurmstepd is recognised by the log it holds.
LOG_DIR_NAME = "slurm-test-log"
# Client settings of the caller that would point commands at another cluster or change their output.
_CLIENT_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCANCEL_", "SACCT_", "SCONTROL_")


def missing_binaries() -> list[str]:
    """Return the Slurm and munge programs this machine lacks (empty when a cluster can run)."""
    return [path for path in BINARIES if not os.access(path, os.X_OK)]


def _tail(path: Path, lines: int = 20) -> str:
    """Return the last lines of a log file, or a note that it is missing."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _stat(pid: int) -> list[str] | None:
    """Return the fields of /proc/PID/stat after the command name (state first), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """Tell whether a process exists and is not a zombie waiting for its reaper."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _identity(pid: int) -> str | None:
    """Return "PID:STARTTIME", which names a process even after its pid is reused, or None if gone.

    A zombie counts as gone: a killed test run stays one where PID 1 does not reap orphans.
    """
    fields = _stat(pid)
    # Field 22 of /proc/PID/stat (start time) is the 20th after the command name.
    return f"{pid}:{fields[19]}" if fields is not None and fields[0] != "Z" and len(fields) > 19 else None


def _environ(pid: int) -> dict[str, str]:
    """Return a process's initial environment (empty if it is gone or unreadable)."""
    try:
        data = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in data.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def _open_logs(pid: int) -> set[str]:
    """Return the files in a test cluster's log directory that a process holds open."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd).removesuffix(" (deleted)")
                if Path(target).parent.name == LOG_DIR_NAME:
                    found.add(target)
    return found


def _cmdline(pid: int) -> list[bytes]:
    """Return a process's argv (empty if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _processes() -> dict[int, tuple[str, int]]:
    """Return {pid: (command name, parent pid)} of every live process on this machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm, rest = (entry / "stat").read_text().split(" (", 1)[1].rsplit(")", 1)
        except (OSError, ValueError, IndexError):
            continue
        fields = rest.split()
        if fields and fields[0] != "Z":
            found[int(entry.name)] = (comm, int(fields[1]))
    return found


def _descendants(roots: set[int], processes: dict[int, tuple[str, int]]) -> set[int]:
    """Return the roots and every process below them."""
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, (_, parent) in processes.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def _kill_and_wait(pids: set[int], timeout: float) -> None:
    """SIGTERM the processes, SIGKILL those still there after `timeout`, and wait until all are gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = {pid for pid in pids if _alive(pid)}
        if not pids:
            return
    raise RuntimeError(f"processes {sorted(pids)} survived SIGKILL")


def munge_running() -> bool:
    """Tell whether munged answers: a credential made by `munge -n` is accepted by `unmunge`."""
    try:
        made = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
        if made.returncode != 0:
            return False
        checked = subprocess.run(["unmunge"], input=made.stdout, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return checked.returncode == 0


def ensure_munge() -> None:
    """Start the machine's munged unless one already answers (it is shared and left running)."""
    if munge_running():
        return
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chown", "munge:munge", str(run_dir)], check=True, capture_output=True)
    # --force: start even if a dead munged left its socket behind. As root munged drops to the
    # munge user itself (Debian's service does the same through `User=munge`).
    started = subprocess.run(
        ["runuser", "-u", "munge", "--", MUNGED, "--force"], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while not munge_running():
        if time.monotonic() > deadline:
            raise RuntimeError(f"munged did not start (rc {started.returncode}): {started.stderr}{started.stdout}")
        time.sleep(0.1)


class SlurmCluster:
    """A Slurm cluster on this machine: one slurmctld and `size` slurmd (node1..), all on 127.0.0.1."""

    def __init__(
        self,
        root: Path,
        *,
        port: int | None = None,
        size: int = 3,
        cpus: int = 2,
        name: str = "fablaunch-test",
        min_job_age: int = 300,
    ) -> None:
        """Describe the cluster; nothing is written or started before start().

        slurmctld listens on `port` (default: env FABLAUNCH_TEST_SLURM_PORT, else 16817) and node
        i's slurmd on port + i, so runs with different base ports never clash. Each node has `cpus`
        CPUs (at most this machine's count: more would send the nodes to INVAL). Ended jobs stay
        visible to squeue / `scontrol show job` for at least `min_job_age` s (slurmctld purges them
        periodically: with 2, a job was gone about 10 s after it ended).
        """
        if port is None:
            port = int(os.environ.get("FABLAUNCH_TEST_SLURM_PORT", str(DEFAULT_PORT)))
        if size < 1 or not 1024 <= port <= 65535 - size:
            raise ValueError(f"ports {port}..{port + size} are not all valid")
        self.root = Path(root).resolve()
        self.port = port
        self.cpus = max(1, min(cpus, os.cpu_count() or 1))
        self.name = name
        self.min_job_age = min_job_age
        self.nodes = [f"node{i}" for i in range(1, size + 1)]
        self.node_ports = {node: port + i for i, node in enumerate(self.nodes, 1)}
        self.conf = self.root / "slurm.conf"
        self.state_dir = self.root / "state"
        self.log_dir = self.root / LOG_DIR_NAME
        self.spool_dir = self.root / "spool"
        # What a client (sinfo, sbatch, srun, ... or fablaunch itself) needs to reach this cluster.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(_CLIENT_PREFIXES)}
        self.env["SLURM_CONF"] = str(self.conf)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        # slurmstepd listens on SPOOL/NODE/NODE_JOB.STEP; a too long path fails only when a job starts.
        node = self.nodes[-1]
        socket_path = self.spool_dir / node / f"{node}_{2**32 - 1}.{2**32 - 1}"
        if len(str(socket_path)) > _MAX_SOCKET_PATH:
            raise ValueError(f"root too deep for slurmstepd's socket path: {socket_path}")

    # -- paths -------------------------------------------------------------------------------

    def log(self, daemon: str) -> Path:
        """Return the log file of "slurmctld" or of one node's slurmd (by node name)."""
        return self.log_dir / ("slurmctld.log" if daemon == "slurmctld" else f"slurmd-{daemon}.log")

    def _pid_file(self, daemon: str) -> Path:
        return self.root / ("slurmctld.pid" if daemon == "slurmctld" else f"slurmd-{daemon}.pid")

    # -- setup -------------------------------------------------------------------------------

    def _write_files(self) -> None:
        """Create the directories and write slurm.conf."""
        for directory in (self.root, self.state_dir, self.log_dir, self.spool_dir):
            directory.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.spool_dir / node).mkdir(exist_ok=True)
        lines = [
            "# Written by tests/slurm_cluster.py for fablaunch's tests; one machine, loopback only.",
            f"ClusterName={self.name}",
            f"SlurmctldHost=localhost({ADDRESS})",
            f"SlurmctldPort={self.port}",
            f"SlurmctldPidFile={self._pid_file('slurmctld')}",
            f"SlurmctldLogFile={self.log('slurmctld')}",
            f"StateSaveLocation={self.state_dir}",
            # Every node below names its own port; this is only the default.
            f"SlurmdPort={self.port + 1}",
            f"SlurmdSpoolDir={self.spool_dir}/%n",
            f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
            # Accept the CPU counts below even where they differ from the hardware.
            "SlurmdParameters=config_overrides",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # A node that was down (a daemon restarted) is usable again as soon as it registers.
            "ReturnToService=2",
            # Ended jobs stay visible in `scontrol show job` / squeue this long (default 5 minutes).
            f"MinJobAge={self.min_job_age}",
            # SIGTERM -> SIGKILL after 5 s when a job is cancelled or times out.
            "KillWait=5",
            # Time limits are enforced exactly; srun's that stop answering are not reaped by age.
            "OverTimeLimit=0",
            "InactiveLimit=0",
            "MessageTimeout=10",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "SchedulerType=sched/backfill",
        ]
        for node in self.nodes:
            lines.append(
                f"NodeName={node} NodeHostname=localhost NodeAddr={ADDRESS} Port={self.node_ports[node]} "
                f"CPUs={self.cpus} RealMemory=1024 State=UNKNOWN"
            )
        nodelist = f"node[1-{len(self.nodes)}]" if len(self.nodes) > 1 else self.nodes[0]
        lines.append(f"PartitionName=debug Nodes={nodelist} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE")
        self.conf.write_text("\n".join(lines) + "\n")

    # -- processes ---------------------------------------------------------------------------

    def _ours(self) -> dict[int, tuple[str, int]]:
        """Return the live slurmctld/slurmd/slurmstepd processes of this cluster or of a dead run on its ports.

        A slurmctld or slurmd is taken when its command line names this cluster's slurm.conf, or
        when its environment marks it as started by a SlurmCluster on this base port whose owner is
        gone (a killed test run). Daemons of a live run on the same ports are left alone (start()
        then fails on the busy port); so is every daemon without the marker. A slurmstepd blanks
        its environment and command line, so it is known by the slurmd log it keeps open: one in
        this cluster's log directory, or a test cluster's log no other slurmd holds any more.
        """
        found = {}
        processes = _processes()
        me = _identity(os.getpid())
        steps: dict[int, set[str]] = {}
        held: set[str] = set()
        for pid, (comm, parent) in processes.items():
            if comm == "slurmstepd":
                steps[pid] = _open_logs(pid)
                continue
            if comm not in _DAEMONS:
                continue
            cmdline = _cmdline(pid)
            env = _environ(pid)
            if str(self.conf).encode() in cmdline or env.get(_CONF_VAR) == str(self.conf):
                found[pid] = (comm, parent)
            elif env.get(_PORT_VAR) == str(self.port):
                owner = env.get(_OWNER_VAR, "")
                owner_pid = owner.split(":")[0]
                if owner != me and (not owner_pid.isdigit() or _identity(int(owner_pid)) != owner):
                    found[pid] = (comm, parent)
            if pid not in found:
                held |= _open_logs(pid)
        for pid, logs in steps.items():
            if any(Path(log).parent == self.log_dir for log in logs) or (logs and not logs & held):
                found[pid] = processes[pid]
        return found

    def _kill_daemons(self) -> None:
        """Kill this cluster's daemons (and leftovers, see _ours) and the job processes under their steps."""
        ours = self._ours()
        if not ours:
            return
        processes = _processes()
        steps = {pid for pid, (comm, _) in ours.items() if comm == "slurmstepd"}
        # Tasks of a step are children of its slurmstepd; with linuxproc nothing else would reap them.
        tasks = _descendants(steps, processes) - set(ours)
        daemons = {pid for pid, (comm, _) in ours.items() if comm != "slurmstepd"}
        _kill_and_wait(daemons, 15)
        _kill_and_wait(steps | tasks, 5)
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self._procs.clear()

    def _spawn(self, daemon: str, args: list[str]) -> None:
        """Start one daemon in the foreground (-D) as our child, with the marker environment."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_CLIENT_PREFIXES)}
        env.update(
            {
                _PORT_VAR: str(self.port),
                _OWNER_VAR: _identity(os.getpid()) or str(os.getpid()),
                _CONF_VAR: str(self.conf),
                "SLURM_CONF": str(self.conf),
            }
        )
        with self.log(daemon).with_suffix(".out").open("ab") as out:
            self._procs[daemon] = subprocess.Popen(
                args,
                env=env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Ctrl-C on pytest must not reach the daemons before stop() has cancelled the jobs.
                start_new_session=True,
            )

    def _check_started(self) -> None:
        """Raise with the log tail of a daemon that has already exited."""
        for daemon, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{daemon} exited with {proc.returncode}; log tail:\n{_tail(self.log(daemon))}\n"
                    f"{_tail(self.log(daemon).with_suffix('.out'))}"
                )

    def run(self, *args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (sinfo, squeue, sbatch, ...) against this cluster."""
        return subprocess.run(
            list(args),
            env=self.env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=check,
        )

    def node_states(self) -> dict[str, str]:
        """Return {node: state} as sinfo reports it ("idle", "alloc", "down*", ...); empty if unreachable."""
        try:
            out = self.run("sinfo", "-h", "-N", "-o", "%N|%T", timeout=15)
        except subprocess.TimeoutExpired:
            return {}
        if out.returncode != 0:
            return {}
        return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)

    def job_ids(self) -> list[str]:
        """Return the ids of every job slurmctld still knows (pending, running or recently ended)."""
        out = self.run("squeue", "-h", "-a", "-t", "all", "-o", "%i", timeout=15)
        return out.stdout.split() if out.returncode == 0 else []

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until sinfo shows every node idle (raise with the daemon logs after `timeout` s)."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_started()
            states = self.node_states()
            if sorted(states) == sorted(self.nodes) and set(states.values()) == {"idle"}:
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {d}:\n{_tail(self.log(d), 10)}" for d in ["slurmctld", *self.nodes])
        raise RuntimeError(f"nodes not idle after {timeout} s: {states or 'sinfo failed'}\n{logs}")

    # -- public ------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> SlurmCluster:
        """Write slurm.conf, start munge (if needed), slurmctld and every slurmd; wait until all nodes are idle."""
        missing = missing_binaries()
        if missing:
            raise RuntimeError(f"Slurm is not installed (missing {', '.join(missing)}); run .ci/run")
        self._write_files()
        ensure_munge()
        # Leftovers: our own daemons from an earlier start in this directory, or a killed run's.
        self._kill_daemons()
        for daemon in ["slurmctld", *self.nodes]:
            self._pid_file(daemon).unlink(missing_ok=True)
        busy = [p for p in [self.port, *self.node_ports.values()] if port_open(ADDRESS, p)]
        if busy:
            raise RuntimeError(
                f"ports {busy} on {ADDRESS} are in use (another test run's Slurm cluster?); "
                "set FABLAUNCH_TEST_SLURM_PORT to another base port"
            )
        try:
            # -c: forget any jobs and node states saved in state_dir by an earlier run.
            self._spawn("slurmctld", [SLURMCTLD, "-D", "-c", "-f", str(self.conf)])
            deadline = time.monotonic() + timeout
            while not port_open(ADDRESS, self.port):
                self._check_started()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"slurmctld not listening after {timeout} s:\n{_tail(self.log('slurmctld'))}")
                time.sleep(0.05)
            for node in self.nodes:
                self._spawn(node, [SLURMD, "-D", "-f", str(self.conf), "-N", node])
            self.wait_idle(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel every job, then kill the daemons started here (and nothing else); safe to repeat."""
        conf = str(self.conf).encode()
        controller = [pid for pid, (comm, _) in self._ours().items() if comm == "slurmctld" and conf in _cmdline(pid)]
        # Only our own slurmctld is asked to cancel jobs (never another run's on the same port).
        if controller and port_open(ADDRESS, self.port):
            ids = self.job_ids()
            if ids:
                self.run("scancel", *ids, timeout=30)
                # Give running jobs their SIGTERM and KillWait (5 s) before the daemons go.
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    out = self.run("squeue", "-h", "-t", "PD,R,CG,S,CF", "-o", "%i", timeout=15)
                    if out.returncode != 0 or not out.stdout.split():
                        break
                    time.sleep(0.2)
        self._kill_daemons()

    def __enter__(self) -> SlurmCluster:
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
