"""What the machine we run on is good at: the default device and compute dtype."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=None)
def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (None where there is none to read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower."""
    flags = cpu_flags()
    if flags is None:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8_dot() -> bool:
    """True when the CPU sums int8 products straight into int32 (AVX512-VNNI or AMX-INT8).

    Without it (AVX2) x86 int8 kernels add u8×s8 pairs in int16, which saturates unless the weights fit 7 bits."""
    return bool((cpu_flags() or set()) & {"avx512_vnni", "amx_int8"})


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs and CPUs that run it natively, fp16 on older GPUs, else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def default_threads(usable_cores: int, local_processes: int = 1) -> int:
    """Torch threads for one process: its share of the cores it may run on, at least one."""
    return max(1, usable_cores // max(1, local_processes))


def set_threads(threads: int | None = None, local_processes: int = 1) -> int:
    """Set torch's thread count (default: this process's share of the cores its affinity allows); return it."""
    if threads is None:
        threads = default_threads(len(os.sched_getaffinity(0)), local_processes)
    elif threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    return threads
