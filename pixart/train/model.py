"""The model side of training: building the transformer (PixArt's init, LoRA), its EMA, and writing the result."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from ..configs import TransformerConfig
from ..lora import DEFAULT_TARGETS, inject_lora, lora_state_dict, save_lora
from ..models.transformer import PixArtTransformer2DModel

RAW_VARIANT = "raw"  # diffusion_pytorch_model.raw.safetensors / pytorch_lora_weights.raw.safetensors: without EMA
LORA_FILE = "pytorch_lora_weights.safetensors"
OTHER_COMPONENTS = ("tokenizer", "text_encoder", "vae", "scheduler")


@torch.no_grad()
def init_weights(model: PixArtTransformer2DModel) -> None:
    """PixArt-α's initialisation for training from scratch: Xavier linears, small embedders, zeroed outputs."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    embedders = [model.adaln_single, *([model.caption_projection] if model.caption_projection else [])]
    for module in (m for e in embedders for m in e.modules()):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
    for block in model.transformer_blocks:  # each block starts as the identity on the caption path
        nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(block.attn2.to_out[0].bias)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)


def build_model(model: str | None, config: str | None, seed: int, lora_rank: int = 0, lora_alpha: float | None = None,
                lora_targets: tuple[str, ...] | None = None) -> PixArtTransformer2DModel:
    """The transformer to train, fp32 on the CPU: a pipeline folder's, or a fresh one from a config; LoRA-wrapped
    when lora_rank > 0. The random parts come from `seed`, the same on every rank and after a resume."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if config is None:
            net = PixArtTransformer2DModel.from_pretrained(model, subfolder="transformer", torch_dtype=torch.float32)
        else:
            path = Path(config)
            net = PixArtTransformer2DModel(TransformerConfig.from_json(path / "config.json" if path.is_dir() else path))
            init_weights(net)
        if lora_rank:
            inject_lora(net, lora_rank, lora_alpha or lora_rank, lora_targets or DEFAULT_TARGETS)
    return net


class EMA:
    """Exponential moving average of the trainable parameters: ema ← decay · ema + (1 − decay) · θ after each step."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = {name: p.detach().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        shadow = [self.shadow[name] for name in self.params]  # one fused kernel per op on GPUs, not two per tensor
        torch._foreach_mul_(shadow, self.decay)
        torch._foreach_add_(shadow, [p.detach() for p in self.params.values()], alpha=1 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model while the block runs (sampling, saving); the trained ones after."""
        backup = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(backup[name])


def averaged(ema: EMA | None) -> contextlib.AbstractContextManager:
    """The EMA weights applied for the block, or nothing to do without an EMA."""
    return ema.applied() if ema else contextlib.nullcontext()


def save_trained(net: PixArtTransformer2DModel, ema: EMA | None, output: Path, source: str | None,
                 lora: tuple[int, float, tuple[str, ...]] | None) -> list[Path]:
    """Write the result, EMA weights first and the raw ones as the "raw" variant; return the files written.

    Full training: a diffusers pipeline folder (transformer/ plus the source folder's other components, hard-linked).
    LoRA (rank, alpha, targets): pytorch_lora_weights.safetensors in the diffusers/PEFT key layout.
    """
    if lora is not None:
        names = [output / LORA_FILE, output / LORA_FILE.replace(".safetensors", f".{RAW_VARIANT}.safetensors")]
        with averaged(ema):
            save_lora(names[0], lora_state_dict(net), *lora)
        if ema:
            save_lora(names[1], lora_state_dict(net), *lora)
        return names[: 2 if ema else 1]
    folder = output / "transformer"
    with averaged(ema):
        net.save_pretrained(folder)
    written = [folder / net.weights_name]
    if ema:
        written.append(folder / net.weights_name.replace(".safetensors", f".{RAW_VARIANT}.safetensors"))
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(written[-1]),
                  metadata={"format": "pt"})
    if source is not None:
        for name in OTHER_COMPONENTS:
            if (Path(source) / name).is_dir():
                _copy_component(Path(source) / name, output / name, written[0])
        if (Path(source) / "model_index.json").is_file():
            shutil.copy(Path(source) / "model_index.json", output / "model_index.json")
    return written


def _copy_component(src: Path, dst: Path, saved: Path) -> None:
    """A component folder of the source model into the output, its files hard-linked; one error naming what failed."""
    try:
        shutil.copytree(src, dst, copy_function=_link_or_copy, dirs_exist_ok=True)
    except shutil.Error as e:  # copytree goes on past failed files, then raises them all as (src, dst, why) tuples
        failed = e.args[0] if isinstance(e.args[0], list) else [(src, dst, str(e))]
        first, _, why = failed[0]
        raise OSError(f"the trained model is saved ({saved}), but {len(failed)} file(s) of {src} could not be linked "
                      f"or copied into {dst} (first: {first}: {why}): copy that folder there by hand") from None


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a file of the source model (T5 is tens of GB), or copy it across file systems; a destination that
    already is the source file (the same inode: a link of an earlier run, or the source folder itself) stays."""
    if os.path.lexists(dst):
        if os.path.exists(dst) and os.path.samefile(src, dst):
            return
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
