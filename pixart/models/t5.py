"""T5 v1.1 encoder, the text encoder of PixArt, with transformers' `T5EncoderModel` parameter names."""
from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import T5Config
from ..quant import QuantSpec, check_stored, quant_spec, quantize_lazily, quantize_linears, read_spec, write_spec
from ..weights.files import Lazy, WeightsError
from ..weights.loading import PretrainedModel, load_into

ACTIVATIONS = {
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class EncoderOutput(NamedTuple):
    """As transformers returns it: `out[0]` and `out.last_hidden_state` are the same tensor."""

    last_hidden_state: torch.Tensor  # (B, L, d_model)


class RMSNorm(nn.Module):
    """T5's LayerNorm: scale only, no mean subtraction, statistics in fp32, output in a half weight's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional buckets: half per direction, exact below a quarter, log-spaced up to max_distance."""
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    # clamp(min=exact) only avoids log(0): those small distances take the exact branch below
    log_ratio = torch.log(dist.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (half - exact)).long()
    return (rel > 0).long() * half + torch.where(dist < exact, dist, far.clamp(max=half - 1))


class Attention(nn.Module):
    """Self-attention without the 1/sqrt(d) scaling (T5 folds it into the weights); relative bias in block 0."""

    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.heads, self.d_kv = config.num_heads, config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.heads, self.d_kv).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # (B, H, L, d_kv)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    """T5 FFN: act(wi_0 x) * wi_1 x when gated (v1.1), act(wi x) otherwise; then wo."""

    def __init__(self, config: T5Config):
        super().__init__()
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"feed_forward_proj {config.feed_forward_proj!r}: activation {config.activation!r} is "
                             f"not one of {list(ACTIVATIONS)}")
        self.act = ACTIVATIONS[config.activation]
        self.gated = config.is_gated
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))  # (B, L, d_ff)
        # wo is kept in fp32 under fp16 (its output overflows fp16): run it in its own dtype, as transformers does
        if self.wo.weight.is_floating_point():
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers clamps fp16 activations after each sub-layer (further when one is already inf); so do we."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return x.clamp(-limit, limit)


class Block(nn.Module):
    """Pre-norm residual block: `layer.0` self-attention, `layer.1` feed-forward (transformers' names)."""

    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        norm = partial(RMSNorm, config.d_model, config.layer_norm_epsilon)
        self.layer = nn.ModuleList([
            nn.ModuleDict({"SelfAttention": Attention(config, has_relative_bias), "layer_norm": norm()}),
            nn.ModuleDict({"DenseReluDense": FeedForward(config), "layer_norm": norm()}),
        ])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attn, ff = self.layer
        x = clamp_fp16(x + attn.SelfAttention(attn.layer_norm(x), bias))
        return clamp_fp16(x + ff.DenseReluDense(ff.layer_norm(x)))


class Encoder(nn.Module):
    """The block stack and its final norm (transformers' `encoder.*`)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.block = nn.ModuleList([Block(config, has_relative_bias=i == 0) for i in range(config.num_layers)])
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)


class T5EncoderModel(PretrainedModel):
    """T5 encoder: token ids (B, L) and mask -> last hidden states (B, L, d_model)."""

    config_class = T5Config
    weights_name = "model.safetensors"
    # REFERENCE §3: the FFN output overflows fp16. A quantized wo keeps its scales (and so its compute) in fp32.
    keep_fp32 = ("*.wo.weight", "*.wo.scale", "*.wo.zeros")

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.quantization: QuantSpec | None = None
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Encoder(config)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        variant: str | None = None,
        quantization: str | QuantSpec | None = None,
        **kwargs: Any,
    ) -> "T5EncoderModel":
        """Load a float or a saved quantized encoder; `quantization` "int8" / "int4" quantizes a float one as it loads.

        Every linear layer of the blocks is quantized (weight-only); the embedding, the norms and the relative
        position bias stay in torch_dtype. Float weights are read, quantized and dropped one at a time, so the
        float model is never whole in memory."""
        folder, torch_dtype = cls.locate(path_or_id, subfolder, torch_dtype, kwargs)
        config_overrides = kwargs
        saved, wanted = read_spec(folder / "config.json"), quant_spec(quantization)
        if saved is None and wanted is None:
            return super().from_pretrained(folder, None, torch_dtype, device, variant, **config_overrides)
        if saved is not None and wanted not in (None, saved):
            raise WeightsError(f"{folder} holds a T5 encoder quantized to {saved.name}, which cannot be requantized "
                               f"to {wanted.name}: quantize the float encoder instead")
        spec = saved or wanted
        folder, config, tensors = cls.read_folder(folder, variant, config_overrides)
        with torch.device("meta"):
            model = cls(config)
            layers = quantize_linears(model, spec)
        model.quantization = spec
        if saved is None:
            tensors = quantize_lazily(tensors, layers, torch_dtype or torch.float32)
        else:
            tensors = check_stored(tensors, layers, str(folder))
        return load_into(lambda: model, tensors, str(folder), torch_dtype, device, cls.keep_fp32)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json and model.safetensors; a quantized encoder records its quantization in config.json."""
        super().save_pretrained(folder)
        if self.quantization is not None:
            write_spec(Path(folder) / "config.json", self.quantization)

    @classmethod
    def map_keys(cls, tensors: dict[str, Lazy]) -> dict[str, Lazy]:
        """`encoder.embed_tokens.weight` is transformers' tied copy of `shared.weight`: use it or drop it."""
        tensors = dict(tensors)
        tied = tensors.pop("encoder.embed_tokens.weight", None)
        if tied is not None:
            tensors.setdefault("shared.weight", tied)
        return tensors

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """Relative position bias of block 0, shared by all blocks: (1, H, L, L)."""
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None], self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        )  # (L, L), key position minus query position
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).permute(2, 0, 1)[None]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> EncoderOutput:
        x = self.shared(input_ids)  # (B, L, D)
        bias = self.position_bias(input_ids.shape[1], input_ids.device)  # (1, H, L, L)
        if attention_mask is not None:
            # padded keys get the dtype's minimum, as transformers' additive mask does
            keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
            bias = bias.masked_fill(~keep, torch.finfo(bias.dtype).min)  # (B, H, L, L)
        for block in self.encoder.block:
            x = block(x, bias)
        return EncoderOutput(self.encoder.final_layer_norm(x))
