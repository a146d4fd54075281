"""examples/train_ddp.py: its device/backend choice for 0, 1 and 8 GPUs, and a real 2-rank gloo run on CPU."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("train_ddp_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_gpu_means_gloo_on_cpu(example: ModuleType) -> None:
    for local_world_size in (1, 2):
        for local_rank in range(local_world_size):
            device, backend, reason = example.choose_device(local_rank, local_world_size, 0)
            assert (device, backend) == ("cpu", "gloo")
            assert "no CUDA GPU" in reason


def test_two_local_ranks_on_one_gpu_fall_back_to_gloo(example: ModuleType) -> None:
    for local_rank in (0, 1):
        device, backend, reason = example.choose_device(local_rank, 2, 1)
        assert (device, backend) == ("cpu", "gloo")
        assert "2 local ranks" in reason and "1 GPU" in reason and "1 GPUs" not in reason


def test_one_local_rank_on_one_gpu_uses_nccl(example: ModuleType) -> None:
    device, backend, reason = example.choose_device(0, 1, 1)
    assert (device, backend) == ("cuda:0", "nccl")
    assert "1 local rank" in reason and "1 GPU" in reason


def test_eight_gpus(example: ModuleType) -> None:
    for local_rank in range(8):
        assert example.choose_device(local_rank, 8, 8)[:2] == (f"cuda:{local_rank}", "nccl")
    for local_rank in range(16):
        device, backend, reason = example.choose_device(local_rank, 16, 8)
        assert (device, backend) == ("cpu", "gloo")
        assert "16 local ranks" in reason and "8 GPUs" in reason
    # Fewer ranks than GPUs is fine: each still has one of its own.
    assert example.choose_device(3, 4, 8)[:2] == ("cuda:3", "nccl")


def test_local_rank_outside_local_world_size_is_refused(example: ModuleType) -> None:
    with pytest.raises(ValueError, match="LOCAL_RANK 2"):
        example.choose_device(2, 2, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_on_localhost_cpu(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "NCCL_", "GLOO_"))}
    base.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    procs = []
    for rank in (0, 1):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", NODE_RANK="0")
        log = (tmp_path / f"rank{rank}.log").open("w+")
        procs.append((subprocess.Popen([sys.executable, str(EXAMPLE), "--steps", "3"], env=env, cwd=tmp_path,
                                       stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=50)  # a hang guard, not a timing assertion
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, log) in enumerate(procs):
        log.seek(0)
        out = log.read()
        log.close()
        assert proc.returncode == 0, out
        assert f"rank {rank}/2 (local {rank}) on cpu with gloo: no CUDA GPU visible to 2 local ranks" in out, out
        assert f"rank {rank} all_reduce sum of ranks = 1 (expected 1)" in out, out
