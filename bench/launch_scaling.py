"""Launch, status and stop at 1 to 256 hosts: fablaunch against pdsh, clush, parallel OpenSSH and the one-liner.

Brings up K fake hosts on this machine with the test suite's own cluster code (one sshd per loopback
address, one tmux server each) and, for each K, times several repetitions of:

- fablaunch: `launch-gpus` (K hosts x R ranks, a payload that sleeps), `status`, `stop` (until it has
  verified that nothing is left), and `launch-torchrun` (one session per host; its "python" is a
  stand-in that sleeps, so 256 torchrun agents do not swamp a 2-core machine with torch imports);
- three peers doing the same remote work, R tmux sessions per host created in one tmux call over one
  ssh per host, all hosts at once: parallel OpenSSH (`xargs -P K ssh`), `pdsh -R ssh -f K` and
  `clush -f K` (pdsh and clush: `apt-get install -y pdsh clustershell`); every session they start is
  counted afterwards, so a peer that drops a host fails the run instead of looking fast;
- the guide's per-GPU one-liner (`cat -n gpus | xargs -n2 bash -c 'ssh $1 tmux new-session ...'`), serial;
  beyond `--oneliner-max` hosts it is extrapolated from its time per rank at the largest K measured;
- a status baseline: one parallel `tmux ls` per host.

Beside wall time it records the launcher's CPU (user + system of the launching process and every child
it waited for, from wait4: for the peers that is every ssh client) and fablaunch's peak memory (the
largest RSS of that process tree). The tools run in a rotating order, so none always runs first or
last in a repetition. Prints tables of medians (and spreads) and the issue's targets met or not, and
writes bench/results/launch_scaling.{json,png}. Run from the repo root:
    python3 bench/launch_scaling.py                          # K = 1, 8, 32, 64, 128, 256; 3 repetitions
    python3 bench/launch_scaling.py --sizes 1,8 --reps 2     # a short run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster import Cluster  # noqa: E402  (the bench reuses the test suite's cluster, no copy)

FAB = shutil.which("fab") or "fab"
# Debian's clustershell package; else whatever `clush` is on the PATH (pip's ClusterShell has one too).
CLUSH = "/usr/bin/clush" if Path("/usr/bin/clush").exists() else (shutil.which("clush") or "clush")
PDSH = shutil.which("pdsh") or "pdsh"
TAG = "FABLAUNCH_TAG="
# The launch tools compared, as (result key, label); the first two are fablaunch.
LAUNCHERS = [("launch_gpus", "fab launch-gpus"), ("launch_torchrun", "fab launch-torchrun"),
             ("parallel_ssh", "parallel OpenSSH"), ("pdsh", "pdsh -R ssh"), ("clush", "clush")]
PEERS = ["parallel_ssh", "pdsh", "clush"]


def tagged(prefix: str) -> list[int]:
    """Live processes of jobs whose names start with prefix, read from /proc (not from the tool)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{TAG}{prefix}".encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


@dataclass
class Run:
    """One measured command: wall seconds, launcher CPU seconds (its process tree), largest RSS."""

    wall: float
    cpu: float
    rss_mb: float
    code: int
    out: str
    err: str
    remote: float | None = None  # CPU seconds of everything on the fake hosts meanwhile (see HostsCPU)


def measure(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> Run:
    """Run a command and take its rusage from wait4, which covers every descendant it waited for.

    Output goes to files rather than pipes so that the process is reaped here, by wait4 (Popen's own
    wait would reap it and lose the rusage), with no reader thread competing for the CPU meanwhile.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        err.seek(0)
        return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, proc.returncode,
                   out.read().decode(errors="replace"), err.read().decode(errors="replace"))


class HostsCPU:
    """CPU time of every process of the fake hosts, read from a cgroup v2 that holds their sshd listeners.

    Whatever sshd starts (handshakes, remote shells and their .bashrc, tmux servers, every session)
    inherits the group, so its cpu.stat is the hosts' side of a launch, apart from the launcher's side
    and from anything else the machine runs. Accounting only: no controller, no limit. None where no
    cgroup2 hierarchy can be written (not root, no cgroup2 mount): the bench then goes without.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def around(cls, pids: list[int]) -> HostsCPU | None:
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[2] == "cgroup2"]
        for mount in mounts:
            path = Path(mount) / f"fablaunch-bench-{os.getpid()}"
            try:
                path.mkdir()
                for pid in pids:
                    (path / "cgroup.procs").write_text(str(pid))
                return cls(path)
            except OSError:
                with contextlib.suppress(OSError):
                    path.rmdir()
        return None

    def seconds(self) -> float:
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return int(stat["usage_usec"]) / 1e6

    def close(self) -> None:
        """Remove the group once the cluster has stopped (a group with live processes stays: harmless)."""
        with contextlib.suppress(OSError):
            self.path.rmdir()


