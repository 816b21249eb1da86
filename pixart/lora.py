"""LoRA: low-rank adapters on linear layers (arXiv 2106.09685), for training and for loading into the pipeline.

A wrapped layer computes y = base(x) + Σ_a weight_a · (alpha_a / rank_a) · B_a(A_a(x)) over its active adapters.
Parameter names follow PEFT's (`<layer>.base_layer.weight`, `<layer>.lora_A.<adapter>.weight`); files use the
diffusers/PEFT key layout `transformer.<layer>.lora_A.weight` with rank, alpha and targets in the metadata.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file
from torch import nn

from .quant import QUANTIZED

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # module-name suffixes
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry: the PEFT LoraConfig as JSON


class LoRALinear(nn.Module):
    """A linear layer (float or weight-only quantized) plus named low-rank adapters, each with a weight."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ModuleDict()  # adapter -> Linear(in, rank)
        self.lora_B = nn.ModuleDict()  # adapter -> Linear(rank, out)
        self.scaling: dict[str, float] = {}  # adapter -> alpha / rank
        self.active: dict[str, float] = {}  # adapter -> its weight (set_adapters); inactive ones are absent
        self.register_buffer("unfused", None, persistent=False)  # the base weight before fuse(), None when unfused

    def add(self, name: str, rank: int, scaling: float, dtype: torch.dtype, device: torch.device) -> None:
        """A new adapter, active with weight 1: A as PEFT initialises it (Kaiming-uniform), B zero."""
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.scaling[name] = scaling
        self.active[name] = 1.0

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """Σ weight · scaling · B @ A over the active adapters, (out, in) in fp32."""
        w = self.lora_B[next(iter(self.lora_B))].weight
        out = torch.zeros(self.out_features, self.in_features, device=w.device, dtype=torch.float32)
        for name, weight in self.active.items():
            factor = scale * weight * self.scaling[name]
            out.addmm_(self.lora_B[name].weight.float(), self.lora_A[name].weight.float(), alpha=factor)
        return out

    def fuse(self, scale: float = 1.0) -> None:
        """Merge the active adapters (times `scale`) into the base weight, keeping the original to unfuse exactly."""
        if isinstance(self.base_layer, QUANTIZED):
            raise ValueError("cannot fuse a LoRA into a quantized layer (its weights are integers): keep the "
                             "LoRA unfused, or load the model unquantized")
        if self.unfused is not None:
            raise ValueError("the LoRA is already fused: call unfuse_lora() first")
        weight = self.base_layer.weight
        self.unfused = weight.data
        weight.data = (weight.data.float() + self.delta(scale)).to(weight.dtype)

    def unfuse(self) -> None:
        """Put back the base weight saved by fuse(), bit for bit."""
        if self.unfused is not None:
            self.base_layer.weight.data = self.unfused.to(self.base_layer.weight.dtype)
            self.unfused = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.unfused is not None:
            return out
        for name, weight in self.active.items():
            A, B = self.lora_A[name], self.lora_B[name]
            out = out + B(A(x.to(A.weight.dtype))).to(out.dtype) * (weight * self.scaling[name])
        return out


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> every linear layer LoRA can wrap (float, quantized, or already wrapped), not looking inside."""
    out: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if isinstance(child, (nn.Linear, LoRALinear, *QUANTIZED)):
                out[prefix + name] = child
            else:
                walk(child, f"{prefix}{name}.")

    walk(model, "")
    return out


def matches(name: str, targets: Iterable[str]) -> bool:
    """Whether a module name ends with one of the dotted suffixes in `targets`."""
    return any(name == t or name.endswith("." + t) for t in targets)


def wrap(model: nn.Module, name: str) -> LoRALinear:
    """The LoRALinear at `name`, replacing the plain linear layer there on first use."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = parent.get_submodule(child)
    if not isinstance(layer, LoRALinear):
        layer = LoRALinear(layer)
        parent.register_module(child, layer)
    return layer


def remove_lora(model: nn.Module) -> None:
    """Unfuse and unwrap every LoRA layer: the model gets its original linear modules back."""
    for name, layer in linear_layers(model).items():
        if isinstance(layer, LoRALinear):
            layer.unfuse()
            parent_name, _, child = name.rpartition(".")
            (model.get_submodule(parent_name) if parent_name else model).register_module(child, layer.base_layer)


def _float_of(layer: nn.Module) -> torch.Tensor:
    """A floating-point parameter of a (possibly quantized) linear layer: it tells LoRA's dtype and device."""
    return layer.scale if isinstance(layer, QUANTIZED) else layer.weight


def inject_lora(model: nn.Module, rank: int, alpha: float, targets: Iterable[str] = DEFAULT_TARGETS,
                adapter_name: str = "default") -> list[str]:
    """Wrap the linear layers whose names end with a target; only the LoRA parameters keep requires_grad."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
    targets = tuple(targets)
    names = [name for name in linear_layers(model) if matches(name, targets)]
    if not names:
        raise ValueError(f"no linear layer of the model ends with one of the LoRA targets {list(targets)}")
    model.requires_grad_(False)
    for name in names:
        layer = wrap(model, name)
        if adapter_name in layer.lora_A:
            raise ValueError(f"{name} already has a LoRA adapter named {adapter_name!r}")
        w = _float_of(layer.base_layer)
        layer.add(adapter_name, rank, alpha / rank, w.dtype, w.device)
        layer.lora_A[adapter_name].requires_grad_(True)
        layer.lora_B[adapter_name].requires_grad_(True)
    return names


def lora_state_dict(model: nn.Module, adapter_name: str = "default", prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """One adapter's weights in the diffusers/PEFT key layout: `transformer.<layer>.lora_A.weight`."""
    out = {}
    for name, layer in linear_layers(model).items():
        if isinstance(layer, LoRALinear) and adapter_name in layer.lora_A:
            out[f"{prefix}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach()
            out[f"{prefix}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach()
    if not out:
        raise ValueError(f"the model has no LoRA adapter named {adapter_name!r}")
    return out


def save_lora(path: str | os.PathLike, state: dict[str, torch.Tensor], rank: int, alpha: float,
              targets: Iterable[str]) -> None:
    """Write a LoRA state dict as safetensors, with rank, alpha and targets in diffusers' metadata entry."""
    config = {"transformer.r": rank, "transformer.lora_alpha": alpha, "transformer.target_modules": list(targets)}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, sort_keys=True)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
