"""Quantized linear layers, and quantizing a model's linears while its weights load (REFERENCE §10).

Weight-only (T5): stored as plain tensors, so a quantized model saves to safetensors and loads on any device: int8
weights with one scale per output channel; int4 weights two to a byte with a scale and zero point per group of input
features. On CPU with bf16/fp16 activations the forward uses torch's fused kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`); elsewhere (fp32 activations, CUDA) it dequantizes one layer and calls `F.linear`.

Dynamic (the transformer): int8 or fp8 weights per output channel, activations quantized per token at each call,
multiplied by an integer / fp8 kernel: what makes the transformer faster, not only smaller. The kernel is chosen per
device by `dynamic_kernel` from measurements (bench/quant.py); a reference path that is correct everywhere is kept.
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hardware import cpu_has_int8_dot
from .weights.files import Lazy, WeightsError

METHOD = "weight_only"
GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's int4 kernels take


@dataclass(frozen=True)
class QuantSpec:
    """Weight-only quantization: 8 bits per output channel, or 4 bits per group of `group_size` input features."""

    bits: int
    group_size: int | None = None

    def __post_init__(self):
        if not ((self.bits == 8 and self.group_size is None) or (self.bits == 4 and self.group_size in GROUP_SIZES)):
            raise ValueError(f"weight-only quantization takes bits=8 (no group size) or bits=4 with a group size "
                             f"in {GROUP_SIZES}, not bits={self.bits}, group_size={self.group_size}")

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f" (group {self.group_size})" if self.group_size else "")

    def to_dict(self) -> dict[str, Any]:
        """The `quantization` entry of a quantized model's config.json."""
        return {"method": METHOD, "bits": self.bits, "group_size": self.group_size}

    def linear(self, in_features: int, out_features: int, bias: bool = False) -> "Int8Linear | Int4Linear":
        """An empty quantized linear layer of this kind."""
        if bias:
            raise ValueError("weight-only quantization here takes linear layers without bias")
        if self.bits == 8:
            return Int8Linear(in_features, out_features)
        return Int4Linear(in_features, out_features, self.group_size)


QUANTIZATIONS = {"int8": QuantSpec(8), "int4": QuantSpec(4, 128)}


def quant_spec(quantization: str | QuantSpec | None) -> QuantSpec | None:
    """A QuantSpec from a name in QUANTIZATIONS (or a QuantSpec, or None for no quantization)."""
    if quantization is None or isinstance(quantization, QuantSpec):
        return quantization
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)} or None")
    return QUANTIZATIONS[quantization]


def read_spec(config_path: Path) -> QuantSpec | None:
    """The quantization recorded in a model's config.json, None for a float model."""
    entry = json.loads(config_path.read_text()).get("quantization") if config_path.is_file() else None
    if entry is None:
        return None
    try:
        if entry["method"] != METHOD:
            raise ValueError(f"method {entry['method']!r} is not {METHOD!r}")
        return QuantSpec(entry["bits"], entry.get("group_size"))
    except (TypeError, KeyError, ValueError) as e:
        raise WeightsError(f"{config_path} has a quantization entry we cannot read ({e}): {entry!r}. "
                           "Fix: quantize the float model again and save it") from None


def write_spec(config_path: Path, spec: QuantSpec) -> None:
    """Add the `quantization` entry to a saved config.json."""
    config = json.loads(config_path.read_text())
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**config, "quantization": spec.to_dict()}, indent=2) + "\n")
    tmp.replace(config_path)


# format -> (the dtype of its values, the largest value)
FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}