class Bench:
    """One cluster of the largest K hosts; each size uses its first K."""

    def __init__(self, cluster: Cluster, work: Path, ranks: int, fab_parallel: int = -1,
                 hosts_cpu: HostsCPU | None = None) -> None:
        self.cluster = cluster
        self.hosts_cpu = hosts_cpu
        self.fab_parallel = fab_parallel
        self.work = work
        self.ranks = ranks
        self.port = 29300
        self.fake_python = work / "fake-python"
        # Preflight probes (`-c ...`) go to a real python; torchrun's own start just sleeps.
        self.fake_python.write_text('#!/bin/sh\n[ "$1" = -c ] && exec python3 "$@"\nexec sleep 600\n')
        self.fake_python.chmod(0o755)
        (work / "t.py").write_text("")  # preflight checks that the entry point exists
        self.cfg = str(cluster.ssh_config)
        # fab runs with Python's bytecode cache, as after any install: a sandbox's PYTHONDONTWRITEBYTECODE
        # would make every run compile fablaunch afresh (start-up time, not launching).
        # And `status` is a first status, over fresh connections: bench/status_keeper.py measures the keeper.
        self.fab_env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
                        "FABLAUNCH_KEEPER": "0"}

    def timed(self, cmd: list[str], env: dict[str, str] | None = None) -> Run:
        """measure() a command, and what the fake hosts spent meanwhile and in the second after it.

        The second lets the sessions it started get going (their start-up is part of a launch's cost);
        sleeping sessions and idle sshds spend nothing, so the wait adds no noise to the count.
        """
        before = self.hosts_cpu.seconds() if self.hosts_cpu else 0.0
        run = measure(cmd, self.work, env)
        if self.hosts_cpu:
            time.sleep(1)
            run.remote = self.hosts_cpu.seconds() - before
        return run

    def fab_run(self, *args: str) -> Run:
        """Time `fab` in the work dir against the cluster, whatever it exits with (see fab_env)."""
        return self.timed([FAB, "-r", str(REPO), "-S", self.cfg, *args], self.fab_env)

    def fab(self, *args: str) -> Run:
        """fab_run, raising unless it exits 0."""
        run = self.fab_run(*args)
        if run.code != 0:
            raise RuntimeError(f"{' '.join(args[:3])} failed ({run.code}):\n{run.out}\n{run.err}")
        return run

    def shell(self, script: str, env: dict[str, str] | None = None) -> Run:
        return self.check(self.timed(["bash", "-c", script], env), script)

    def check(self, run: Run, what: str) -> Run:
        if run.code != 0:
            raise RuntimeError(f"baseline failed ({run.code}):\n{what[:500]}\n{run.out[-2000:]}{run.err[-2000:]}")
        return run

    def files(self, k: int) -> list[str]:
        hosts = self.cluster.names[:k]
        (self.work / "gpus").write_text("".join(f"{h}\n" for h in hosts for _ in range(self.ranks)))
        (self.work / "hosts").write_text("".join(f"{h}\n" for h in hosts))
        return hosts

    def clean_tmux(self, hosts: list[str]) -> None:
        """Remove the baselines' untagged sessions: their sleeps die with their tmux server."""
        for h in hosts:
            self.cluster.tmux(h, "kill-server")

    def short(self, hosts: list[str]) -> list[str]:
        """The hosts without their R sessions: a peer that dropped a host must not look fast."""
        return [h for h in hosts if len(self.cluster.tmux(h, "ls").stdout.splitlines()) != self.ranks]

    def peer_tmux(self) -> list[str]:
        """The peers' remote command as words: one tmux call creating the host's R sessions."""
        words = ["tmux"]
        for r in range(self.ranks):
            words += [*(["\\;"] if r else []), "new-session", "-d", "-s", f"rank-{r}", "-c", str(self.work),
                      "-e", f"LOCAL_RANK={r}", "sleep", "600"]
        return words

    def parallel_ssh(self, hosts: list[str]) -> Run:
        """One OpenSSH client per host at once (`xargs -P`), each running the peers' tmux call."""
        # xargs reads quotes itself: the `\;` is single-quoted so that ssh passes it on to the remote shell.
        line = " ".join("'\\;'" if w == "\\;" else w for w in self.peer_tmux())
        (self.work / "parallel.txt").write_text("".join(f"{h} {line}\n" for h in hosts))
        return self.timed(["bash", "-c", f"xargs -P {len(hosts)} -L1 ssh -F {shlex.quote(self.cfg)} < parallel.txt"])

    def pdsh(self, hosts: list[str]) -> Run:
        """pdsh over OpenSSH (`-R ssh`), fanout K, our ssh_config appended to its ssh arguments."""
        env = {**os.environ, "PDSH_SSH_ARGS_APPEND": f"-F {self.cfg}"}
        cmd = [PDSH, "-S", "-R", "ssh", "-f", str(len(hosts)), "-w", ",".join(hosts), " ".join(self.peer_tmux())]
        return self.timed(cmd, env)

    def clush(self, hosts: list[str]) -> Run:
        """ClusterShell's clush, fanout K, our ssh_config passed as its ssh options; -S: fail if a host did."""
        cmd = [CLUSH, "-S", "-n", "-f", str(len(hosts)), "-o", f"-F {self.cfg}", "-w", ",".join(hosts),
               " ".join(self.peer_tmux())]
        return self.timed(cmd)

    def oneliner(self) -> Run:
        """The guide's per-GPU command, verbatim but for `ssh -F` and the sleeping payload."""
        cfg = shlex.quote(self.cfg)
        return self.shell(
            "cat -n gpus | xargs -n2 bash -c 'ssh -F " + cfg + " $1 tmux new-session -d -s rank-$(($0 - 1)) "
            "-c $(pwd) -e TORCHELASTIC_ERROR_FILE=../error.json -e OMP_NUM_THREADS=1 "
            "-e MASTER_ADDR=$(head -n 1 gpus) -e MASTER_PORT=5001 -e WORLD_SIZE=$(wc -l < gpus) "
            "-e RANK=$(($0 - 1)) sleep 600'")

    def on_each(self, hosts: list[str], command: str, fanout: int) -> list[str]:
        """A command line running `command` over one OpenSSH client per host, `fanout` at once."""
        each = f"xargs -P {fanout} -I{{}} ssh -F {shlex.quote(self.cfg)} {{}} {command}"
        return ["bash", "-c", f"printf '%s\\n' {' '.join(hosts)} | {each}"]

    def status_baseline(self, hosts: list[str]) -> Run:
        return self.timed(self.on_each(hosts, "tmux ls", len(hosts)))

    # -- one repetition ------------------------------------------------------------------------

    def fanout(self, k: int) -> list[str]:
        """fab's `--parallel` per --fab-parallel: its own default (none given), the peers' fanout K, or N.

        The default is fab's own pool of 32: each host's deadline counts from its turn, so a launch at
        256 hosts stays within its deadlines on a machine where 256 remote shells at once would not.
        """
        n = k if self.fab_parallel == 0 else self.fab_parallel
        return [] if n < 0 else ["--parallel", str(n)]

    def launch(self, key: str, job: str, k: int, t: dict[str, float], *args: str) -> bool:
        """Time a fab launch; a failed one (a deadline passed on a swamped machine) is counted, not timed."""
        self.port += 1
        task = "launch-gpus" if key == "launch_gpus" else "launch-torchrun"
        run = self.fab_run(task, "--job", job, "--port", str(self.port), *self.fanout(k), *args)
        if run.code == 0:
            keep(t, key, run, k)
            return True
        t[f"{key}_failures"] = t.get(f"{key}_failures", 0) + 1
        print(f"{task} at {k} hosts failed ({run.code}): {run.err.strip()[-500:]}", file=sys.stderr, flush=True)
        return False

    def fab_gpus(self, hosts: list[str], k: int, rep: int, t: dict[str, float]) -> None:
        job = f"bench{k}r{rep}"
        if self.launch("launch_gpus", job, k, t, "--", "sleep", "600"):
            status = self.fab_run("status", "--job", job, "--json", *self.fanout(k))
            if status.code == 0:
                keep(t, "status", status, k)
            else:  # a host past status's deadline: counted, like a failed stop
                t["status_failures"] = t.get("status_failures", 0) + 1
                print(f"status at {k} hosts failed ({status.code}): {status.err.strip()[-300:]}", file=sys.stderr,
                      flush=True)
            if (baseline := self.status_baseline(hosts)).code == 0:
                keep(t, "status_baseline", baseline, k)
            else:
                t["status_baseline_failures"] = t.get("status_baseline_failures", 0) + 1
            keep(t, "stop", self.stop(job, hosts, k, t), k)
        else:
            self.stop(job, hosts, k, t)

    def fab_torchrun(self, hosts: list[str], k: int, rep: int, t: dict[str, float]) -> None:
        job = f"benchtr{k}r{rep}"
        self.launch("launch_torchrun", job, k, t, "--python", str(self.fake_python), "--nproc-per-node",
                    str(self.ranks), "--", "t.py")
        self.stop(job, hosts, k, t)

    def stop(self, job: str, hosts: list[str], k: int, t: dict[str, float]) -> Run:
        """`fab stop` the job and check /proc that nothing of it is left.

        A stop that fails (a host past its deadline on a swamped machine) is counted in the results, not
        fatal to an hour-long run: the job is then cleared by force so the next measurement starts clean.
        """
        run = self.fab_run("stop", "--job", job, "--grace", "0", *self.fanout(k))
        left = tagged(f"{job}@")
        if run.code != 0 or left:
            t["stop_failures"] = t.get("stop_failures", 0) + 1
            print(f"stop of {job} failed ({run.code}, {len(left)} processes left): {run.err.strip()[-300:]}",
                  file=sys.stderr, flush=True)
            for pid in tagged(f"{job}@"):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self.clean_tmux(hosts)
        return run

    def peer(self, name: str) -> Callable[[list[str], int, int, dict[str, float]], None]:
        tool: Callable[[list[str]], Run] = getattr(self, name)

        def run(hosts: list[str], k: int, rep: int, t: dict[str, float]) -> None:
            """Time the peer; a failed run (a host it could not reach in time) is counted, not timed."""
            result = tool(hosts)
            short = self.short(hosts)
            if result.code == 0 and not short:
                keep(t, name, result, k)
            else:
                t[f"{name}_failures"] = t.get(f"{name}_failures", 0) + 1
                print(f"{name} at {k} hosts failed ({result.code}; {len(short)} hosts without their sessions): "
                      f"{result.err.strip()[-500:]}", file=sys.stderr, flush=True)
            self.clean_tmux(hosts)

        return run

    def rep(self, k: int, rep: int, with_oneliner: bool, settle: float) -> dict[str, float]:
        """Every tool once at K hosts, in an order rotated by the repetition's index."""
        hosts = self.files(k)
        units = [self.fab_gpus, self.fab_torchrun, *(self.peer(name) for name in PEERS)]
        units = units[rep % len(units):] + units[:rep % len(units)]
        t: dict[str, float] = {}
        for unit in units:
            time.sleep(settle)  # let the last tool's teardown (sshd children, killed tmux servers) finish
            unit(hosts, k, rep, t)
        if with_oneliner:
            time.sleep(settle)
            keep(t, "oneliner", self.oneliner(), k)
            self.clean_tmux(hosts)
        return t


