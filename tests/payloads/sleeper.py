"""A rank that prints one line, then sleeps inside a function whose name a stack dump cannot miss.

`sleeper.py odd=2,5 child=3`: ranks 2 and 5 sleep in `odd_one_out_sleeper_fn` instead, and rank 3
first starts a python child (same environment) that sleeps in `child_sleeper_fn`. For `fab dump`
(every stack shows the function) and `fab top --job` (a rank that printed once and went silent).
"""

import os
import subprocess
import sys
import time

rank = os.environ.get("RANK", "?")
options = dict(arg.split("=", 1) for arg in sys.argv[1:])
odd = set(options.get("odd", "").split(","))
child = set(options.get("child", "").split(","))


def very_distinctive_sleeper_fn() -> None:
    sleeper_local = "fablaunch-local-42"  # constant, so stacks with --locals still fold  # noqa: F841
    time.sleep(1000)


def odd_one_out_sleeper_fn() -> None:
    time.sleep(1000)


if rank in child:
    code = "import time\ndef child_sleeper_fn():\n    time.sleep(1000)\nchild_sleeper_fn()\n"
    subprocess.Popen([sys.executable, "-c", code])
print(f"rank {rank} on {os.environ.get('FABLAUNCH_HOST')} sleeps", flush=True)
(odd_one_out_sleeper_fn if rank in odd else very_distinctive_sleeper_fn)()
