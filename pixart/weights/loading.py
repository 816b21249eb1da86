"""Build a model on the meta device and fill it from lazily read tensors, strictly, casting once."""
from __future__ import annotations

import dataclasses
import fnmatch
import os
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from safetensors.torch import save_file
from torch import nn

from .files import Lazy, WeightsError, lazy_tensors, weight_files
from .hub import hub_options, resolve


def check_keys(expected: dict[str, torch.Size], found: dict[str, torch.Size | None], source: str) -> None:
    """Raise a WeightsError listing every missing, unexpected and mis-shaped key (shape None: not checked)."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    shapes = sorted(
        f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in expected.keys() & found.keys()
        if found[k] is not None and tuple(found[k]) != tuple(expected[k])
    )
    if not (missing or unexpected or shapes):
        return
    parts = [f"the weights in {source} do not fit the model config"]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if keys:
            shown = "\n    ".join(keys[:20]) + (f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else "")
            parts.append(f"  {title} ({len(keys)}):\n    {shown}")
    parts.append("  Fix: check that config.json belongs to these weights, or re-download the model.")
    raise WeightsError("\n".join(parts))


def load_into(
    build: Callable[[], nn.Module],
    tensors: dict[str, Lazy],
    source: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    keep_fp32: tuple[str, ...] = (),
) -> nn.Module:
    """Build on meta, check the keys, then read, cast (default fp32) and assign one tensor at a time."""
    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = build()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    found = {k: getattr(lazy, "shape", None) for k, lazy in tensors.items()}
    check_keys(expected, found, source)
    loaded: dict[str, torch.Tensor] = {}
    for key in expected:
        t = tensors[key]()
        if tuple(t.shape) != tuple(expected[key]):
            check_keys(expected, {**found, key: t.shape}, source)
        target = torch.float32 if _keeps_fp32(key, dtype, keep_fp32) else dtype
        loaded[key] = t.to(device=device, dtype=target if t.is_floating_point() else t.dtype)
    model.load_state_dict(loaded, strict=True, assign=True)
    return model.eval()


def _keeps_fp32(key: str, dtype: torch.dtype, keep_fp32: tuple[str, ...]) -> bool:
    return dtype == torch.float16 and any(fnmatch.fnmatch(key, p) for p in keep_fp32)


def dtype_keyword(torch_dtype: torch.dtype | None, kwargs: dict[str, Any]) -> torch.dtype | None:
    """`torch_dtype`, or diffusers' newer spelling `dtype` (taken out of kwargs); both, and different, is an error."""
    dtype = kwargs.pop("dtype", None)
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise TypeError(f"from_pretrained() got torch_dtype={torch_dtype} and dtype={dtype}: pass one of them")
    return torch_dtype if torch_dtype is not None else dtype


class PretrainedModel(nn.Module):
    """from_pretrained / save_pretrained for a module built from a frozen config dataclass."""

    config_class: ClassVar[type]
    weights_name: ClassVar[str] = "diffusion_pytorch_model.safetensors"
    keep_fp32: ClassVar[tuple[str, ...]] = ()  # parameter patterns kept in fp32 when loading in fp16

    config: Any

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        variant: str | None = None,
        **kwargs: Any,
    ):
        """Load from a model folder (or a pipeline folder + subfolder, or a Hub id; Hub keywords as diffusers'); other
        keywords override config fields."""
        folder, torch_dtype = cls.locate(path_or_id, subfolder, torch_dtype, kwargs, variant)
        folder, config, tensors = cls.read_folder(folder, variant, kwargs)
        return cls.from_state(config, tensors, str(folder), torch_dtype, device)

    @staticmethod
    def locate(path_or_id: str | os.PathLike, subfolder: str | None, torch_dtype: torch.dtype | None,
               kwargs: dict[str, Any], variant: str | None = None) -> tuple[Path, torch.dtype | None]:
        """from_pretrained's model folder (for a Hub id: with `variant`'s weights only) and dtype, taking the Hub
        keywords and `dtype=` out of `kwargs` (what stays overrides config fields)."""
        torch_dtype = dtype_keyword(torch_dtype, kwargs)
        return resolve(path_or_id, subfolder, variant=variant, **hub_options(kwargs)), torch_dtype

    @classmethod
    def load_config(cls, path_or_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any) -> Any:
        """The config.json of a model folder or Hub id (diffusers' `load_config`), as this model's config."""
        return cls.config_class.from_json(resolve(path_or_id, subfolder, **hub_options(hub_kwargs)) / "config.json")

    @classmethod
    def from_config(cls, config: Any, **overrides: Any):
        """A new, randomly initialised model of `config` (ours, or a diffusers config dict), as diffusers'."""
        if not isinstance(config, cls.config_class):
            config = cls.config_class.from_dict(dict(config))
        return cls(config.replace(**overrides) if overrides else config)

    @classmethod
    def read_folder(cls, folder: Path, variant: str | None,
                    config_overrides: dict[str, Any]) -> tuple[Path, Any, dict[str, Lazy]]:
        """A model folder's config (with overrides) and its weights as lazy tensors in our key names."""
        config = cls.config_class.from_json(folder / "config.json")
        unknown = sorted(set(config_overrides) - {f.name for f in dataclasses.fields(config)})
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword arguments: {', '.join(unknown)} (neither a "
                            f"loading option nor a field of {type(config).__name__})")
        if config_overrides:
            config = config.replace(**config_overrides)
        return folder, config, cls.map_keys(lazy_tensors(weight_files(folder, variant)))

    @classmethod
    def map_keys(cls, tensors: dict[str, Lazy]) -> dict[str, Lazy]:
        """Rename the keys of other layouts of this model's files to ours (identity by default)."""
        return tensors

    @classmethod
    def from_state(cls, config: Any, tensors: dict[str, Lazy], source: str = "the state dict",
                   torch_dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        """Load from key -> lazy tensor in this model's own key names."""
        return load_into(lambda: cls(config), tensors, source, torch_dtype, device, cls.keep_fp32)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json and the weights as safetensors (diffusers / transformers layout); a fused LoRA is saved
        merged into the weights, unfused adapters are refused. The weights file is replaced whole or not at all."""
        state = self.state_to_save()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (self.weights_name + ".tmp")
        try:
            save_file(state, str(tmp), metadata={"format": "pt"})  # what fails on a full disk: nothing replaced yet
            self.config.save(folder / "config.json")
            os.replace(tmp, folder / self.weights_name)
        finally:
            tmp.unlink(missing_ok=True)

    def state_to_save(self) -> dict[str, torch.Tensor]:
        """The weights in the model's own key names: a fused LoRA's layers as their merged base weights."""
        for name, module in self.named_modules():  # pixart.lora.LoRALinear, by its attributes (lora imports us)
            if hasattr(module, "lora_A") and module.active and module.unfused is None:
                raise ValueError(f"{name} has LoRA adapters that are not fused: fuse_lora() to save them merged "
                                 "into the weights, or unload_lora_weights() to save the model without them")
        return {k.replace(".base_layer.", "."): v.detach().contiguous() for k, v in self.state_dict().items()
                if ".lora_A." not in k and ".lora_B." not in k}

    def cast(self, dtype: torch.dtype) -> "PretrainedModel":
        """Cast the floating-point parameters to dtype, keeping `keep_fp32` ones in fp32 for fp16."""
        for key, p in self.named_parameters():
            if not p.is_floating_point():
                continue  # the integer weights of quantized layers
            target = torch.float32 if _keeps_fp32(key, dtype, self.keep_fp32) else dtype
            p.data = p.data.to(target)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
