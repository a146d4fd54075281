"""A tiny real DDP training loop for trying fablaunch: no downloads, gloo on CPU, nccl on GPUs.

It reads the torchrun environment contract (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...) that
`fab launch-gpus` sets by hand and `fab launch-torchrun` gets from torchrun, and `@record` writes
a failing rank's traceback to its own TORCHELASTIC_ERROR_FILE.

    fab launch-gpus --job demo -- examples/train_ddp.py --steps 20
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--fail-rank", type=int, default=None, help="raise on this rank, to try `fab errors`")
    return parser.parse_args()


@record
def main() -> None:
    args = parse_args()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"rank {rank}/{world_size} (local {local_rank}) on {name} with {backend}", flush=True)

    # Every rank draws the same "true" weights and its own data, so the loss must fall on all ranks.
    torch.manual_seed(0)
    true_w = torch.randn(16, 1)
    torch.manual_seed(1 + rank)
    model = DistributedDataParallel(torch.nn.Linear(16, 1).to(device),
                                    device_ids=[local_rank] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    start = time.monotonic()
    for step in range(args.steps):
        x = torch.randn(args.batch_size, 16)
        y = x @ true_w
        loss = torch.nn.functional.mse_loss(model(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if args.fail_rank == rank and step == args.steps // 2:
            raise RuntimeError(f"rank {rank} failed on purpose at step {step}")
        if step % 5 == 0 or step == args.steps - 1:
            print(f"rank {rank} step {step} loss {loss.item():.4f}", flush=True)

    total = torch.tensor([float(rank)], device=device)
    dist.all_reduce(total)
    expected = world_size * (world_size - 1) / 2
    print(f"rank {rank} all_reduce sum of ranks = {total.item():.0f} (expected {expected:.0f}); "
          f"{args.steps} steps in {time.monotonic() - start:.1f}s", flush=True)
    dist.destroy_process_group()
    if total.item() != expected:
        raise SystemExit(f"all_reduce gave {total.item()}, expected {expected}")


if __name__ == "__main__":
    main()
