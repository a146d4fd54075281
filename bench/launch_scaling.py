"""Launch, status and stop at 1 to 64 hosts: fablaunch against the guide's one-liner and parallel OpenSSH.

Brings up K fake hosts on this machine with the test suite's own cluster code (one sshd per loopback
address, one tmux server each) and, for each K, times several repetitions of:

- fablaunch: `launch-gpus` (K hosts x R ranks, a payload that sleeps), `status`, `stop` (until it has
  verified that nothing is left), and `launch-torchrun` (one session per host; its "python" is a
  stand-in that sleeps, so 64 torchrun agents do not swamp a 2-core machine with torch imports);
- the guide's per-GPU one-liner (`cat -n gpus | xargs -n2 bash -c 'ssh $1 tmux new-session ...'`), serial;
  beyond `--oneliner-max` hosts it is extrapolated from its time per rank at the largest K measured;
- a parallel baseline: one OpenSSH client per host at once (`xargs -P`), each creating its R sessions in one
  tmux call; and a status baseline: one parallel `tmux ls` per host.

Prints a table of medians (and spreads), the ratios the project targets, start-up times and the
launcher's peak memory, and writes bench/results/launch_scaling.{json,png}. Run from the repo root:
    python3 bench/launch_scaling.py                 # K = 1, 8, 32, 64; about 10 minutes on 2 cores
    python3 bench/launch_scaling.py --sizes 1,8 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster import Cluster  # noqa: E402  (the bench reuses the test suite's cluster, no copy)

FAB = shutil.which("fab") or "fab"
TAG = "FABLAUNCH_TAG="


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


class Bench:
    """One cluster of the largest K hosts; each size uses its first K."""

    def __init__(self, cluster: Cluster, work: Path, ranks: int) -> None:
        self.cluster = cluster
        self.work = work
        self.ranks = ranks
        self.port = 29300
        self.fake_python = work / "fake-python"
        # Preflight probes (`-c ...`) go to a real python; torchrun's own start just sleeps.
        self.fake_python.write_text('#!/bin/sh\n[ "$1" = -c ] && exec python3 "$@"\nexec sleep 600\n')
        self.fake_python.chmod(0o755)

    def fab(self, *args: str, measure_memory: bool = False) -> tuple[float, int | None]:
        """Run `fab` in the work dir; return wall seconds (and its peak RSS in KB if asked)."""
        prefix = ["/usr/bin/time", "-f", "%M", "-o", str(self.work / "rss")] if measure_memory else []
        cmd = [*prefix, FAB, "-r", str(REPO), "-S", str(self.cluster.ssh_config), *args]
        start = time.perf_counter()
        result = subprocess.run(cmd, cwd=self.work, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        rss = int((self.work / "rss").read_text().split()[-1]) if measure_memory else None
        return elapsed, rss

    def shell(self, script: str) -> float:
        start = time.perf_counter()
        result = subprocess.run(["bash", "-c", script], cwd=self.work, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"baseline failed ({result.returncode}):\n{script}\n{result.stderr[-2000:]}")
        return elapsed

    def files(self, k: int) -> list[str]:
        hosts = self.cluster.names[:k]
        (self.work / "gpus").write_text("".join(f"{h}\n" for h in hosts for _ in range(self.ranks)))
        (self.work / "hosts").write_text("".join(f"{h}\n" for h in hosts))
        return hosts

    def clean_tmux(self, hosts: list[str]) -> None:
        """Remove the baselines' untagged sessions: their sleeps die with their tmux server."""
        for h in hosts:
            self.cluster.tmux(h, "kill-server")

    def oneliner(self) -> float:
        """The guide's per-GPU command, verbatim but for `ssh -F` and the sleeping payload."""
        cfg = shlex.quote(str(self.cluster.ssh_config))
        return self.shell(
            "cat -n gpus | xargs -n2 bash -c 'ssh -F " + cfg + " $1 tmux new-session -d -s rank-$(($0 - 1)) "
            "-c $(pwd) -e TORCHELASTIC_ERROR_FILE=../error.json -e OMP_NUM_THREADS=1 "
            "-e MASTER_ADDR=$(head -n 1 gpus) -e MASTER_PORT=5001 -e WORLD_SIZE=$(wc -l < gpus) "
            "-e RANK=$(($0 - 1)) sleep 600'")

    def parallel(self, hosts: list[str]) -> float:
        """One OpenSSH client per host at once, each creating the host's R sessions in one tmux call."""
        lines = []
        for i, h in enumerate(hosts):
            calls = [f"new-session -d -s rank-{i * self.ranks + r} -c {self.work} -e RANK={i * self.ranks + r} "
                     "sleep 600" for r in range(self.ranks)]
            lines.append(f"{h} tmux " + " '\\;' ".join(calls))
        (self.work / "parallel.txt").write_text("\n".join(lines) + "\n")
        cfg = shlex.quote(str(self.cluster.ssh_config))
        return self.shell(f"xargs -P {len(hosts)} -L1 ssh -F {cfg} < parallel.txt")

    def status_baseline(self, hosts: list[str]) -> float:
        cfg = shlex.quote(str(self.cluster.ssh_config))
        return self.shell(f"printf '%s\\n' {' '.join(hosts)} | xargs -P {len(hosts)} -I{{}} ssh -F {cfg} {{}} tmux ls")

    def rep(self, k: int, rep: int, with_oneliner: bool) -> dict[str, float]:
        hosts = self.files(k)
        self.port += 1
        job = f"bench{k}r{rep}"
        t: dict[str, float] = {}
        t["launch_gpus"], rss = self.fab("launch-gpus", "--job", job, "--port", str(self.port), "--", "sleep", "600",
                                         measure_memory=True)
        t["launch_peak_mb"] = (rss or 0) / 1024
        t["status"], _ = self.fab("status", "--job", job, "--json")
        t["status_baseline"] = self.status_baseline(hosts)
        start = time.perf_counter()
        self.fab("stop", "--job", job, "--grace", "0")
        if tagged(job):
            raise RuntimeError(f"stop left processes of {job}: {tagged(job)}")
        t["stop"] = time.perf_counter() - start
        tjob = f"benchtr{k}r{rep}"
        t["launch_torchrun"], _ = self.fab("launch-torchrun", "--job", tjob, "--port", str(self.port), "--python",
                                           str(self.fake_python), "--nproc-per-node", str(self.ranks), "--", "t.py")
        self.fab("stop", "--job", tjob, "--grace", "0")
        t["parallel_ssh"] = self.parallel(hosts)
        self.clean_tmux(hosts)
        if with_oneliner:
            t["oneliner"] = self.oneliner()
            self.clean_tmux(hosts)
        return t


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


