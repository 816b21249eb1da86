"""The model function the samplers call: classifier-free guidance, optionally only inside a noise-level interval,
and optionally reusing transformer work across steps (pixart.reuse)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .configs import SchedulerConfig
from .samplers import ModelFn, noise_levels


def check_guidance_interval(interval: Any, name: str = "guidance_interval") -> tuple[float, float] | None:
    """(σ_lo, σ_hi) as floats, or None; raise a ValueError naming the problem (and `name`) otherwise. Also checks
    the other noise-level window, the step cache's."""
    if interval is None:
        return None
    if isinstance(interval, (str, bytes)) or not hasattr(interval, "__len__") or len(interval) != 2:
        raise ValueError(f"{name} must be a pair (sigma_lo, sigma_hi), e.g. (0.28, 5.42), got {interval!r}")
    lo, hi = interval
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi)):
        raise ValueError(f"{name} bounds must be finite numbers (1e4 is above every noise level of PixArt's "
                         f"schedule), got {interval!r}")
    if not 0 <= lo < hi:
        raise ValueError(f"{name} needs 0 <= sigma_lo < sigma_hi, got ({lo}, {hi})")
    return float(lo), float(hi)


def guidance_window(config: SchedulerConfig, interval: tuple[float, float] | None) -> Callable[[torch.Tensor], bool]:
    """Whether guidance applies at timestep t: always, or when its noise level σ_t lies in (σ_lo, σ_hi].

    Kynkäänniemi et al. 2024 (arXiv 2404.07724) define the interval on σ, the noise-to-signal ratio of x_t
    (x_t / α_t = x_0 + σ ε): unlike a timestep, it means the same under any schedule, sampler or step count,
    so their published intervals (SD-XL: (0.28, 5.42]) carry over. PixArt's 20 default steps span σ 157 → 0.18.
    """
    if interval is None:
        return lambda t: True
    lo, hi = interval
    return lambda t: lo < noise_level(config, t) <= hi


def noise_level(config: SchedulerConfig, t: torch.Tensor) -> float:
    """σ of timestep t: a scalar, or a batch of equal timesteps (the model's input)."""
    return float(noise_levels(config, t.reshape(-1)[:1])[0])


def caption_length(mask: torch.Tensor) -> int | None:
    """How many caption positions the batch needs: up to its last real token; None when nothing can be cut (no
    padding at the end, or a row without real tokens, whose attention spreads evenly over all the padding)."""
    real = mask.bool()
    if not real.any(dim=1).all():
        return None
    length = int(real.any(dim=0).nonzero().max()) + 1
    return length if length < mask.shape[1] else None


def model_function(forward: Callable[..., torch.Tensor], state: dict[str, torch.Tensor],
                   conditions: dict[str, torch.Tensor], guidance_scale: float,
                   guided: Callable[[torch.Tensor], bool] | None, out_channels: int | None,
                   trim_captions: bool = True) -> ModelFn:
    """ε(x, t) for the samplers from `forward` (the transformer, or a reuse.StepCache around it).

    guided: None without guidance; else state["prompt_embeds"] holds [uncond, cond] rows, and where guided(t) is
    false only the conditional half runs (batch B, not 2B). out_channels: keep that many (ε of a learned-σ model).
    trim_captions: cut the captions' trailing padding (masked out, so the same result up to rounding, and up to
    100 of T5's 120 positions less to project and attend to); off for a compiled transformer, whose graphs are
    made per input shape.
    """
    measured: list = [None, None]  # (mask, its caption_length): read once, again only if a callback replaces the mask

    def trimmed(embeds: torch.Tensor, mask: torch.Tensor, full_mask: torch.Tensor):
        if not trim_captions:
            return embeds, mask
        if measured[0] is not full_mask:
            measured[:] = full_mask, caption_length(full_mask)
        n = measured[1]
        return (embeds, mask) if n is None else (embeds[:, :n], mask[:, :n])

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        embeds, mask, conds = state["prompt_embeds"], state["prompt_attention_mask"], conditions
        full_mask = mask
        cfg = guided is not None and guided(t)
        if guided is not None and not cfg:  # outside the guidance interval: the conditional half alone
            n = x.shape[0]
            embeds, mask, conds = embeds[n:], mask[n:], {k: v[n:] for k, v in conditions.items()}
        embeds, mask = trimmed(embeds, mask, full_mask)
        x_in = torch.cat([x, x]) if cfg else x
        out = forward(x_in, t.reshape(-1).expand(x_in.shape[0]).to(x.device), embeds, mask, **conds)
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)  # on all 8 channels, as the reference
        return out[:, :out_channels] if out_channels else out

    return model_fn