def keep(t: dict[str, float], key: str, run: Run, k: int) -> None:
    """Record a run's wall seconds, launcher CPU and the hosts' CPU in ms per host, and peak RSS in MB."""
    t[key] = run.wall
    t[f"{key}_cpu_ms_per_host"] = run.cpu * 1000 / k
    t[f"{key}_peak_mb"] = run.rss_mb
    if run.remote is not None:
        t[f"{key}_hosts_cpu_ms_per_host"] = run.remote * 1000 / k


def startup(reps: int = 5) -> dict[str, float]:
    """Median wall time of `fab -l` and `fab --help launch-gpus` (no host is contacted)."""
    out = {}
    for name, args in (("fab_list", ["-l"]), ("fab_help", ["--help", "launch-gpus"])):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            subprocess.run([FAB, "-r", str(REPO), *args], capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and count of one measure's samples (bench/status_keeper.py uses it too)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = sorted({key for s in samples for key in s})
    return {key: spread(v) for key in keys if (v := [s[key] for s in samples if key in s])}


def machine() -> str:
    """This machine, as the results name it."""
    return f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}"


def fastest_peer(m: dict[str, float]) -> tuple[str, float]:
    """The peer with the lowest median, among those that have one (a peer may fail every repetition)."""
    timed = [p for p in PEERS if p in m]
    if not timed:
        return "none", float("nan")
    name = min(timed, key=lambda p: m[p])
    return name, m[name]


