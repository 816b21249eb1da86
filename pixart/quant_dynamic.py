"""Dynamic quantization of linear layers: int8 or fp8 weights per output channel, activations per token at each call.

What makes the transformer faster, not only smaller: the matrix products run on an integer / fp8 kernel, chosen per
device by `dynamic_kernel` from measurements (bench/quant.py); a reference path that is correct everywhere is kept.
"""
from __future__ import annotations

import logging
import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_kernels
from .hardware import cpu_has_int8_dot

logger = logging.getLogger("pixart")

# format -> (the dtype of its values, the largest value)
FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
CPU_CHUNK_BYTES = 4 << 20  # quantize_rows's fp32 temporaries on a CPU: a few MB, reused by the allocator


def per_channel(w: torch.Tensor, dtype: torch.dtype, format: str, qmax: float) -> dict[str, torch.Tensor]:
    """Symmetric quantization of a float (N, K) weight, one scale per output channel rounded to dtype first.

    fp8 values are returned as their bytes (uint8), so that casting a model to a float dtype leaves them alone."""
    w = w.to(torch.float32, copy=True)  # one copy, then in place: the XXL's wi is 168 MB in fp32
    scale = (w.abs().amax(1) / qmax).clamp(min=1e-12).to(dtype)
    q = w.div_(scale.float()[:, None]).clamp_(-qmax, qmax)
    if format == "int8":
        return {"weight": q.round_().to(torch.int8), "scale": scale}
    return {"weight": q.to(torch.float8_e4m3fn).view(torch.uint8), "scale": scale}


def dynamic_kernel(format: str, device: torch.device) -> str:
    """The kernel a dynamic layer uses on `device`: the fastest measured (bench/quant.py), else "reference".

    x86 CPUs with VNNI/AMX: `torch._int_mm` (1.45× bf16 on a Zen 4, issue 6). AVX2 only: oneDNN's qlinear, the op
    inductor's own x86 quantization lowers to (2048×1152→4608 on a 2-core EPYC, activation quantization included:
    0.18 TOP/s against 0.105 TFLOP/s for fp32 F.linear); `_int_mm` has no AVX2 kernel there (0.004), and fbgemm's
    dynamic linear (0.165) is deprecated and quantizes activations per tensor to 7 bits. CUDA: `_int_mm` (int8
    tensor cores); fp8 `_scaled_mm` from compute capability 8.9."""
    if device.type == "cuda":
        if format == "int8":
            return "int_mm"
        return "scaled_mm" if torch.cuda.get_device_capability(device) >= (8, 9) else "reference"
    x86 = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
    if device.type == "cpu" and format == "int8" and x86:
        return "int_mm" if cpu_has_int8_dot() else "onednn"
    return "reference"


def weight_max(format: str, device: torch.device) -> float:
    """The largest weight value for layers loaded onto `device`: AVX2's oneDNN kernel needs int8 weights in ±63.

    On AVX2, oneDNN adds u8×s8 pairs in int16, which saturates unless one side fits 7 bits: 7-bit weights keep the
    activations at 8 bits, which measured better (1 - cosine 1.1e-3 against 3.9e-3) on activations with outliers."""
    return 63.0 if dynamic_kernel(format, device) == "onednn" else FORMATS[format][1]


