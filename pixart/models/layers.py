"""Small pieces shared by the models: sinusoidal embeddings, adaLN modulation, multi-head attention."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """DDPM sinusoid of a (B,) tensor of (possibly fractional) steps: (B, dim) float32, [cos, sin] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim: int, h: int, w: int, base_size: int, interpolation_scale: float) -> torch.Tensor:
    """2-D sin-cos position embedding of an h×w token grid: (h·w, dim) float32, w-coordinate half first.

    A coordinate i of an axis with n tokens is i / (n / base_size) / interpolation_scale, so every grid
    spans the range the model was trained on (PixArt-α §2.2, "Re-parameterization"). The grid is built in
    float32 and the frequencies in float64, as diffusers' `get_2d_sincos_pos_embed` does, for parity.
    """
    grid_h = torch.arange(h, dtype=torch.float32) / (h / base_size) / interpolation_scale
    grid_w = torch.arange(w, dtype=torch.float32) / (w / base_size) / interpolation_scale
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    ang_w = torch.outer(grid_w, omega)  # (w, D/4), float64 by promotion
    ang_h = torch.outer(grid_h, omega)  # (h, D/4)
    emb_w = torch.cat([ang_w.sin(), ang_w.cos()], dim=1)[None].expand(h, w, 2 * quarter)
    emb_h = torch.cat([ang_h.sin(), ang_h.cos()], dim=1)[:, None].expand(h, w, 2 * quarter)
    return torch.cat([emb_w, emb_h], dim=-1).reshape(h * w, dim).float()  # token index = row · w + column


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x·(1 + scale) + shift, one fused kernel; shift and scale (B, 1, D) broadcast over tokens."""
    return torch.addcmul(shift, x, 1 + scale)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head scaled dot-product attention of (B, N, D) projections; `bias` (B, 1, 1, L) is added to the scores."""
    B, N, D = q.shape
    q = q.view(B, N, heads, D // heads).transpose(1, 2)  # (B, H, N, d)
    k = k.view(B, k.shape[1], heads, D // heads).transpose(1, 2)  # (B, H, L, d)
    v = v.view(B, v.shape[1], heads, D // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, N, d)
    return out.transpose(1, 2).reshape(B, N, D)
