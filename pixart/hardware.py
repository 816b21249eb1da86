"""What the machine we run on is good at: the default device and compute dtype; which devices it has."""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
from functools import lru_cache
from pathlib import Path

import torch

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 1 << 30
DEFAULT_MMAP_MAX = 32 << 20  # glibc's largest automatic map threshold on 64-bit
KEEP_FREED_ENV = "PIXART_KEEP_FREED_MEMORY"


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


class _Malloc:
    """glibc's malloc settings, changed inside `keep_freed_memory()` blocks (nested or from several threads)."""

    lock = threading.Lock()
    depth = 0  # open blocks
    took = False  # whether the outermost block's setting took

    @staticmethod
    @lru_cache(maxsize=None)
    def libc() -> ctypes.CDLL | None:
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            return None
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt, libc.malloc_trim  # noqa: B018 (both must exist)
        except (OSError, AttributeError):
            return None
        return libc

    @classmethod
    def off(cls) -> bool:
        """Whether to leave malloc alone: not glibc's, or PIXART_KEEP_FREED_MEMORY=0."""
        return os.environ.get(KEEP_FREED_ENV, "1").strip().lower() in ("0", "false", "no", "off") or \
            cls.libc() is None

    @classmethod
    def set(cls, mmap_threshold: int, trim_threshold: int) -> bool:
        libc = cls.libc()
        return libc is not None and all(libc.mallopt(code, ctypes.c_int(value)) == 1 for code, value in (
            (M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold)))


@contextlib.contextmanager
def keep_freed_memory():
    """Inside the block, glibc's malloc keeps the memory of freed tensors for the next ones instead of returning it
    to the kernel; on leaving it, the kept memory goes back. Yields whether the setting took.

    By default glibc maps every allocation over 32 MB afresh and unmaps it when freed, so each large activation of a
    denoising step (at 512² fc1's (2048, 4608) fp32 output is 38 MB; at 1024² four times that) is paid again in
    zero-filled page faults, one per 4 KB: producing 40 MB by one multiplication takes 16 ms this way and 5 ms with
    the memory kept (a 2-core EPYC). Inside the block allocations up to 1 GB come from the heap and freed ones stay
    there (up to 1 GB at its top), where the next step's tensors of the same sizes reuse them. Only around work
    whose tensors repeat, never around loading: freed load-time buffers would stay resident beside the weights (a
    staged pipeline's peak went from 5.7 to 16.4 GB at 512²). On leaving, malloc maps allocations over 32 MB again
    (glibc's largest automatic threshold) and `malloc_trim` returns the kept memory. The setting is process-wide
    while any block is open (other threads' allocations too). A no-op where malloc is not glibc's, or with the
    environment variable PIXART_KEEP_FREED_MEMORY=0.
    """
    if _Malloc.off():
        yield False
        return
    with _Malloc.lock:
        _Malloc.depth += 1
        if _Malloc.depth == 1:
            _Malloc.took = _Malloc.set(KEEP_FREED_BYTES, KEEP_FREED_BYTES)
        took = _Malloc.took
    try:
        yield took
    finally:
        with _Malloc.lock:
            _Malloc.depth -= 1
            if _Malloc.depth == 0:
                _Malloc.set(DEFAULT_MMAP_MAX, 2 * DEFAULT_MMAP_MAX)
                give_back_freed_memory()


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the kernel (glibc's `malloc_trim`), also those below live blocks, which
    freeing alone never returns: after a `keep_freed_memory()` block, models freed later (a staged pipeline's
    transformer) sit under the blocks the steps left at the heap's top. A no-op outside glibc, or with
    PIXART_KEEP_FREED_MEMORY=0."""
    if not _Malloc.off():
        _Malloc.libc().malloc_trim(0)


def available_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, checked to exist on this machine (ValueError naming it and the fix)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:1', 'mps' ...") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r}: there is no CUDA GPU here (or this torch is a CPU build): "
                             "use 'cpu'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s), cuda:0 to "
                             f"cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available here: use 'cpu'")
    return device


def device_from(device: str | torch.device | None, device_map: str | None) -> torch.device:
    """`device`, or diffusers' device_map ("auto"/"balanced" mean the GPU when there is one; "cuda" needs one)."""
    if device is not None:
        return available_device(device)
    if device_map == "cuda":
        return available_device("cuda")
    if device_map in ("auto", "balanced"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device_map not in (None, "cpu"):
        raise ValueError(f"device_map {device_map!r} is not supported: use 'auto', 'cpu', 'cuda' or device=...")
    return torch.device("cpu")
