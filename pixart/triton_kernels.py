"""GPU kernels written in Triton, for passes that PyTorch's eager mode runs as several kernels: triton is imported
only when a kernel first runs, so the package works without it. Under TRITON_INTERPRET=1 they run on CPU tensors
(tests/test_triton_kernels.py); bench/kernels_cuda.py measures them on a GPU."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_found() -> bool:
    """Whether triton is installed (looked up once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def available(device: torch.device | str) -> bool:
    """Whether the kernels run on `device`: a CUDA device with triton installed, or any device in the interpreter."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return (interpret or torch.device(device).type == "cuda") and triton_found()


def quantize_rows(x: torch.Tensor, format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`quant_dynamic.quantize_rows` in one kernel launch: the values (M, K) and fp32 scales (M, 1) of (M, K) floats."""
    from .quant_dynamic import FORMATS  # here: quant_dynamic imports this module
    from .triton_jit import quantize_rows_kernel

    qdtype, qmax = FORMATS[format]
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    q = torch.empty(M, K, dtype=qdtype, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    block = min(1024, max(16, 1 << (K - 1).bit_length()))
    # a GPU program takes a row (or several short ones); the interpreter (CPU tensors) pays per program: take many
    rows = max(1, 1024 // block) if x.is_cuda else 64
    if M:
        quantize_rows_kernel[(-(-M // rows),)](x, q, scale, M, K, x.stride(0), QMAX=qmax, INT8=format == "int8",
                                               ROWS=rows, BLOCK=block)
    return q, scale
