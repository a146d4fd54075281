"""A rank whose fate is chosen by its RANK: `behave.py 0=exit:0 1=exit:3 2=kill 3=sleep`, after a delay each.

Also `deaf:INT,TERM` (ignores those signals, then sleeps),
`spawn` (children, one of them setsid'd and deaf to SIGINT/SIGTERM) and `raise:MSG` (an exception
under @record, so the rank leaves a TORCHELASTIC error file). `AFTER_<rank>=PATH` makes a rank wait
for a file before it acts, which orders ranks without guessing at timings.
"""

import os
import signal
import subprocess
import sys
import time

rank = os.environ.get("RANK", "0")
plan = dict(arg.split("=", 1) for arg in sys.argv[1:])
action, _, arg = plan.get(rank, plan.get("*", "sleep")).partition(":")


def main() -> None:
    print(f"rank {rank} on {os.environ.get('FABLAUNCH_HOST')} does {action} {arg}", flush=True)
    after = os.environ.get("AFTER_" + rank)  # act only once this file exists: orders ranks without timing
    while after and not os.path.exists(after):
        time.sleep(0.1)
    if action == "exit":
        time.sleep(float(os.environ.get("DELAY_" + rank, "1")))
        sys.exit(int(arg))
    if action == "kill":
        time.sleep(float(os.environ.get("DELAY_" + rank, "1")))
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "raise":
        time.sleep(float(os.environ.get("DELAY_" + rank, "1")))
        raise ValueError(arg)
    if action == "deaf":
        for name in arg.split(","):
            signal.signal(getattr(signal, "SIG" + name), signal.SIG_IGN)
    if action == "spawn":
        subprocess.Popen(["sleep", "1000"])
        subprocess.Popen(["setsid", "bash", "-c", "trap '' INT TERM HUP; while :; do sleep 1; done"],
                         start_new_session=True)
    time.sleep(1000)


if action == "raise":  # torch only where needed: importing it in every rank is slow on 2 cores
    from torch.distributed.elastic.multiprocessing.errors import record

    main = record(main)
main()
