"""LoRA: low-rank adapters on linear layers (arXiv 2106.09685), for training and for loading into the pipeline.

A wrapped layer computes y = base(x) + Σ_a weight_a · (alpha_a / rank_a) · B_a(A_a(x)) over its active adapters.
Parameter names follow PEFT's (`<layer>.base_layer.weight`, `<layer>.lora_A.<adapter>.weight`); files use the
diffusers/PEFT key layout `transformer.<layer>.lora_A.weight` with rank, alpha and targets in the metadata.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .components import is_available
from .configs import read_json
from .models.transformer import PixArtTransformer2DModel
from .quant import QUANTIZED
from .weights.files import lazy_tensors
from .weights.hub import resolve

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

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """An adapter with down-projection A (rank, in) and up-projection B (out, rank), active with weight 1."""
        for key, weight in (("lora_A", A), ("lora_B", B)):
            with torch.device("meta"):
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            getattr(self, key)[name] = linear
        self.scaling[name] = scaling
        self.active[name] = 1.0

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """Σ weight · scaling · B @ A over the active adapters, (out, in) in fp32."""
        device = _float_of(self.base_layer).device
        out = torch.zeros(self.out_features, self.in_features, device=device, dtype=torch.float32)
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
        A = nn.init.kaiming_uniform_(torch.empty(rank, layer.in_features, dtype=w.dtype, device=w.device),
                                     a=math.sqrt(5))  # PEFT's initialisation; B = 0 makes the start a no-op
        B = torch.zeros(layer.out_features, rank, dtype=w.dtype, device=w.device)
        layer.add(adapter_name, A, B, alpha / rank)
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


# Loading LoRA files into the pipeline

LORA_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")  # diffusers', PEFT's
# diffusers `transformer.`, PEFT's `base_model.model.`, the original repository's `unet.base_model.model.` or bare
# module names, then `.lora_A.weight`, or `.lora_A.<adapter>.weight` as a PEFT model's own state dict has it
PEFT_KEY = re.compile(r"(?:transformer\.|unet\.base_model\.model\.|base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
# kohya: `lora_unet_<module name, dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`
KOHYA_KEY = re.compile(r"lora_unet_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)")
KOHYA_PARTS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}

Layers = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # layer -> (A (rank, in), B (out, rank), alpha / rank)


def lora_file(source: str | os.PathLike, weight_name: str | None = None, **hub_kwargs) -> Path:
    """The weight file of a LoRA given as a file, a folder or a Hub id (pytorch_lora_weights / adapter_model)."""
    path = Path(source).expanduser()
    if not path.is_file():
        path = resolve(source, **hub_kwargs)
    if path.is_dir():
        names = [weight_name] if weight_name else LORA_FILES
        found = next((path / n for n in names if (path / n).is_file()), None)
        if found is None:
            listing = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
            raise FileNotFoundError(f"no LoRA weights in {source} (it holds: {listing}); expected "
                                    f"{' or '.join(names)}: pass weight_name= to choose the file")
        path = found
    return path


def lora_config(path: Path) -> dict:
    """The LoRA's PEFT config (r, lora_alpha, alpha_pattern, use_rslora): diffusers' safetensors metadata entry,
    else PEFT's adapter_config.json next to the file, else empty (alpha defaults to the rank)."""
    if path.suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            entry = (f.metadata() or {}).get(METADATA_KEY)
        if entry:
            return {k.removeprefix("transformer."): v for k, v in json.loads(entry).items()}
    return read_json(path.parent / "adapter_config.json", {})


def _alpha(module: str, rank: int, config: dict) -> float:
    """PEFT's alpha of one module: the first alpha_pattern matching the end of its name, else lora_alpha."""
    pattern = next((a for p, a in (config.get("alpha_pattern") or {}).items()
                    if re.fullmatch(rf"(.*\.)?({p})", module)), None)
    return float(pattern if pattern is not None else config.get("lora_alpha", rank))


