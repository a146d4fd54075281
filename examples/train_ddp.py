"""A tiny real DDP training loop for trying fablaunch: no downloads, nccl on GPUs, else gloo on CPU.

It reads the torchrun environment contract (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, ...) that `fab launch-gpus` sets by hand and `fab launch-torchrun` gets from torchrun,
and `@record` writes a failing rank's traceback to its own TORCHELASTIC_ERROR_FILE. It uses nccl
only when every local rank has a GPU of its own (LOCAL_WORLD_SIZE <= GPU count), otherwise gloo on
CPU (two ranks on a one-GPU or GPU-less machine), and each rank prints which and why.

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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def choose_device(local_rank: int, local_world_size: int, gpu_count: int) -> tuple[str, str, str]:
    """(device, backend, reason): `cuda:<local_rank>` with nccl when every local rank has a GPU of its
    own, else `cpu` with gloo (NCCL ranks may not share a GPU, and `cuda:1` may not exist)."""
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"LOCAL_RANK {local_rank} outside 0..{local_world_size - 1} (LOCAL_WORLD_SIZE)")
    ranks = _plural(local_world_size, "local rank")
    if gpu_count <= 0:
        return "cpu", "gloo", f"no CUDA GPU visible to {ranks}"
    if local_world_size > gpu_count:
        return "cpu", "gloo", f"{ranks} but only {_plural(gpu_count, 'GPU')}; NCCL needs a GPU per rank"
    return f"cuda:{local_rank}", "nccl", f"{ranks} on {_plural(gpu_count, 'GPU')}, one GPU per rank"


@record
def main() -> None:
    args = parse_args()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size, local_world_size = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    where, backend, reason = choose_device(local_rank, local_world_size, gpu_count)
    device = torch.device(where)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"rank {rank}/{world_size} (local {local_rank}) on {name} with {backend}: {reason}", flush=True)
    dist.init_process_group(backend)

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
    dist.barrier()  # no rank tears down while another still talks to the store (gloo aborts at exit)
    dist.destroy_process_group()
    if total.item() != expected:
        raise SystemExit(f"all_reduce gave {total.item()}, expected {expected}")


if __name__ == "__main__":
    main()
