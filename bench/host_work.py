"""One host's part of a launch, in CPU: fablaunch's payloads against the peers' one tmux call.

Runs, on this machine and with no SSH (so without the handshake and the user's `.bashrc`, which every
tool pays alike), what a host runs for one launch of R ranks that sleep, inside a cgroup v2 of its own:
every process it starts (the tmux server, each session, each wrapper) is counted, and nothing else
the machine does. Each variant runs with a private tmux server and $HOME, which are removed after it.

- `peers`: the peers' remote work, one tmux call creating R sessions (`-e RANK=...`).
- `fab`: fablaunch's preflight and launch payload in one `bash -s`, as a launch's held shell runs them.
- `fab, sessions bare`: the same, each session running the rank itself instead of its session script.
- `fab, no tmux call`: the same without the tmux call: checks, lock, directories, files.
- `checks`: the preflight alone.

The differences give what each part costs (printed below the medians). Needs root and a writable
cgroup2 hierarchy (as `launch_scaling.py` does for its hosts' CPU). Run from the repo root:
    python3 bench/host_work.py                  # 8 ranks, 15 repetitions
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.launch_scaling import HostsCPU, tagged  # noqa: E402
from fablaunch import scripts  # noqa: E402
from fablaunch.executor import _bulk  # noqa: E402
from fablaunch.hostfile import parse_host  # noqa: E402
from fablaunch.plan import TAG_VAR, plan_gpus  # noqa: E402
from fablaunch.spec import JobSpec  # noqa: E402

VARIANTS = ["peers", "fab", "fab, sessions bare", "fab, no tmux call", "checks"]
_SESSION = re.compile(r'\bsh "\$dir/[^"]+\.sh" "\$start"')
_TMUX_CALL = re.compile(r"^tmux new-session.*$", re.M)


def host_input(variant: str, job: str, ranks: int, home: str) -> bytes:
    """What `bash -s` reads for one variant."""
    if variant == "peers":
        # Tagged like fablaunch's ranks, only so that the cleanup finds them.
        call = " ';' ".join(f"new-session -d -s {job}-{r} -e RANK={r} -e LOCAL_RANK={r} -e {TAG_VAR}={job}@peers "
                            "sleep 600" for r in range(ranks))
        return f"tmux {call}\n".encode()
    plan = plan_gpus(JobSpec(command=["sleep", "600"]), [parse_host("localhost", "t")] * ranks, job, "python3", home)
    checks = scripts.preflight_payload(plan, "python3", held=True, host=plan.hosts[0])
    if variant == "checks":
        return checks.encode()
    launch = scripts.launch_payload(plan, list(plan.sessions), "now", run="bench", checked=True)
    if variant == "fab, sessions bare":
        launch = _SESSION.sub("sleep 600", launch)
    elif variant == "fab, no tmux call":
        launch = _TMUX_CALL.sub("true", launch)
    return checks.encode() + _bulk(launch.encode())


def one(group: HostsCPU, variant: str, ranks: int, i: int) -> float:
    """CPU seconds of one host's work for `variant`, everything it started included."""
    home = tempfile.mkdtemp(prefix="fl-hw-", dir="/tmp")  # short: tmux's socket path is limited
    job = f"hw{os.getpid()}-{i}"
    env = {**os.environ, "HOME": home, "TMUX_TMPDIR": home}
    env.pop("TMUX", None)
    try:
        time.sleep(0.2)
        before = group.seconds()
        subprocess.run(["sh", "-c", f'echo $$ > "{group.path}/cgroup.procs" && exec bash -s'],
                       input=host_input(variant, job, ranks, home), env=env, capture_output=True, check=True)
        time.sleep(0.6)  # the sessions start after the tmux call returns
        return group.seconds() - before
    finally:
        subprocess.run(["tmux", "kill-server"], env=env, capture_output=True)
        # Ranks and tee outlive a killed server by design; they carry the job's tag.
        for pid in tagged(f"{job}@"):
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=8, help="ranks per host (default 8)")
    ap.add_argument("--reps", type=int, default=15, help="repetitions per variant, interleaved (default 15)")
    args = ap.parse_args()
    group = HostsCPU.around([])
    if group is None:
        raise SystemExit("host_work: needs root and a writable cgroup2 hierarchy")
    try:
        runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for i in range(args.reps):
            for variant in VARIANTS:
                runs[variant].append(one(group, variant, args.ranks, i))
    finally:
        group.close()
    ms = {v: statistics.median(t) * 1000 for v, t in runs.items()}
    print(f"one host, {args.ranks} ranks, {args.reps} repetitions: median CPU, ms")
    for v in VARIANTS:
        print(f"  {v:<20} {ms[v]:6.1f}")
    print("what the parts cost, from the differences, ms:")
    print(f"  checks                        {ms['checks']:6.1f}")
    print(f"  lock, directories, files      {ms['fab, no tmux call'] - ms['checks']:6.1f}")
    print(f"  tmux call and bare sessions   {ms['fab, sessions bare'] - ms['fab, no tmux call']:6.1f}"
          f"   (the peers' whole work: {ms['peers']:.1f})")
    wrappers = ms["fab"] - ms["fab, sessions bare"]
    print(f"  session scripts               {wrappers:6.1f}   ({wrappers / args.ranks:.1f} per rank)")


if __name__ == "__main__":
    main()