def medians(r: dict[str, Any]) -> dict[str, float]:
    return {key: v["median"] for key, v in r["stats"].items()}


def failures(r: dict[str, Any], key: str) -> int:
    return int(sum(s.get(f"{key}_failures", 0) for s in r["samples"]))


def ratio(m: dict[str, float], key: str, to: float) -> str:
    return f"{m[key] / to:.2f}" if key in m else "-"


def tables(results: dict[int, dict[str, Any]], ranks: int) -> str:
    """The README tables: launch times of every tool, launcher CPU and memory, status and stop."""
    def spread(r: dict[str, Any], key: str) -> str:
        failed = failures(r, key)
        if key not in r["stats"]:
            return f"failed {failed}x"
        s = r["stats"][key]
        return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})" + (f", failed {failed}x" if failed else "")

    def cell(m: dict[str, float], key: str, fmt: str) -> str:
        return format(m[key], fmt) if key in m else "-"

    head = ("| hosts x ranks | launch-gpus | launch-torchrun | parallel OpenSSH | pdsh | clush | one-liner "
            "| gpus / fastest peer | torchrun / fastest peer |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for k, r in sorted(results.items()):
        m = medians(r)
        one = m.get("oneliner", r.get("oneliner_extrapolated"))
        one_txt = f"{one:.1f}{'*' if 'oneliner' not in m else ''}" if one else "-"
        peer, best = fastest_peer(m)
        out.append(f"| {k} x {ranks} | " + " | ".join(spread(r, key) for key, _ in LAUNCHERS) + f" | {one_txt} | "
                   f"{ratio(m, 'launch_gpus', best)} ({peer}) | {ratio(m, 'launch_torchrun', best)} |")
    names = " | ".join(label.replace("fab ", "") for _, label in LAUNCHERS)
    head = (f"| hosts | launcher CPU, ms/host: {names} | hosts' CPU, ms/host: {names} "
            "| peak MB: launch-gpus | launch-torchrun |")
    out += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for k, r in sorted(results.items()):
        m = medians(r)
        out.append(f"| {k} | " + " | ".join(cell(m, f"{key}_cpu_ms_per_host", ".1f") for key, _ in LAUNCHERS)
                   + " | " + " | ".join(cell(m, f"{key}_hosts_cpu_ms_per_host", ".0f") for key, _ in LAUNCHERS)
                   + f" | {cell(m, 'launch_gpus_peak_mb', '.0f')} | {cell(m, 'launch_torchrun_peak_mb', '.0f')} |")
    head = "| hosts x ranks | status | tmux ls baseline | stop | status / baseline | stop / launch | failed stops |"
    out += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for k, r in sorted(results.items()):
        m = medians(r)
        stop_ratio = ratio(m, "stop", m["launch_gpus"]) if "launch_gpus" in m else "-"
        out.append(f"| {k} x {ranks} | {spread(r, 'status')} | {spread(r, 'status_baseline')} | {spread(r, 'stop')} | "
                   f"{ratio(m, 'status', m['status_baseline']) if 'status_baseline' in m else '-'} | {stop_ratio} | "
                   f"{failures(r, 'stop')} of {2 * len(r['samples'])} |")
    return "\n".join(out)


def targets(results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 12's targets, each with the measured value and whether it was met (at the sizes run).

    A launch that failed in any repetition misses its targets at that size, whatever the others took.
    """
    found = []
    for k, limit in ((64, 0.9), (128, 1.0), (256, 1.0)):
        if k not in results:
            continue
        m = medians(results[k])
        peer, best = fastest_peer(m)
        for key in ("launch_gpus", "launch_torchrun"):
            value = round(m[key] / best, 3) if key in m else None
            ok = value is not None and value <= limit and not failures(results[k], key)
            found.append({"target": f"{key} <= {limit}x the fastest peer at {k} hosts", "value": value,
                          "against": peer, "met": ok})
    if 256 in results:
        m = medians(results[256])
        for key in ("launch_gpus", "launch_torchrun"):
            cpu = m.get(f"{key}_cpu_ms_per_host")
            found.append({"target": f"{key} launcher CPU <= 20 ms per host at 256 hosts",
                          "value": None if cpu is None else round(cpu, 1), "met": cpu is not None and cpu <= 20})
            mb = m.get(f"{key}_peak_mb")
            found.append({"target": f"{key} launcher peak memory < 300 MB at 256 hosts",
                          "value": None if mb is None else round(mb), "met": mb is not None and mb < 300})
    return found


def points(results: dict[int, dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(sizes, medians) of one key, leaving out sizes where it has none (every repetition failed)."""
    ks = [k for k in sorted(results) if key in results[k]["stats"]]
    return ks, [results[k]["stats"][key]["median"] for k in ks]


def plot(results: dict[int, dict[str, Any]], path: Path, ranks: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    ks = sorted(results)
    fig, (wall, cpu) = plt.subplots(1, 2, figsize=(11, 4.5))
    for key, label in LAUNCHERS:
        style = {"linewidth": 2.2} if key.startswith("launch") else {"linestyle": "-."}
        wall.plot(*points(results, key), marker="o", label=label, **style)
        cpu.plot(*points(results, f"{key}_cpu_ms_per_host"), marker="o", label=label, **style)
    for key, label in (("status", "fab status"), ("stop", "fab stop")):
        wall.plot(*points(results, key), marker=".", linestyle=":", label=label)
    one = [(k, results[k]["stats"]["oneliner"]["median"] if "oneliner" in results[k]["stats"]
            else results[k].get("oneliner_extrapolated")) for k in ks]
    one = [(k, v) for k, v in one if v]
    wall.plot([k for k, _ in one], [v for _, v in one], marker="x", linestyle="--", color="grey",
              label="guide one-liner (serial)")
    wall.set_ylabel("wall seconds (median)")
    wall.set_title(f"launch of K hosts x {ranks} sessions")
    cpu.set_ylabel("launcher CPU, ms per host (user+sys, median)")
    cpu.set_title("what the launching machine spends")
    cpu.axhline(20, color="red", linewidth=0.8, linestyle=":", label="target at 256: 20 ms")
    for ax in (wall, cpu):
        ax.set_xlabel("hosts")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        # Plain numbers (0.5, 2, 20), not 2x10^0: on a log axis label the 1-2-5 steps.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("fablaunch vs pdsh, clush, parallel OpenSSH: fake hosts on one 2-core machine", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def private_homes(root: Path, names: list[str]) -> dict[str, dict[str, str]]:
    """A home of its own for each fake host (as `host_env`, sshd's SetEnv HOME), like separate machines.

    The fake hosts otherwise share this machine's home, like nodes with an NFS home, and with it
    whatever the user's .bashrc locks there: pyenv's `init` runs `pyenv rehash`, which takes a lock in
    ~/.pyenv/shims and polls for it every 0.1 s, so 64 remote shells starting at once queue behind each
    other (measured: every tool's remote shell start-up became a queue, and fablaunch, which checks
    every host before it starts any, waited for the last in line). Each home links every entry of the
    real one except ~/.pyenv, whose shims are copied (pyenv writes there) and the rest linked; so each
    host runs the same .bashrc with the same work, only no lock is shared.
    """
    real = Path.home()
    homes: dict[str, dict[str, str]] = {}
    for name in names:
        home = root / name
        home.mkdir(parents=True)
        for entry in real.iterdir():
            if entry.name == ".pyenv":
                (home / ".pyenv").mkdir()
                for part in entry.iterdir():
                    if part.name == "shims":
                        shutil.copytree(part, home / ".pyenv" / "shims", symlinks=True)
                    else:
                        (home / ".pyenv" / part.name).symlink_to(part)
            elif entry.name != ".fablaunch":  # fablaunch's own files stay per host, as on real hosts
                (home / entry.name).symlink_to(entry)
        homes[name] = {"HOME": str(home)}
    return homes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,8,32,64,128,256", help="host counts K (default 1,8,32,64,128,256)")
    ap.add_argument("--ranks", type=int, default=8, help="ranks per host (default 8)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per K (default 3)")
    ap.add_argument("--oneliner-max", type=int, default=8, help="largest K to run the serial one-liner at")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds of quiet before each tool runs (default 1)")
    ap.add_argument("--fab-parallel", type=int, default=-1,
                    help="fab's --parallel: -1 (default) fab's own (32 hosts at once), 0 the peers' fanout K, else N")
    ap.add_argument("--homes", choices=("private", "shared"), default="private",
                    help="private (default): a home per fake host, like separate machines; shared: this machine's "
                         "home for all, like an NFS home (see private_homes)")
    ap.add_argument("--port", type=int, default=2622, help="sshd port of the fake hosts (default 2622)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where the JSON and PNG go")
    args = ap.parse_args()
    sizes = sorted({int(k) for k in args.sizes.split(",")})
    missing = [tool for tool in (PDSH, CLUSH) if not shutil.which(tool)]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: apt-get install -y pdsh clustershell")
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()  # other work on the machine skews every number: say how busy it was
    root = Path(tempfile.mkdtemp(prefix="fl-bench-", dir="/tmp"))
    results: dict[int, dict[str, Any]] = {}
    hosts_cpu: HostsCPU | None = None
    try:
        cluster = Cluster(root / "c", max(sizes), port=args.port, base=101, env={"PATH": os.environ["PATH"]})
        if args.homes == "private":  # read when the hosts start, below
            cluster.host_env.update(private_homes(root / "homes", cluster.names))
        with cluster:
            work = root / "w"
            work.mkdir()
            listeners = [pid for name in cluster.names if (pid := cluster.sshd_pid(name)) is not None]
            hosts_cpu = HostsCPU.around(listeners)
            bench = Bench(cluster, work, args.ranks, args.fab_parallel, hosts_cpu)
            bench.files(max(sizes))
            # Warm Python's caches (bytecode, imports) outside the measurements, touching no host: a plain
            # `status` would read every job of every test ever run here (the fake hosts share one home).
            bench.fab("launch-gpus", "--dry-run", "--job", "warm", "--", "sleep", "1")
            # And every host's first shell (a fresh home's first `pyenv rehash` makes its shims), so that
            # no tool pays it for being the first to reach a host.
            bench.check(bench.timed(bench.on_each(cluster.names, "true", 32)), "the hosts' first shells")
            for k in sizes:
                samples = [bench.rep(k, i, k <= args.oneliner_max, args.settle) for i in range(args.reps)]
                results[k] = {"stats": summarise(samples), "samples": samples}
                print(f"K={k}: " + ", ".join(f"{key} {v['median']:.2f}" for key, v in results[k]["stats"].items()
                                             if not key.endswith("_mb")), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if hosts_cpu:
            hosts_cpu.close()
    measured = [k for k in sizes if "oneliner" in results[k]["stats"]]
    if measured:
        base = max(measured)
        per_rank = results[base]["stats"]["oneliner"]["median"] / (base * args.ranks)
        for k in sizes:
            if k not in measured:
                results[k]["oneliner_extrapolated"] = per_rank * k * args.ranks
    starts = startup()
    text = tables(results, args.ranks)
    goals = targets(results)
    where = machine()
    versions = {"pdsh": subprocess.run([PDSH, "-V"], capture_output=True, text=True).stdout.split("\n")[0],
                "clush": subprocess.run([CLUSH, "--version"], capture_output=True, text=True).stdout.strip(),
                "ssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()}
    report = {"machine": where, "date": time.strftime("%Y-%m-%d"), "ranks_per_host": args.ranks,
              "reps": args.reps, "fab_parallel": args.fab_parallel, "homes": args.homes,
              "oneliner_measured_up_to": max(measured) if measured else None,
              "load_before": load, "versions": versions, "startup_seconds": starts,
              "results": {str(k): v for k, v in results.items()}, "targets": goals, "table": text}
    (args.out / "launch_scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    plotted = plot(results, args.out / "launch_scaling.png", args.ranks)
    print(f"\n{where}, {args.homes} homes, {args.reps} repetitions, median seconds (min-max)\n")
    print(text)
    if measured and any(k not in measured for k in sizes):
        print(f"\n* one-liner extrapolated from its time per rank at {max(measured)} hosts")
    print(f"\nstart-up: fab -l {starts['fab_list']:.2f} s, fab --help launch-gpus {starts['fab_help']:.2f} s")
    for goal in goals:
        print(f"{'met    ' if goal['met'] else 'NOT met'}  {goal['target']}: {goal['value'] or 'failed'}"
              + (f" (against {goal['against']})" if "against" in goal else ""))
    print(f"wrote {args.out / 'launch_scaling.json'}" + (f" and {args.out / 'launch_scaling.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
