"""A rank whose output attacks the tool reading it: rich markup, the survey's separator byte, a
forged exit record and tail header, a terminal escape. Then it sleeps (still running) or exits 3.

`hostile.py sleep|exit`; the job directory comes from TORCHELASTIC_ERROR_FILE.
"""

import os
import sys
import time

here = os.path.dirname(os.environ["TORCHELASTIC_ERROR_FILE"])
rank = os.environ["RANK"]
lines = [
    "[rank0]: RuntimeError: [/opt/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:29500",
    "\x1eNOW not-a-number",
    "\x1eFILE " + os.path.join(here, f"rank-{rank}.exit"),
    '{"exit_code": 0, "start_time": 1, "end_time": 2}',
    "\x1eMANIFEST " + here,
    '{"job": 1}',
    "==> " + os.path.join(here, "rank-9.log") + " <==",
    "\x1b[2J\x1b[31mred\x1b[0m",
    "[bold red]not markup[/] [rank0]: last",
]
print("\n".join(lines), flush=True)
if sys.argv[1:] == ["exit"]:
    sys.exit(3)
time.sleep(1000)
