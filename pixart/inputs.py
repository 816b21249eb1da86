"""Checks of the generation inputs, and their expansion to one row per image."""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .bins import classify_height_width_bin, model_bin_table
from .images import OUTPUT_TYPES


def check_call(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, output_type, callback_steps,
               num_images_per_prompt, tensor_inputs, guidance_scale: float = 4.5) -> None:
    """Raise a ValueError/TypeError naming the first argument of `__call__` that cannot work."""
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("pass exactly one of prompt and prompt_embeds")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
    if isinstance(prompt, list) and (not prompt or not all(isinstance(p, str) for p in prompt)):
        raise ValueError("prompt must be a non-empty list of strings")
    if negative_prompt_embeds is not None and negative_prompt:
        raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
    if prompt_embeds is not None and negative_prompt_embeds is not None:
        if prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if (whole_number(callback_steps) or 0) <= 0:
        raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")
    if (whole_number(num_images_per_prompt) or 0) < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    try:
        finite = not isinstance(guidance_scale, (str, bytes)) and math.isfinite(float(guidance_scale))
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one value
        finite = False
    if not finite:
        raise ValueError(f"guidance_scale must be a finite number (4.5 by default; 1 or less turns guidance off), "
                         f"got {guidance_scale!r}")
    bad = [k for k in tensor_inputs if k not in ("latents", "prompt_embeds", "prompt_attention_mask", "denoised")]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not available; choose from latents, "
                         "prompt_embeds, prompt_attention_mask, denoised (the step's x_0 estimate)")



def whole_number(value: Any) -> int | None:
    """`value` as an int when it is a whole number (an int, a NumPy integer, 128.0; not a bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def requested_pixels(name: str, value: Any) -> int:
    """A requested height or width as an int (a NumPy integer or 512.0 too), checked."""
    pixels = whole_number(value)
    if pixels is None or pixels < 8:
        raise ValueError(f"{name} must be a whole number of pixels >= 8, got {value!r}")
    return pixels


def generation_size(cfg, vae_scale_factor: int, height: int, width: int, binning: bool) -> tuple[int, int]:
    """The size a transformer of config `cfg` generates at: the nearest aspect-ratio bin, or the request itself
    (a multiple of the VAE factor × patch size, 16 px)."""
    if binning:
        return classify_height_width_bin(height, width, model_bin_table(cfg.sample_size, vae_scale_factor,
                                                                        cfg.patch_size))
    multiple = vae_scale_factor * cfg.patch_size
    if height % multiple or width % multiple:
        fix_h, fix_w = (round(v / multiple) * multiple or multiple for v in (height, width))
        raise ValueError(
            f"height and width must be multiples of {multiple} pixels (VAE factor {vae_scale_factor} × "
            f"patch size {cfg.patch_size}) without resolution binning, got {height}x{width}: "
            f"use {fix_h}x{fix_w}, or use_resolution_binning=True"
        )
    return height, width


def embeddings_with_mask(embeds, mask, name: str, channels: int | None = None,
                         like: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Given (B, L, D) caption embeddings and their (B, L) mask, checked against each other, the transformer's
    `channels` and (for negative ones) the prompts' (B, L) `like`; a 1-D mask of B·L values is viewed as (B, L),
    as diffusers does. `name`: "prompt" or "negative_prompt", as the arguments are called."""
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
        got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise ValueError(f"{name}_embeds must be a (batch, tokens, channels) tensor, as encode_prompt returns, "
                         f"got {got}")
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name}_attention_mask must be a tensor of 1 (token) and 0 (padding), got "
                         f"{type(mask).__name__}")
    batch, tokens, width = embeds.shape
    if mask.dim() == 1 and mask.numel() == batch * tokens:
        mask = mask.view(batch, tokens)
    if tuple(mask.shape) != (batch, tokens):
        raise ValueError(f"{name}_attention_mask has shape {tuple(mask.shape)} but {name}_embeds "
                         f"{tuple(embeds.shape)}: it needs one 1 (token) or 0 (padding) per token, ({batch}, {tokens})")
    if channels is not None and width != channels:
        raise ValueError(f"{name}_embeds have {width} channels but the transformer takes caption_channels={channels} "
                         "(T5-XXL's 4096 for PixArt-α): encode them with this pipeline's text encoder")
    if like is not None and (batch, tokens) != like:
        raise ValueError(f"{name}_embeds {tuple(embeds.shape)} do not pair with the prompts' ({like[0]}, {like[1]}, "
                         f"{width}): pass one row per prompt, with as many tokens")
    return embeds, mask


def per_image(t: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat each prompt's rows n times, keeping the images of one prompt contiguous."""
    return t.repeat_interleave(n, dim=0) if n > 1 else t


def micro_conditions(cfg, height: int, width: int, batch: int, device, dtype) -> dict[str, torch.Tensor]:
    """Resolution [h, w] of the generated size and its aspect ratio, for the 1024-px models only."""
    if not cfg.micro_conditions:
        return {}
    resolution = torch.tensor([[height, width]], dtype=dtype, device=device).repeat(batch, 1)
    aspect = torch.tensor([[float(height / width)]], dtype=dtype, device=device).repeat(batch, 1)
    return {"resolution": resolution, "aspect_ratio": aspect}