def parse_lora(tensors: dict[str, torch.Tensor], config: dict, layers: dict[str, nn.Module], source: str) -> Layers:
    """Map a LoRA state dict in any of the known key layouts onto the model's linear layers, checking shapes."""
    kohya_names = {name.replace(".", "_"): name for name in layers}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unmatched, lora_keys = [], 0
    for key, tensor in tensors.items():
        peft, kohya = PEFT_KEY.fullmatch(key), KOHYA_KEY.fullmatch(key)
        lora_keys += bool(peft or kohya)
        if peft and peft[1] in layers:
            parts.setdefault(peft[1], {})[peft[2]] = tensor
        elif kohya and kohya[1] in kohya_names:
            parts.setdefault(kohya_names[kohya[1]], {})[KOHYA_PARTS[kohya[2]]] = tensor
        else:
            unmatched.append(key)
    if not lora_keys:
        shown = ", ".join(sorted(tensors)[:5]) or "none"
        raise ValueError(f"no LoRA keys found in {source} (its keys begin: {shown}); expected `<layer>.lora_A.weight` "
                         "(diffusers, PEFT) or kohya's `lora_unet_<layer>.lora_down.weight`")
    if unmatched:
        shown = "\n    ".join(sorted(unmatched)[:20]) + (f"\n    ... and {len(unmatched) - 20} more" if len(unmatched) > 20 else "")
        raise ValueError(f"{len(unmatched)} keys of {source} match no linear layer of the transformer (a LoRA for "
                         f"another model?):\n    {shown}")
    out: Layers = {}
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            raise ValueError(f"{source}: the LoRA of {module} lacks its {'lora_A (down)' if 'A' not in p else 'lora_B (up)'} "
                             "weight: the file is incomplete")
        A, B, layer = p["A"], p["B"], layers[module]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or (B.shape[0], A.shape[1]) != (layer.out_features, layer.in_features):
            raise ValueError(f"{source}: the LoRA of {module} does not fit it: lora_A {tuple(A.shape)} and lora_B "
                             f"{tuple(B.shape)}, layer weight (out, in) = ({layer.out_features}, {layer.in_features}); "
                             "is it a LoRA for another model size?")
        rank = A.shape[0]
        alpha = float(p["alpha"]) if "alpha" in p else _alpha(module, rank, config)
        out[module] = (A, B, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank))
    return out


class Adapters:
    """The LoRAs a pipeline has loaded, their weights and fusion: kept apart from the transformer, so that they
    can be applied again whenever it is loaded (memory="staged" loads it on every call)."""

    def __init__(self):
        self.layers: dict[str, Layers] = {}  # adapter -> its layers
        self.weights: dict[str, float] = {}  # the active adapters and their weights
        self.fused: float | None = None  # lora_scale of fuse_lora(), None when unfused
        self.enabled = True  # disable_lora() turns every adapter off until enable_lora()

    def load(self, source: str | os.PathLike | dict[str, torch.Tensor], layers: dict[str, nn.Module],
             adapter_name: str | None = None, weight_name: str | None = None, **hub_kwargs) -> str:
        """Read a LoRA (file, folder, Hub id or state dict), check it against the model's linear layers; active."""
        name = adapter_name or f"default_{len(self.layers)}"
        if name in self.layers:
            raise ValueError(f"an adapter named {name!r} is already loaded: choose another adapter_name, or "
                             "unload_lora_weights() first")
        if isinstance(source, dict):
            tensors, config, where = source, {}, "the state dict"
        else:
            path = lora_file(source, weight_name, **hub_kwargs)
            tensors = {k: lazy() for k, lazy in lazy_tensors([path]).items()}
            config, where = lora_config(path), str(path)
        self.layers[name] = parse_lora(tensors, config, layers, where)
        self.weights[name] = 1.0
        return name

    def set_adapters(self, names: str | list[str], weights: float | list[float] | None = None) -> None:
        """Make exactly `names` active, with `weights` (one for all, one each, or None for 1.0)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.layers]
        if unknown:
            raise ValueError(f"unknown LoRA adapters {unknown}: the loaded ones are {list(self.layers) or 'none'}")
        if weights is None or isinstance(weights, (int, float)):
            weights = [1.0 if weights is None else weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"set_adapters got {len(names)} adapter names but {len(weights)} weights")
        self.weights = {n: float(w) for n, w in zip(names, weights)}

    def apply(self, model: nn.Module) -> None:
        """Make the model's LoRA layers exactly what this state says (from scratch: unfuse, unwrap, wrap, fuse)."""
        remove_lora(model)
        wrapped: dict[str, LoRALinear] = {}
        for adapter, layers in self.layers.items():
            for module, (A, B, scaling) in layers.items():
                layer = wrapped.setdefault(module, wrap(model, module))
                w = _float_of(layer.base_layer)
                layer.add(adapter, A.to(w.device, w.dtype), B.to(w.device, w.dtype), scaling)
        for layer in wrapped.values():
            layer.active = {n: w for n, w in self.weights.items() if n in layer.lora_A} if self.enabled else {}
            if self.fused is not None and self.enabled:
                layer.fuse(self.fused)