def quantize_rows(x: torch.Tensor, format: str, unsigned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of (M, K) floats: the values (M, K) and fp32 scales (M, 1).

    `unsigned` (int8): the values plus 128 as uint8, i.e. zero point 128, the input oneDNN's x86 kernel takes without
    first shifting signed values itself (the same products; 6-13% faster per linear on a 2-core AVX2 EPYC)."""
    qdtype, qmax = FORMATS[format]
    qdtype = torch.uint8 if unsigned else qdtype
    # max |x| as max(max x, −min x): two vectorised reductions and no |x| copy; on a CPU 10× faster than
    # vector_norm(x, inf) at (512, 4608), and the same value (NaN propagates in both)
    amax = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg()).float()
    scale = amax.clamp_(min=1e-12) * (1 / qmax)  # what CUDA's `/ qmax` computes, here on every device (Triton's too)

    def values(rows: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        q = rows.float() / scales  # within ±qmax up to a rounding error, which round() and the fp8 cast absorb
        q = q.round_() if format == "int8" else q
        return (q.add_(128) if unsigned else q).to(qdtype)  # unsigned: ±127 → 1..255, exact in fp32

    # (inside a compiled graph inductor fuses it all, with no temporary)
    if x.device.type != "cpu" or x.numel() * 4 <= CPU_CHUNK_BYTES or torch.compiler.is_compiling():
        return values(x, scale), scale
    # A large fp32 temporary costs a CPU more than the division: glibc maps allocations over 32 MB afresh and the
    # kernel zero-fills every page (at 512², fc2's (2048, 4608) input: 32 ms whole, 10 ms in 4 MB pieces).
    q = torch.empty(x.shape, dtype=qdtype)
    step = max(1, CPU_CHUNK_BYTES // (4 * x.shape[-1]))
    for i in range(0, x.shape[0], step):
        q[i:i + step] = values(x[i:i + step], scale[i:i + step])
    return q, scale


class DynamicLinear(nn.Module):
    """y = (q(x) @ Wq^T) · sx · sw + b: weights Wq per output channel (scales sw), x per token at each call (sx).

    int8 or fp8 (e4m3, stored as its bytes so float casts leave it alone). Computes in fp32 and returns x's dtype.
    `kernel` overrides `dynamic_kernel`'s choice (benchmarks); "reference" works on every device."""

    def __init__(self, in_features: int, out_features: int, bias: bool, format: str, qmax: float | None = None):
        super().__init__()
        self.in_features, self.out_features, self.format = in_features, out_features, format
        self.qmax = qmax or FORMATS[format][1]
        storage = torch.int8 if format == "int8" else torch.uint8
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=storage), requires_grad=False)
        self.scale = nn.Parameter(torch.empty(out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.kernel: str | None = None
        self.packed: torch.Tensor | None = None  # oneDNN's layout of the weight (CPU), made once
        self.cast_bias: tuple | None = None  # (the bias, its data_ptr, its bf16 copy) for `_scaled_mm`, made once

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """The stored tensors' shapes for a float (out_features, in_features) weight."""
        return {"weight": (out_features, in_features), "scale": (out_features,)}

    def quantize(self, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Per-channel weight and scale of a float (N, K) weight; fp16 keeps the scale in fp32 (its range)."""
        return per_channel(w, torch.float32 if dtype == torch.float16 else dtype, self.format, self.qmax)

    def values(self) -> torch.Tensor:
        """The quantized weight (N, K) as int8 or float8_e4m3fn."""
        return self.weight if self.format == "int8" else self.weight.view(torch.float8_e4m3fn)

    def dequantize(self) -> torch.Tensor:
        """The float weight (N, K) in fp32."""
        return self.values().float() * self.scale.float()[:, None]

    def prepack(self) -> torch.Tensor:
        """oneDNN's packed weight, made on first use (call it before torch.compile, which cannot make it)."""
        if self.packed is None:
            if self.weight.abs().max() > 63:
                raise ValueError("this CPU's int8 kernel (oneDNN without VNNI) needs weights quantized to ±63: load "
                                 "the model onto this CPU with quantization, rather than moving a quantized one here")
            self.packed = torch.ops.onednn.qlinear_prepack(self.weight, None)
        return self.packed

    def bf16_bias(self) -> torch.Tensor | None:
        """The bias as `_scaled_mm` takes it with a bf16 output (bf16), cast once per bias tensor, not per call."""
        bias = self.bias
        if bias is None or bias.dtype == torch.bfloat16:
            return bias
        if torch.compiler.is_compiling():
            return bias.to(torch.bfloat16)  # a compiled graph casts it (and holds no state on the module)
        if self.cast_bias is None or self.cast_bias[0] is not bias or self.cast_bias[1] != bias.data_ptr():
            self.cast_bias = (bias, bias.data_ptr(), bias.to(torch.bfloat16))  # a move or cast changes data_ptr
        return self.cast_bias[2]

    def _load_from_state_dict(self, *args, **kwargs):
        self.packed = self.cast_bias = None  # new weights
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (M, K)
        M, N = rows.shape[0], self.out_features
        kernel = self.kernel or dynamic_kernel(self.format, x.device)
        # one Triton launch quantizes the activations for the GPU kernels (not "reference": e4m3 casts need sm_89, as
        # `_scaled_mm` does); inside a compiled graph, inductor fuses the plain function instead
        triton_quantize = (x.is_cuda and kernel != "reference" and not torch.compiler.is_compiling()
                           and triton_kernels.available(x.device))
        if x.is_cuda and (M <= 16 or rows.shape[1] % 16 or N % 16):
            kernel = "reference"  # cuBLAS int8 / fp8 GEMMs need more than 16 rows and aligned sizes
        # On a GPU the int8 GEMM's element-wise passes (quantizing the activations; scaling, bias and cast of its
        # int32 product) cost more than the GEMM itself unless each is fused into one kernel: on an H100 a block's
        # int8 linears take 2.1 ms fused against 4.1 unfused (bf16: 0.5). fp8's fewer passes are faster unfused
        # (2.0 ms against 3.2: the fused reduction is slow, and each compiled call costs ~0.1 ms of host time).
        fuse = fused if x.is_cuda and kernel == "int_mm" else unfused
        if kernel == "onednn":
            q, sx = quantize_rows(rows, self.format, unsigned=True)
        else:
            q, sx = (triton_kernels.quantize_rows if triton_quantize else fuse(quantize_rows))(rows, self.format)
        sw = self.scale.float()
        if kernel == "scaled_mm":  # rowwise scales need a bf16 output, and then a bf16 bias
            out = torch._scaled_mm(q, self.values().t(), scale_a=sx, scale_b=sw[None], bias=self.bf16_bias(),
                                   out_dtype=torch.bfloat16)
            return out.to(x.dtype).view(*x.shape[:-1], N)
        if kernel == "int_mm" and x.is_cuda:
            return fuse(finish_int)(torch._int_mm(q, self.weight.t()), sx, sw, self.bias, x.dtype).view(
                *x.shape[:-1], N)
        if kernel == "onednn":
            zero = torch.zeros(N, dtype=torch.long)
            out = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, self.prepack(), sw, zero, None, 1.0, 0,
                                                     torch.float32, "none", [], "")  # (M, N) = (q − 128) Wqᵀ sw
        elif kernel == "int_mm":
            out = torch._int_mm(q, self.weight.t()).float().mul_(sw)
        else:  # integers and fp8 values are exact in fp32
            out = F.linear(q.float(), self.values().float()).mul_(sw)
        out = out.mul_(sx)  # in place: a fresh (M, N) fp32 tensor costs more than the product on a CPU
        out = out if self.bias is None else out.add_(self.bias)
        return out.to(x.dtype).view(*x.shape[:-1], N)


def finish_int(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """An int32 product's scales, bias and cast to the activations' dtype."""
    out = acc.float() * sx * sw
    out = out if bias is None else out + bias
    return out.to(dtype)


FUSED: dict = {}


def unfused(fn):
    return fn


def fused(fn):
    """`fn` compiled by inductor, its element-wise passes fused (shapes dynamic, compiled once per process); `fn`
    itself where compiling fails (no Triton, an unsupported platform), with one warning."""
    if fn not in FUSED:
        compiled = torch.compile(fn, dynamic=True)

        def call(*args):
            if torch.compiler.is_compiling():  # inside pipe.compile()'s graph: inductor fuses it there
                return fn(*args)
            try:
                return compiled(*args)
            except Exception as error:  # the compiler's errors have no common type
                logger.warning("pixart: fusing %s failed (%s); using the unfused kernels", fn.__name__, error)
                FUSED[fn] = fn
                return fn(*args)

        FUSED[fn] = call
    return FUSED[fn]


@dataclass(frozen=True)
class DynamicSpec:
    """Dynamic quantization: weights per output channel, activations per token at each call, as int8 or fp8."""

    format: str
    qmax: float | None = None  # None: the format's range; weight_max() narrows it for AVX2

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"dynamic quantization takes one of {', '.join(FORMATS)}, not {self.format!r}")

    @property
    def name(self) -> str:
        return f"{self.format} dynamic"

    def linear(self, in_features: int, out_features: int, bias: bool = False) -> DynamicLinear:
        """An empty dynamic linear layer."""
        return DynamicLinear(in_features, out_features, bias, self.format, self.qmax)


DYNAMIC_QUANTIZATIONS = {name: DynamicSpec(name) for name in FORMATS}


def dynamic_spec(quantization: str | DynamicSpec | None, device: torch.device | str) -> DynamicSpec | None:
    """A DynamicSpec from a name in DYNAMIC_QUANTIZATIONS (or a spec, or None), with the weight range for `device`."""
    if quantization is None:
        return None
    if not isinstance(quantization, DynamicSpec):
        if quantization not in DYNAMIC_QUANTIZATIONS:
            raise ValueError(f"unknown transformer quantization {quantization!r}: choose one of "
                             f"{', '.join(DYNAMIC_QUANTIZATIONS)} or None")
        quantization = DYNAMIC_QUANTIZATIONS[quantization]
    device = torch.device(device)
    if dynamic_kernel(quantization.format, device) == "reference":
        logger.warning("no %s kernel for %s here: the quantized transformer takes less memory but runs slower than "
                       "the float one", quantization.format, device)
    if quantization.qmax is not None:
        return quantization
    return DynamicSpec(quantization.format, weight_max(quantization.format, device))


def prepare_kernels(model: nn.Module) -> None:
    """Choose the dynamic layers' kernels for where they are and pack their weights, before torch.compile traces
    them: a traced graph can neither read the CPU's flags nor make oneDNN's packed weights."""
    for m in model.modules():
        if isinstance(m, DynamicLinear):
            m.kernel = m.kernel or dynamic_kernel(m.format, m.weight.device)
            if m.kernel == "onednn":
                m.prepack()
