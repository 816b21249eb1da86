"""Quantized linear layers, and quantizing a model's linears while its weights load (REFERENCE §10).

Weight-only (T5): stored as plain tensors, so a quantized model saves to safetensors and loads on any device: int8
weights with one scale per output channel; int4 weights two to a byte with a scale and zero point per group of input
features. On CPU with bf16/fp16 activations the forward uses torch's fused kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`); elsewhere (fp32 activations, CUDA) it dequantizes a few rows of the weight at a
time and calls `F.linear` on each.

Dynamic (the transformer): in quant_dynamic.py; this module's loading helpers serve both kinds.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .configs import read_json, write_json
from .quant_dynamic import DynamicLinear, DynamicSpec, per_channel
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
    entry = read_json(config_path, {}).get("quantization")
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
    config = read_json(config_path)
    write_json(config_path, {**config, "quantization": spec.to_dict()})


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


PIECE_BYTES = 32 * 2**20  # the most float weight a dequantizing forward makes at once


def in_pieces(x: torch.Tensor, out_features: int, weight_rows: Callable[[slice], torch.Tensor],
              scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w) (times a per-output `scale`) with w made by `weight_rows(rows)` a few output rows at a time:
    the float copy of a quantized weight never exists whole (T5-XXL's 10240x4096 wi is 168 MB in fp32, and
    dequantizing int4 makes three such tensors)."""
    step = max(1, PIECE_BYTES // (x.shape[-1] * x.element_size()))
    outs = []
    for start in range(0, out_features, step):
        rows = slice(start, min(start + step, out_features))
        out = F.linear(x, weight_rows(rows))
        outs.append(out if scale is None else out * scale[rows])
    return outs[0] if len(outs) == 1 else torch.cat(outs, -1)


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
        # int8 values are exact in bf16 and fp16
        return in_pieces(x, self.out_features, lambda rows: self.weight[rows].to(x.dtype), self.scale)


class Int4Linear(nn.Module):
    """Asymmetric int4 groups along the input: w = (q - 8) * scale + zeros, q in [0, 15] two to a byte; no bias.

    The (q - 8) * scale + zeros form is the one torch's int4 kernels take (`scales_and_zeros`). In the byte, the
    low nibble is the even input feature. Storage is 4 bits plus 2 fp numbers per group: ~1/7.5 of fp32 for group
    128 with bf16 scales."""

    def __init__(self, in_features: int, out_features: int, group_size: int):
        super().__init__()
        if in_features % group_size:
            fits = [g for g in GROUP_SIZES if in_features % g == 0]
            fix = (f"QuantSpec(4, {fits[-1]}) in Python, whose groups do" if fits else "no int4 group size does")
            raise ValueError(f"int4 groups of {group_size} do not divide the {in_features} input features of a "
                             f"linear layer of this model: quantize it to int8 instead (--quantize-text-encoder int8), "
                             f"or {fix}")
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

    def unpacked(self, rows: slice = slice(None)) -> torch.Tensor:
        """The 4-bit values of `rows`, one per byte: (N, K) in [0, 15]."""
        weight = self.weight[rows]
        return torch.stack([weight & 15, weight >> 4], -1).view(weight.shape[0], -1)

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """The float weight (N, K), or its `rows`, in fp32."""
        q = self.unpacked(rows)
        q = q.view(q.shape[0], -1, self.group_size).float()  # (N, groups, group_size)
        scale = self.scale[rows].float()[..., None]
        return torch.addcmul(self.zeros[rows].float()[..., None] - 8 * scale, q, scale).flatten(1)  # one pass over q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.dtype)
        if _fused_cpu(x) and self.weight.shape[0] % 16 == 0:  # the CPU packing takes N divisible by 16
            # the kernel's packed layout depends on the CPU's vector width, so it is made here, not stored
            packed = torch._convert_weight_to_int4pack_for_cpu(self.unpacked().int(), 1)
            scales_and_zeros = torch.stack([self.scale, self.zeros], -1).transpose(0, 1).contiguous()  # (G, N, 2)
            out = torch._weight_int4pack_mm_for_cpu(_rows(x), packed, self.group_size, scales_and_zeros)
            return out.view(*x.shape[:-1], -1)
        return in_pieces(x, self.out_features, lambda rows: self.dequantize(rows).to(x.dtype))


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