class LoraLoaderMixin:
    """The pipeline's LoRA methods (diffusers' names); the adapters live in `self.lora` and are re-applied to the
    transformer whenever it loads."""

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
                          adapter_name: str | None = None, weight_name: str | None = None, **hub_kwargs: Any) -> str:
        """Add a LoRA to the transformer (file, folder, Hub id or state dict; diffusers, PEFT or kohya keys).

        It is active with weight 1 next to those loaded before; returns its adapter name (default_0, default_1...)."""
        if not is_available(self, "transformer"):
            raise ValueError("this pipeline has no transformer to add a LoRA to (it was loaded with transformer=None)")
        module = self._loaded.get("transformer")
        if module is None:  # staged: check the LoRA against the layer shapes of a weightless model
            with torch.device("meta"):
                module = PixArtTransformer2DModel(self.model_config("transformer"))
        name = self.lora.load(pretrained_model_name_or_path_or_dict, linear_layers(module), adapter_name, weight_name,
                              **hub_kwargs)
        self._apply_lora()
        return name

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Use exactly these loaded adapters, each scaled by its weight (default 1.0)."""
        self.lora.set_adapters(adapter_names, adapter_weights)
        self._apply_lora()

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        """Merge the active adapters (times lora_scale) into the transformer's weights: no cost per step. A quantized
        transformer (integer weights) cannot take them: a ValueError, and the adapters stay as they were."""
        if self._loaded.get("transformer") is None and self._transformer_quantization is not None:
            raise ValueError(f"cannot fuse a LoRA into the {self._transformer_quantization} transformer this pipeline "
                             "loads (its weights are integers): keep the LoRA unfused, or load the pipeline without "
                             "transformer_quantization")
        previous, self.lora.fused = self.lora.fused, lora_scale
        try:
            self._apply_lora()
        except ValueError:
            self.lora.fused = previous
            self._apply_lora()
            raise

    def unfuse_lora(self) -> None:
        """Restore the weights fuse_lora changed, exactly; the adapters stay active, unfused."""
        self.lora.fused = None
        self._apply_lora()

    def get_active_adapters(self) -> list[str]:
        """The adapters in use (set_adapters' names), in order."""
        return list(self.lora.weights) if self.lora.enabled else []

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Every loaded adapter, by the component that holds it (diffusers' layout: only the transformer here)."""
        return {"transformer": list(self.lora.layers)} if self.lora.layers else {}

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Remove these adapters (their layers and weights); the others stay as they were."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.lora.layers]
        if unknown:
            raise ValueError(f"unknown LoRA adapters {unknown}: the loaded ones are {list(self.lora.layers) or 'none'}")
        for name in names:
            del self.lora.layers[name]
            self.lora.weights.pop(name, None)
        self._apply_lora()

    def disable_lora(self) -> None:
        """Turn every adapter off (the base model's output) until enable_lora(); nothing is unloaded."""
        self.lora.enabled = False
        self._apply_lora()

    def enable_lora(self) -> None:
        """Turn the adapters back on, as set_adapters and fuse_lora left them."""
        self.lora.enabled = True
        self._apply_lora()

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the transformer gets its original layers and weights back."""
        self.lora = Adapters()
        self._apply_lora()

    def _apply_lora(self) -> None:
        if self._loaded.get("transformer") is not None:
            self.lora.apply(self._loaded["transformer"])
