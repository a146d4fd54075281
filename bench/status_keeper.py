"""A second `fab status` through the keeper against OpenSSH ControlMaster: is repeated status cheap?

Brings up K fake hosts with the test suite's cluster code (as bench/launch_scaling.py does), launches a
job of R sleeping ranks per host, and times, per K, the median of several repetitions of:

- `tmux ls`, one OpenSSH client per host in parallel (`xargs -P K`): a handshake and a shell each;
- the same over ControlMaster connections opened beforehand (`-o ControlMaster=auto -o ControlPersist`,
  the first round untimed): no handshake, but a remote shell (the user's .bashrc) each;
- `fab status --no-keeper`: fablaunch over direct connections;
- `fab status` with the keeper (FABLAUNCH_KEEPER=1), the first call untimed (it starts the keeper and
  connects): the keeper's held shells; and FABLAUNCH_KEEPER_MODE=exec, held connections with a fresh
  `bash -s` per call (the keeper's first step);
- `fab -l`: the floor of any `fab` call (Python, Fabric and the task collection loading).

Run from the repo root:  python3 bench/status_keeper.py [--sizes 32,64] [--reps 5]
Writes bench/results/status_keeper.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch_scaling import machine, spread  # noqa: E402  (bench/, this script's directory, is on the path)

from tests.cluster import Cluster  # noqa: E402  (the bench reuses the test suite's cluster, no copy)

FAB = shutil.which("fab") or "fab"


FAILED: list[str] = []  # runs that did not succeed (a busy machine: a host past its deadline); reported


def timed(argv: list[str], cwd: Path, env: dict[str, str], name: str = "") -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        if not name:
            raise RuntimeError(f"{' '.join(argv[:6])} failed ({result.returncode}):\n{result.stderr[-2000:]}")
        FAILED.append(f"{name}: exit {result.returncode}: {result.stderr.strip()[-300:]}")
    return elapsed


def measure(cluster: Cluster, work: Path, job: str, k: int, reps: int, keepers: Path) -> dict[str, dict[str, float]]:
    hosts = cluster.names[:k]
    (work / "hosts").write_text("".join(f"{h}\n" for h in hosts))
    cfg = shlex.quote(str(cluster.ssh_config))
    base_env = {**os.environ, "FABLAUNCH_KEEPER_DIR": str(keepers), "FABLAUNCH_KEEPER": "0"}
    listing = f"printf '%s\\n' {' '.join(hosts)} | xargs -P {k} -I{{}} ssh -F {cfg} "
    masters = Path(tempfile.mkdtemp(prefix="flcm-", dir="/tmp"))
    cm = f"-o ControlMaster=auto -o ControlPath={masters}/%C -o ControlPersist=600 "
    fab = [FAB, "-r", str(REPO), "-S", str(cluster.ssh_config)]
    status = [*fab, "status", "--hosts", "hosts", "--job", job, "--json"]
    runs: dict[str, Any] = {
        "ssh tmux ls": (["bash", "-c", listing + "{} tmux ls"], base_env),
        "ControlMaster tmux ls": (["bash", "-c", listing + cm + "{} tmux ls"], base_env),
        "fab status (direct)": ([*status, "--no-keeper"], base_env),
        "fab status (keeper, held shell)": (status, {**base_env, "FABLAUNCH_KEEPER": "1"}),
        "fab status (keeper, exec per call)": (status, {**base_env, "FABLAUNCH_KEEPER": "1",
                                                        "FABLAUNCH_KEEPER_MODE": "exec"}),
        "fab -l (start-up floor)": ([*fab, "-l"], base_env),
    }
    try:
        for name, (argv, env) in runs.items():  # untimed: masters and keepers up, caches warm
            timed(argv, work, env, f"{name} (first, untimed)")
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(reps):  # interleaved, so a busy moment of the machine hits every variant alike
            for name, (argv, env) in runs.items():
                samples[name].append(timed(argv, work, env, name))
    finally:
        subprocess.run(["bash", "-c", f"for s in {masters}/*; do ssh -o ControlPath=$s -O exit x; done"],
                       capture_output=True)
        shutil.rmtree(masters, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "fablaunch.keeper", "stop"], env=base_env, capture_output=True)
    return {name: spread(v) for name, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="32,64", help="host counts K (default 32,64)")
    ap.add_argument("--ranks", type=int, default=8, help="sleeping ranks per host (default 8)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    ap.add_argument("--port", type=int, default=2623, help="sshd port of the fake hosts (default 2623)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where the JSON goes")
    args = ap.parse_args()
    sizes = sorted({int(k) for k in args.sizes.split(",")})
    root = Path(tempfile.mkdtemp(prefix="fl-keeper-bench-", dir="/tmp"))
    results: dict[int, dict[str, dict[str, float]]] = {}
    try:
        with Cluster(root / "c", max(sizes), port=args.port, base=180 - max(sizes) + 1,
                     env={"PATH": os.environ["PATH"]}) as cluster:
            work = root / "w"
            work.mkdir()
            (work / "gpus").write_text("".join(f"{h}\n" for h in cluster.names for _ in range(args.ranks)))
            job = f"keeperbench{os.getpid()}"
            env = {**os.environ, "FABLAUNCH_KEEPER": "0"}
            timed([FAB, "-r", str(REPO), "-S", str(cluster.ssh_config), "launch-gpus", "--job", job, "--gpus", "gpus",
                   "--port", "29391", "--", "sleep", "600"], work, env)
            try:
                for k in sizes:
                    results[k] = measure(cluster, work, job, k, args.reps, root / "keepers")
                    print(f"K={k}: " + ", ".join(f"{n} {v['median']:.2f}" for n, v in results[k].items()), flush=True)
            finally:
                timed([FAB, "-r", str(REPO), "-S", str(cluster.ssh_config), "stop", "--job", job, "--grace", "0"],
                      work, env, "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    names = list(next(iter(results.values())))
    head = "| hosts | " + " | ".join(names) + " | keeper / ControlMaster |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for k, r in results.items():
        ratio = r["fab status (keeper, held shell)"]["median"] / r["ControlMaster tmux ls"]["median"]
        lines.append(f"| {k} x {args.ranks} | " + " | ".join(
            f"{r[n]['median']:.2f} ({r[n]['min']:.2f}-{r[n]['max']:.2f})" for n in names) + f" | {ratio:.2f} |")
    text = "\n".join(lines)
    where = machine()
    # Both ends of every connection share this machine: other work on it shows in every number.
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "status_keeper.json").write_text(json.dumps(
        {"machine": where, "load_average_at_end": load, "date": time.strftime("%Y-%m-%d"), "reps": args.reps,
         "ranks_per_host": args.ranks,
         "results": {str(k): v for k, v in results.items()}, "table": text, "failed": FAILED}, indent=2) + "\n")
    print(f"\n{where}, load average at the end {load}, {args.reps} repetitions, median seconds (min-max)\n\n{text}")
    for line in FAILED:
        print(f"failed: {line}")


if __name__ == "__main__":
    main()
