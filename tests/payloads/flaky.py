"""A rank that gives up at once on the host FLAKY_HOST names, and does probe.py's all_reduce anywhere else."""

import os
import runpy
import sys

if os.environ.get("FABLAUNCH_HOST") == os.environ.get("FLAKY_HOST"):
    print(f"rank {os.environ['RANK']} on a flaky host gives up")
    sys.exit(3)
runpy.run_path("probe.py", run_name="__main__")
