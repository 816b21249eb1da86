"""Checks of the generation inputs, and their expansion to one row per image."""
from __future__ import annotations

import math

import torch

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
    if not isinstance(callback_steps, int) or callback_steps <= 0:
        raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    try:
        finite = not isinstance(guidance_scale, (str, bytes)) and math.isfinite(float(guidance_scale))
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one value
        finite = False
    if not finite:
        raise ValueError(f"guidance_scale must be a finite number (4.5 by default; 1 or less turns guidance off), "
                         f"got {guidance_scale!r}")
    bad = [k for k in tensor_inputs if k not in ("latents", "prompt_embeds", "prompt_attention_mask")]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not available; choose from latents, "
                         "prompt_embeds, prompt_attention_mask")



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