def per_channel(w: torch.Tensor, dtype: torch.dtype, format: str, qmax: float) -> dict[str, torch.Tensor]:
    """Symmetric quantization of a float (N, K) weight, one scale per output channel rounded to dtype first.

    fp8 values are returned as their bytes (uint8), so that casting a model to a float dtype leaves them alone."""
    w = w.to(torch.float32, copy=True)  # one copy, then in place: the XXL's wi is 168 MB in fp32
    scale = (w.abs().amax(1) / qmax).clamp(min=1e-12).to(dtype)
    q = w.div_(scale.float()[:, None]).clamp_(-qmax, qmax)
    if format == "int8":
        return {"weight": q.round_().to(torch.int8), "scale": scale}
    return {"weight": q.to(torch.float8_e4m3fn).view(torch.uint8), "scale": scale}


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _fused_cpu(x: torch.Tensor) -> bool:
    """torch's fused CPU kernels are vectorised for half activations; their fp32 path is far slower than F.linear."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


class Int8Linear(nn.Module):
    """y = (x @ q^T) * scale: int8 weights q in [-127, 127], one scale per output channel; no bias."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.scale = nn.Parameter(torch.empty(out_features), requires_grad=False)

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """The stored tensors' shapes for a float (out_features, in_features) weight."""
        return {"weight": (out_features, in_features), "scale": (out_features,)}

    def quantize(self, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Symmetric per-channel int8 of a float (N, K) weight; q is rounded against the scale as stored in dtype."""
        return per_channel(w, dtype, "int8", 127)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.dtype)  # the layer computes in its scale's dtype (fp32 for T5's wo under fp16)
        if _fused_cpu(x):
            return torch._weight_int8pack_mm(_rows(x), self.weight, self.scale).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight.to(x.dtype)) * self.scale  # int8 values are exact in bf16 and fp16


class Int4Linear(nn.Module):
    """Asymmetric int4 groups along the input: w = (q - 8) * scale + zeros, q in [0, 15] two to a byte; no bias.

    The (q - 8) * scale + zeros form is the one torch's int4 kernels take (`scales_and_zeros`). In the byte, the
    low nibble is the even input feature. Storage is 4 bits plus 2 fp numbers per group: ~1/7.5 of fp32 for group
    128 with bf16 scales."""

    def __init__(self, in_features: int, out_features: int, group_size: int):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"int4 groups of {group_size} do not divide the {in_features} input features of a "
                             "linear layer: choose a group size that does")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8),
                                   requires_grad=False)
        self.scale = nn.Parameter(torch.empty(out_features, groups), requires_grad=False)
        self.zeros = nn.Parameter(torch.empty(out_features, groups), requires_grad=False)

    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """The stored tensors' shapes for a float (out_features, in_features) weight."""
        groups = (out_features, in_features // self.group_size)
        return {"weight": (out_features, in_features // 2), "scale": groups, "zeros": groups}

    def quantize(self, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Min-max int4 per group of a float (N, K) weight; q is rounded against scale and zeros as stored in dtype."""
        N, K = w.shape
        g = w.to(torch.float32, copy=True).view(N, K // self.group_size, self.group_size)  # then in place
        low, high = g.amin(-1), g.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-12).to(dtype)
        zeros = (low + 8 * scale.float()).to(dtype)
        low = zeros.float() - 8 * scale.float()  # the q = 0 value that dequantization will use
        q = g.sub_(low[..., None]).div_(scale.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8).view(N, K)
        return {"weight": q[:, 0::2] | (q[:, 1::2] << 4), "scale": scale, "zeros": zeros}

    def unpacked(self) -> torch.Tensor:
        """The 4-bit values, one per byte: (N, K) in [0, 15]."""
        return torch.stack([self.weight & 15, self.weight >> 4], -1).view(self.weight.shape[0], -1)

    def dequantize(self) -> torch.Tensor:
        """The float weight (N, K) in fp32."""
        N = self.weight.shape[0]
        q = self.unpacked().view(N, -1, self.group_size).float()  # (N, groups, group_size)
        scale = self.scale.float()[..., None]
        return torch.addcmul(self.zeros.float()[..., None] - 8 * scale, q, scale).view(N, -1)  # one pass over q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.dtype)
        if _fused_cpu(x) and self.weight.shape[0] % 16 == 0:  # the CPU packing takes N divisible by 16
            # the kernel's packed layout depends on the CPU's vector width, so it is made here, not stored
            packed = torch._convert_weight_to_int4pack_for_cpu(self.unpacked().int(), 1)
            scales_and_zeros = torch.stack([self.scale, self.zeros], -1).transpose(0, 1).contiguous()  # (G, N, 2)
            out = torch._weight_int4pack_mm_for_cpu(_rows(x), packed, self.group_size, scales_and_zeros)
            return out.view(*x.shape[:-1], -1)
        return F.linear(x, self.dequantize().to(x.dtype))


def dynamic_kernel(format: str, device: torch.device) -> str:
    """The kernel a dynamic layer uses on `device`: the fastest measured (bench/quant.py), else "reference".

    x86 CPUs: with VNNI/AMX, `torch._int_mm` (1.45× bf16 on a Zen 4, issue 6); without (AVX2), oneDNN's qlinear
    (1.5-2× fp32 here), as `_int_mm` has no AVX2 kernel there (50× slower than fp32). CUDA: `_int_mm` (int8 tensor
    cores) and `_scaled_mm` for fp8 from compute capability 8.9 (Ada, Hopper)."""
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


def quantize_rows(x: torch.Tensor, format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of (M, K) floats: the values (M, K) and fp32 scales (M, 1)."""
    qdtype, qmax = FORMATS[format]
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
    q = x / scale  # within ±qmax up to a rounding error, which round() and the fp8 cast absorb
    return (q.round_() if format == "int8" else q).to(qdtype), scale


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

    def _load_from_state_dict(self, *args, **kwargs):
        self.packed = None  # new weights
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)  # (M, K)
        M, N = rows.shape[0], self.out_features
        kernel = self.kernel or dynamic_kernel(self.format, x.device)
        if x.is_cuda and (M <= 16 or rows.shape[1] % 16 or N % 16):
            kernel = "reference"  # cuBLAS int8 / fp8 GEMMs need more than 16 rows and aligned sizes
        q, sx = quantize_rows(rows, self.format)
        sw = self.scale.float()
        if kernel == "onednn":
            zero = torch.zeros(N, dtype=torch.long)
            out = torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, self.prepack(), sw, zero, None, 1.0, 0,
                                                     torch.float32, "none", [], "") * sx  # (M, N) = q Wqᵀ sw
        elif kernel == "int_mm":
            out = torch._int_mm(q, self.weight.t()) * sx * sw
        elif kernel == "scaled_mm":  # rowwise scales need a bf16 output
            out = torch._scaled_mm(q, self.values().t(), scale_a=sx, scale_b=sw[None], out_dtype=torch.bfloat16)
        else:
            out = F.linear(q.float(), self.values().float()) * sx * sw  # integers and fp8 values are exact in fp32
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).view(*x.shape[:-1], N)


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
    if quantization.qmax is not None:
        return quantization
    return DynamicSpec(quantization.format, weight_max(quantization.format, torch.device(device)))


def prepare_kernels(model: nn.Module) -> None:
    """Choose the dynamic layers' kernels for where they are and pack their weights, before torch.compile traces
    them: a traced graph can neither read the CPU's flags nor make oneDNN's packed weights."""
    for m in model.modules():
        if isinstance(m, DynamicLinear):
            m.kernel = m.kernel or dynamic_kernel(m.format, m.weight.device)
            if m.kernel == "onednn":
                m.prepack()


QUANTIZED = (Int8Linear, Int4Linear, DynamicLinear)


def quantize_linears(model: nn.Module, spec: QuantSpec | DynamicSpec, prefix: str = "") -> dict[str, nn.Module]:
    """Replace every nn.Linear of model by an empty quantized layer; returns them by module name (after prefix)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, spec.linear(child.in_features, child.out_features, child.bias is not None))
    return {prefix + name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED)}


def quantize_lazily(tensors: dict[str, Lazy], layers: dict[str, nn.Module], dtype: torch.dtype) -> dict[str, Lazy]:
    """Float `{layer}.weight` tensors -> lazily quantized `{layer}.weight/.scale/.zeros`.

    Reading a layer's first part reads its float weight, quantizes it and drops it; the other parts come from a
    one-layer cache. A loader that reads keys in module order (ours does) thus holds one float weight at a time."""
    out = dict(tensors)

    @lru_cache(maxsize=1)
    def quantized(name: str) -> dict[str, torch.Tensor]:
        w = tensors[f"{name}.weight"]()
        if not w.is_floating_point():
            raise WeightsError(f"{name}.weight is stored as {w.dtype}, not as floats: the folder holds an already "
                               "quantized model whose config.json lost its quantization entry; save it again")
        return layers[name].quantize(w, dtype)

    for name, layer in layers.items():
        lazy = out.pop(f"{name}.weight", None)
        if lazy is None:
            continue  # the loader reports the missing key
        parts = layer.shapes(layer.out_features, layer.in_features)
        # shapes as the float weight in the file would give them, so a mis-shaped one fails before it is read
        found = layer.shapes(*lazy.shape) if len(lazy.shape or ()) == 2 else dict.fromkeys(parts, lazy.shape)
        for part in parts:
            out[f"{name}.{part}"] = Lazy(lambda name=name, part=part: quantized(name)[part], found[part])
    return out


def check_stored(tensors: dict[str, Lazy], layers: dict[str, nn.Module], source: str) -> dict[str, Lazy]:
    """Wrap the stored quantized weights so that one stored in another dtype fails with a WeightsError."""
    out = dict(tensors)

    def checked(key: str, lazy: Lazy, dtype: torch.dtype) -> Lazy:
        def read() -> torch.Tensor:
            t = lazy()
            if t.dtype != dtype:
                raise WeightsError(f"{source}: {key} is stored as {t.dtype}, but its config.json says the model is "
                                   f"quantized, which stores it as {dtype}: the folder is corrupt; quantize it again")
            return t

        return Lazy(read, lazy.shape)

    for name, layer in layers.items():
        key = f"{name}.weight"
        if key in out:
            out[key] = checked(key, out[key], layer.weight.dtype)
    return out
