"""torchrun helpers: the same command runs as one process or as many, on CPUs (gloo) or GPUs (NCCL)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .hardware import set_threads


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def init() -> None:
    """Join the process group torchrun describes in the environment; without WORLD_SIZE, stay a single process."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())  # "cuda" now means this rank's GPU
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    # torchrun sets OMP_NUM_THREADS=1 for every rank: give each its share of the cores instead
    set_threads(local_processes=local_world_size())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(value: int) -> int:
    """The sum of `value` over all ranks."""
    if not dist.is_initialized():
        return value
    total = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(total)
    return int(total.item())


def print0(*args, **kwargs) -> None:
    """print, on rank 0 only."""
    if rank() == 0:
        print(*args, **kwargs)


def cleanup() -> None:
    """Wait for every rank, then leave the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def session() -> Iterator[None]:
    """init() for the duration of the block; cleanup() after it, or only leave the group when it raised."""
    init()
    try:
        yield
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()  # no barrier: the other ranks may never reach it
        raise
    cleanup()