def summarise(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = sorted({key for s in samples for key in s})
    return {key: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
            for key in keys if (v := [s[key] for s in samples if key in s])}


def table(results: dict[int, dict[str, Any]], ranks: int) -> str:
    """The README table: medians in seconds, and the ratios the project's targets are stated in."""
    head = ("| hosts x ranks | launch-gpus | launch-torchrun | parallel ssh | one-liner | status | tmux ls baseline "
            "| stop | launch / parallel | one-liner / launch | status / baseline | stop / launch | peak MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for k, r in sorted(results.items()):
        m = {key: v["median"] for key, v in r["stats"].items()}
        one = m.get("oneliner", r.get("oneliner_extrapolated"))
        one_txt = f"{one:.2f}{'*' if 'oneliner' not in m else ''}"

        def spread(key: str, r: dict[str, Any] = r) -> str:
            s = r["stats"][key]
            return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"

        lines.append(f"| {k} x {ranks} | {spread('launch_gpus')} | {spread('launch_torchrun')} | "
                     f"{spread('parallel_ssh')} | {one_txt} | {spread('status')} | {spread('status_baseline')} | "
                     f"{spread('stop')} | {m['launch_gpus'] / m['parallel_ssh']:.2f} | "
                     f"{one / m['launch_gpus']:.1f} | {m['status'] / m['status_baseline']:.2f} | "
                     f"{m['stop'] / m['launch_gpus']:.2f} | {m['launch_peak_mb']:.0f} |")
    return "\n".join(lines)


def plot(results: dict[int, dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    ks = sorted(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("launch_gpus", "fab launch-gpus"), ("launch_torchrun", "fab launch-torchrun"),
                       ("parallel_ssh", "parallel OpenSSH baseline"), ("status", "fab status"),
                       ("status_baseline", "parallel tmux ls"), ("stop", "fab stop")):
        ax.plot(ks, [results[k]["stats"][key]["median"] for k in ks], marker="o", label=label)
    one = [(k, results[k]["stats"]["oneliner"]["median"] if "oneliner" in results[k]["stats"]
            else results[k]["oneliner_extrapolated"]) for k in ks]
    ax.plot([k for k, _ in one], [v for _, v in one], marker="x", linestyle="--", label="guide one-liner (serial)")
    ax.set_xlabel("hosts (8 ranks each)")
    ax.set_ylabel("seconds (median)")
    ax.set_yscale("log")
    ax.set_xticks(ks)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("fablaunch vs. the shell one-liner, fake hosts on one 2-core machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,8,32,64", help="host counts K (default 1,8,32,64)")
    ap.add_argument("--ranks", type=int, default=8, help="ranks per host (default 8)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per K (default 3)")
    ap.add_argument("--oneliner-max", type=int, default=8, help="largest K to run the serial one-liner at")
    ap.add_argument("--port", type=int, default=2622, help="sshd port of the fake hosts (default 2622)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where the JSON and PNG go")
    args = ap.parse_args()
    sizes = sorted({int(k) for k in args.sizes.split(",")})
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="fl-bench-", dir="/tmp"))
    results: dict[int, dict[str, Any]] = {}
    try:
        with Cluster(root / "c", max(sizes), port=args.port, base=101, env={"PATH": os.environ["PATH"]}) as cluster:
            work = root / "w"
            work.mkdir()
            bench = Bench(cluster, work, args.ranks)
            bench.files(max(sizes))
            bench.fab("status", "--json")  # warm caches (pyc, host keys) outside the measurements
            for k in sizes:
                samples = [bench.rep(k, i, k <= args.oneliner_max) for i in range(args.reps)]
                results[k] = {"stats": summarise(samples), "samples": samples}
                print(f"K={k}: " + ", ".join(f"{key} {v['median']:.2f}" for key, v in results[k]["stats"].items()),
                      flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    measured = [k for k in sizes if "oneliner" in results[k]["stats"]]
    if measured:
        base = max(measured)
        per_rank = results[base]["stats"]["oneliner"]["median"] / (base * args.ranks)
        for k in sizes:
            if k not in measured:
                results[k]["oneliner_extrapolated"] = per_rank * k * args.ranks
    starts = startup()
    text = table(results, args.ranks)
    machine = f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}"
    report = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "ranks_per_host": args.ranks,
              "reps": args.reps, "oneliner_measured_up_to": max(measured) if measured else None,
              "startup_seconds": starts, "results": {str(k): v for k, v in results.items()}, "table": text}
    (args.out / "launch_scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    plotted = plot(results, args.out / "launch_scaling.png")
    print(f"\n{machine}, {args.reps} repetitions, median seconds (min-max)\n")
    print(text)
    if measured and any(k not in measured for k in sizes):
        print(f"\n* one-liner extrapolated from its time per rank at {max(measured)} hosts")
    print(f"\nstart-up: fab -l {starts['fab_list']:.2f} s, fab --help launch-gpus {starts['fab_help']:.2f} s")
    print(f"wrote {args.out / 'launch_scaling.json'}" + (f" and {args.out / 'launch_scaling.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
