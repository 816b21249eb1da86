"""Small pieces shared by the models: sinusoidal embeddings, adaLN modulation, multi-head attention."""
from __future__ import annotations

import inspect
import logging
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Inference on CUDA tries cuDNN's fused attention first, then PyTorch's own order. Its kernel beats FlashAttention-2
# on Hopper for PixArt's 72-wide heads (which flash pads to 96): on an H200, torch 2.11, a 1024² self-attention takes
# 0.48 ms against 0.78 and the transformer step 35 ms against 43.5 (bench/profile_cuda.py). A backend that refuses
# the inputs falls through to the next; one that fails at run time (cuDNN has refused shapes its checks passed) turns
# the order off for the process, with a warning. Training keeps PyTorch's order (cuDNN's backward has had NaN bugs),
# as does PyTorch without backend priorities; `pixart.models.layers.CUDA_ORDER = None` keeps it for inference too.
CUDA_ORDER: list[SDPBackend] | None = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                       SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
ORDERED_DEVICES = ("cuda",)
_CAN_ORDER = "set_priority" in inspect.signature(sdpa_kernel).parameters  # PyTorch 2.6 on
# torch.compile honours the order from PyTorch 2.9 on: 2.6 ignores it, 2.7 and 2.8 fail on it (pytorch#155898, fixed
# by #160684); there a compiled transformer keeps PyTorch's order, and only eager calls use ours.
_ORDER_TRACES = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 9)
logger = logging.getLogger("pixart")


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


GELU_PIECE_BYTES = 4 << 20  # gelu_tanh's pieces on a CPU: cache-sized, each finished before the next is read
_TWO_BETA = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh-approximated GELU, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).

    For fp32 CPU inference it is computed as x·sigmoid(2u), the same function (1 + tanh u = 2·sigmoid(2u)), a few
    rows at a time: PyTorch's vectorised tanh is slow on a CPU, and a piece stays in cache through its five passes.
    On a 2-core AVX2 EPYC a (2, 1024, 4608) GELU (fc1's output at 512²) takes 9.6 ms against F.gelu's 25.3, at 1024²
    37 against 68; both stay within 4e-7 of the float64 value (inputs of scale 0.6). In a graph compiled for a CPU
    it is the same formula, which inductor fuses into the loop before it: 5.7 ms against 26 for its tanh code there.
    Elsewhere (GPUs, bf16 eager, autograd) it is F.gelu."""
    if torch.compiler.is_compiling() and x.device.type == "cpu":
        return x * torch.sigmoid(x * (_TWO_BETA + 0.044715 * _TWO_BETA * x * x))
    plain = (x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous()
             or (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling())
    if plain or x.dim() == 0 or x.numel() == 0:
        return F.gelu(x, approximate="tanh")
    rows = x.view(-1, x.shape[-1])
    out = torch.empty_like(rows)
    step = max(1, GELU_PIECE_BYTES // (4 * rows.shape[1]))
    for i in range(0, rows.shape[0], step):
        piece, o = rows[i:i + step], out[i:i + step]
        torch.mul(piece, piece, out=o)
        o.mul_(0.044715 * _TWO_BETA).add_(_TWO_BETA).mul_(piece).sigmoid_().mul_(piece)
    return out.view(x.shape)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head scaled dot-product attention of (B, N, D) projections; `bias` (B, 1, 1, L) is added to the scores."""
    B, N, D = q.shape
    q = q.view(B, N, heads, D // heads).transpose(1, 2)  # (B, H, N, d)
    k = k.view(B, k.shape[1], heads, D // heads).transpose(1, 2)  # (B, H, L, d)
    v = v.view(B, v.shape[1], heads, D // heads).transpose(1, 2)
    out = None
    if (CUDA_ORDER and _CAN_ORDER and q.device.type in ORDERED_DEVICES and not torch.is_grad_enabled()
            and (_ORDER_TRACES or not torch.compiler.is_compiling())):
        out = _ordered_attention(q, k, v, bias)
    if out is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, N, d)
    return out.transpose(1, 2).reshape(B, N, D)


def _ordered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
                       ) -> torch.Tensor | None:
    """SDPA with CUDA_ORDER's backends first; None, and the order off from then on, where that fails to run."""
    global CUDA_ORDER
    try:
        with sdpa_kernel(CUDA_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    except torch.cuda.OutOfMemoryError:
        raise  # not the backend's fault: the order stays
    except RuntimeError as error:
        logger.warning("pixart: attention with %s first failed (%s); PyTorch's own order from now on",
                       CUDA_ORDER[0].name, str(error).splitlines()[0] if str(error) else type(error).__name__)
        CUDA_ORDER = None
        return None
