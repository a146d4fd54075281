"""A real torch.distributed rank: all_reduce, then record what it saw in out/<RANK>.json."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
        "MASTER_PORT", "OMP_NUM_THREADS", "TORCHELASTIC_ERROR_FILE", "FABLAUNCH_HOST", "EXTRA")

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
total = torch.tensor([float(rank + 1)])
dist.all_reduce(total)
out = Path("out")
out.mkdir(exist_ok=True)
(out / f"{rank}.json").write_text(json.dumps({
    "env": {k: os.environ.get(k) for k in KEYS}, "sum": total.item(), "world": world,
    "argv": sys.argv[1:], "cwd": os.getcwd(),
}))
dist.destroy_process_group()
