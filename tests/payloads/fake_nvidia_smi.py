#!/usr/bin/env python3
"""A stand-in for `nvidia-smi --query-gpu=... / --query-compute-apps=... --format=csv,noheader,nounits`.

Installed as `nvidia-smi` on a fake host's PATH; `-L` lists the GPUs; else prints the rows of the JSON file named by
$FAKE_NVIDIA_SMI (`{"gpus": [{field: text}], "apps": [...], "exit": N, "message": "..."}`), the
requested fields in the requested order, as the real one does. A row without a field prints `[N/A]`;
a field the real tool does not know is an error, as there, so a typo in a query cannot pass.
"""

import json
import os
import sys
from pathlib import Path

VALID = {"index", "uuid", "name", "utilization.gpu", "power.draw", "power.limit", "memory.used", "memory.total",
         "temperature.gpu", "gpu_uuid", "pid", "used_memory", "process_name"}

data = json.loads(Path(os.environ["FAKE_NVIDIA_SMI"]).read_text())
if data.get("exit"):
    print(data.get("message", "failed"))
    sys.exit(data["exit"])
if sys.argv[1:] == ["-L"]:  # GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)
    for row in data.get("gpus", []):
        print(f"GPU {row.get('index', 0)}: {row.get('name', 'NVIDIA H100 80GB HBM3')} (UUID: {row.get('uuid', '')})")
    sys.exit(0)
args = dict(arg.split("=", 1) for arg in sys.argv[1:] if "=" in arg)
if args.get("--format") != "csv,noheader,nounits":
    sys.exit(f"stand-in nvidia-smi only speaks --format=csv,noheader,nounits, not {sys.argv[1:]}")
if "--query-gpu" in args:
    fields, rows = args["--query-gpu"].split(","), data.get("gpus", [])
elif "--query-compute-apps" in args:
    fields, rows = args["--query-compute-apps"].split(","), data.get("apps", [])
else:
    sys.exit(f"stand-in nvidia-smi: no query in {sys.argv[1:]}")
for name in fields:
    if name not in VALID:
        print(f'Field "{name}" is not a valid field to query.')
        sys.exit(2)
for row in rows:
    print(", ".join(str(row.get(name, "[N/A]")) for name in fields))
