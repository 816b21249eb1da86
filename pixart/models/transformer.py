"""PixArt-α transformer: a DiT with cross-attention to T5 captions and adaLN-single (arXiv 2310.00426)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..configs import PRESETS, TransformerConfig
from ..quant import quantize_lazily, quantize_linears
from ..quant_dynamic import DynamicSpec, dynamic_spec
from ..weights.files import Lazy, WeightsError, lazy_tensors
from ..weights.keymaps import PIXART_ORIGINAL, apply_key_map
from ..weights.loading import PretrainedModel, load_into
from .layers import attention, gelu_tanh, modulate, sincos_pos_embed_2d, timestep_embedding

# diffusers adds -10000 (not -inf) to the scores of padded caption tokens: matching it keeps parity,
# and a caption whose tokens are all masked still gives finite (uniform) attention instead of NaN.
MASK_BIAS = -10000.0


class MLP(nn.Module):
    """Linear → activation → Linear (timestep, size and caption embedders)."""

    def __init__(self, dim_in: int, dim: int, act: Callable[[torch.Tensor], torch.Tensor] = F.silu):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class Conditioning(nn.Module):
    """Timestep embedding, plus the 1024-MS micro-conditions (generated size and aspect ratio) when enabled."""

    def __init__(self, dim: int, micro_conditions: bool):
        super().__init__()
        self.micro_conditions = micro_conditions
        self.timestep_embedder = MLP(256, dim)
        if micro_conditions:
            self.resolution_embedder = MLP(256, dim // 3)  # shared by height and width
            self.aspect_ratio_embedder = MLP(256, dim // 3)

    def forward(self, t: torch.Tensor, resolution: torch.Tensor | None, aspect_ratio: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_embedding(t).to(dtype))  # (B, D)
        if not self.micro_conditions:
            return emb
        if resolution is None or aspect_ratio is None:
            raise ValueError(
                "this model is conditioned on the image size: pass resolution=(B, 2) [height, width] in pixels "
                "and aspect_ratio=(B, 1) height / width"
            )
        B = t.shape[0]
        res = torch.as_tensor(resolution, device=t.device).expand(B, 2).flatten()  # (2B,) h0, w0, h1, ...
        ar = torch.as_tensor(aspect_ratio, device=t.device).expand(B, 1).flatten()  # (B,)
        res = self.resolution_embedder(timestep_embedding(res).to(dtype)).reshape(B, -1)  # (B, 2D/3)
        ar = self.aspect_ratio_embedder(timestep_embedding(ar).to(dtype))  # (B, D/3)
        return emb + torch.cat([res, ar], dim=1)


class AdaLNSingle(nn.Module):
    """adaLN-single: one conditioning vector, projected once to the 6 modulation vectors all blocks share."""

    def __init__(self, dim: int, micro_conditions: bool):
        super().__init__()
        self.emb = Conditioning(dim, micro_conditions)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t: torch.Tensor, resolution: torch.Tensor | None, aspect_ratio: torch.Tensor | None,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(the 6 modulation vectors (B, 6D), the conditioning (B, D) the final layer uses)."""
        emb = self.emb(t, resolution, aspect_ratio, dtype)
        return self.linear(F.silu(emb)), emb


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches of the latent to tokens (named after diffusers' `pos_embed`)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)


class Attention(nn.Module):
    """Multi-head attention; keys and values come from `context` (cross) or from x itself (self)."""

    def __init__(self, dim: int, heads: int, context_dim: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, bias)
        return self.to_out[0](out)


class FeedForward(nn.Module):
    """MLP with tanh-GELU; `net` indices 0 and 2 keep diffusers' key names (1 is its dropout)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        up = nn.ModuleDict({"proj": nn.Linear(dim, hidden)})
        self.net = nn.ModuleList([up, nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](gelu_tanh(self.net[0]["proj"](x)))


class Block(nn.Module):
    """Self-attention, cross-attention to the caption, MLP; adaLN-single modulation from a per-block table."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        dim, heads = config.inner_dim, config.num_attention_heads
        self.eps = config.norm_eps
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.attn1 = Attention(dim, heads, dim, config.attention_bias)
        self.attn2 = Attention(dim, heads, config.cross_attention_dim or dim, config.attention_bias)
        self.ff = FeedForward(dim, 4 * dim)

    def modulation(self, t6: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shift, scale, gate of attention then of the MLP, each (B, 1, D), from the (B, 6D) timestep table."""
        return (self.scale_shift_table[None] + t6.view(-1, 6, t6.shape[-1] // 6)).chunk(6, dim=1)

    def norm(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """LayerNorm without weights, then the timestep's shift and scale."""
        return modulate(F.layer_norm(x, (x.shape[-1],), eps=self.eps), shift, scale)

    def forward(self, x: torch.Tensor, t6: torch.Tensor, y: torch.Tensor, y_bias: torch.Tensor | None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t6)
        x = torch.addcmul(x, gate_msa, self.attn1(self.norm(x, shift_msa, scale_msa)))
        x = x + self.attn2(x, y, y_bias)  # no norm, no gate: as the original
        return torch.addcmul(x, gate_mlp, self.ff(self.norm(x, shift_mlp, scale_mlp)))


class Context(NamedTuple):
    """What the blocks and the final layer read besides the tokens."""

    t6: torch.Tensor  # (B, 6D) adaLN-single modulation, shared by all blocks
    t_emb: torch.Tensor  # (B, D) conditioning, for the final layer
    y: torch.Tensor  # (B, L, D) projected caption
    y_bias: torch.Tensor | None  # (B, 1, 1, L) attention bias of the caption's padding


# keywords only diffusers' call takes: with any of them, a call is diffusers' whatever its positional arguments
DIFFUSERS_ONLY = frozenset({"hidden_states", "added_cond_kwargs", "cross_attention_kwargs", "attention_mask",
                            "return_dict"})


class TransformerOutput(NamedTuple):
    """diffusers' Transformer2DModelOutput: `out.sample`, or `out[0]` as its return_dict=False tuple."""

    sample: torch.Tensor


class PixArtTransformer2DModel(PretrainedModel):
    """PixArt-α DiT; parameter names are diffusers', so a diffusers `transformer/` folder loads as is."""

    config_class = TransformerConfig
    keep_fp32 = ("*.scale",)  # the weight scales of a quantized model: fp16 lacks their range

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.quantization: DynamicSpec | None = None
        if config.norm_type != "ada_norm_single" or config.norm_elementwise_affine:
            raise ValueError(f"only PixArt's adaLN-single without norm weights is supported, not {config.norm_type!r}")
        self.config = config
        dim, p = config.inner_dim, config.patch_size
        self.out_channels = config.out_channels or config.in_channels
        self.pos_embed = PatchEmbed(config.in_channels, dim, p)
        self.adaln_single = AdaLNSingle(dim, config.micro_conditions)
        has_projection = config.caption_channels is not None
        self.caption_projection = MLP(config.caption_channels, dim, act=gelu_tanh) if has_projection else None
        self.transformer_blocks = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, p * p * self.out_channels)
        self.pos_cache: dict[tuple, torch.Tensor] = {}  # (h, w, device) -> (1, h·w, D) fp32; not in state_dict
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (training memory)."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def fuse_qkv_projections(self) -> None:
        """Accepted for diffusers code; q, k and v stay three layers (LoRAs and the checkpoint name them apart):
        one fused 1152→3456 product of a 512² batch-2 step's tokens takes 91 ms against 96 for the three in fp32,
        56 against 57 in int8, on a 2-core EPYC: ~1% of a step."""

    def unfuse_qkv_projections(self) -> None:
        """Accepted for diffusers code (see fuse_qkv_projections)."""

    @torch.compiler.assume_constant_result  # torch.compile: a constant of the graph, no guard on the cache
    def position_embedding(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """The (1, h·w, D) float32 sin-cos embedding of an h×w token grid, computed once per size and device."""
        key = (h, w, device)
        if key not in self.pos_cache:
            c = self.config
            # built on the CPU (float64 frequencies, which MPS lacks), then moved
            pe = sincos_pos_embed_2d(c.inner_dim, h, w, c.sample_size // c.patch_size, c.pe_interpolation)
            self.pos_cache[key] = pe[None].to(device)
        return self.pos_cache[key]

    def forward(self, *args: Any, **kwargs: Any) -> "torch.Tensor | TransformerOutput":
        """Two calls. pixart's, `model(x, timestep, encoder_hidden_states, encoder_attention_mask=None,
        resolution=None, aspect_ratio=None)` → the (B, out_channels, H, W) tensor (see `predict`); it is the one
        whose second positional argument is the (B,) or 0-dim timestep, or that names `x=`. Every other call is
        diffusers' (see
        `diffusers_call`): `model(hidden_states, encoder_hidden_states=..., timestep=..., ...)` → `(sample,)`."""
        second = args[1] if len(args) > 1 else None
        # diffusers' second positional argument is the captions, a 3-D tensor; pixart's the timestep (B,), 0-dim or
        # a number
        timestep_second = (isinstance(second, torch.Tensor) and second.dim() <= 1) or (
            isinstance(second, (int, float)) and not isinstance(second, bool))
        pixart_call = "x" in kwargs or timestep_second
        if pixart_call and not DIFFUSERS_ONLY & kwargs.keys():
            return self.predict(*args, **kwargs)
        return self.diffusers_call(*args, **kwargs)

    def predict(self, x: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, resolution: torch.Tensor | None = None,
                aspect_ratio: torch.Tensor | None = None) -> torch.Tensor:
        """Predict (B, out_channels, H, W) from latents (B, C, H, W), steps (B,) and captions (B, L, caption_channels).

        encoder_attention_mask (B, L) is 1 for real caption tokens and 0 for padding; resolution (B, 2) is the
        generated [height, width] in pixels and aspect_ratio (B, 1) height / width, used only by micro-conditioned
        models (1024-MS)."""
        tokens, ctx = self.embed(x, timestep, encoder_hidden_states, encoder_attention_mask, resolution, aspect_ratio)
        return self.final(self.run_blocks(tokens, ctx), ctx, *x.shape[-2:])

    def diffusers_call(self, hidden_states: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                       timestep: torch.Tensor | None = None, added_cond_kwargs: dict | None = None,
                       cross_attention_kwargs: dict | None = None, attention_mask: torch.Tensor | None = None,
                       encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True,
                       **unknown: Any) -> "TransformerOutput":
        """diffusers' call, its arguments in its order: `transformer(hidden_states, encoder_hidden_states=...,
        timestep=..., added_cond_kwargs={...}, return_dict=False)[0]` (or `.sample`): the same prediction, as a
        (sample,) tuple with a `.sample` field whatever return_dict says."""
        if unknown:
            raise TypeError(f"PixArtTransformer2DModel got unexpected keyword arguments {', '.join(sorted(unknown))} "
                            "(diffusers' call: hidden_states, encoder_hidden_states, timestep, added_cond_kwargs, "
                            "encoder_attention_mask, return_dict)")
        if attention_mask is not None:
            raise ValueError("attention_mask (a mask over the image tokens) is not supported: pass None")
        if cross_attention_kwargs:
            raise ValueError("cross_attention_kwargs is not supported: a LoRA's strength is set with the pipeline's "
                             "set_adapters(names, weights)")
        missing = [name for name, value in (("hidden_states", hidden_states), ("encoder_hidden_states",
                   encoder_hidden_states), ("timestep", timestep)) if value is None]
        if missing:
            raise TypeError(f"PixArtTransformer2DModel needs {', '.join(missing)} (diffusers' call: "
                            "transformer(latents, encoder_hidden_states=..., timestep=...))")
        conds = added_cond_kwargs or {}
        return TransformerOutput(self.predict(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                                              conds.get("resolution"), conds.get("aspect_ratio")))

    def embed(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        resolution: torch.Tensor | None = None,
        aspect_ratio: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Context]:
        """(B, N, D) tokens of the latents, and the context the blocks read (forward's arguments)."""
        B, _, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(
                f"latent size {H}x{W} is not divisible by the patch size {p}: image height and width in pixels "
                f"must be multiples of {8 * p} (8 × patch size); round them, or use resolution binning"
            )
        dtype = x.dtype

        # contiguous: the conv's output is channel-major, and every op after would keep that slow layout
        x = self.pos_embed.proj(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)
        x = (x + self.position_embedding(H // p, W // p, x.device)).to(dtype)  # added in fp32, as diffusers does

        t = torch.as_tensor(timestep, device=x.device).expand(B)
        t6, t_emb = self.adaln_single(t, resolution, aspect_ratio, dtype)  # (B, 6D), (B, D)

        y = encoder_hidden_states
        if self.caption_projection is not None:
            y = self.caption_projection(y)  # (B, L, D)
        y_bias = None
        if encoder_attention_mask is not None:
            y_bias = ((1 - encoder_attention_mask.to(dtype)) * MASK_BIAS)[:, None, None, :]  # (B, 1, 1, L)
        return x, Context(t6, t_emb, y, y_bias)

    def run_blocks(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The transformer blocks over (B, N, D) tokens."""
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, ctx.t6, ctx.y, ctx.y_bias, use_reentrant=False)
            else:
                x = block(x, ctx.t6, ctx.y, ctx.y_bias)
        return x

    def final(self, x: torch.Tensor, ctx: Context, H: int, W: int) -> torch.Tensor:
        """Final modulated norm and projection of (B, N, D) tokens, unpatchified to (B, out_channels, H, W)."""
        B, p = x.shape[0], self.config.patch_size
        shift, scale = (self.scale_shift_table[None] + ctx.t_emb[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        x = modulate(F.layer_norm(x, (x.shape[-1],), eps=1e-6), shift, scale)
        x = self.proj_out(x)  # (B, N, p·p·C)
        x = x.view(B, H // p, W // p, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(B, self.out_channels, H, W)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        variant: str | None = None,
        quantization: str | DynamicSpec | None = None,
        **kwargs: Any,
    ) -> "PixArtTransformer2DModel":
        """Load from a model folder (or a pipeline folder + subfolder, or a Hub id).

        quantization: "int8" (or "fp8", GPUs from Ada on) quantizes the blocks' linear layers while loading: weights
        per output channel, activations per token at each call (see pixart.quant.DynamicLinear)."""
        if quantization is None:
            return super().from_pretrained(path_or_id, subfolder, torch_dtype, device, variant, **kwargs)
        folder, torch_dtype = cls.locate(path_or_id, subfolder, torch_dtype, kwargs)
        folder, config, tensors = cls.read_folder(folder, variant, kwargs)
        return cls.from_state(config, tensors, str(folder), torch_dtype, device, quantization)

    @classmethod
    def from_state(cls, config: TransformerConfig, tensors: dict[str, Lazy], source: str = "the state dict",
                   torch_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                   quantization: str | DynamicSpec | None = None) -> "PixArtTransformer2DModel":
        """Load from key -> lazy tensor; with `quantization`, each block linear's float weight is read, quantized and
        dropped in turn, so the float model is never whole in memory."""
        spec = dynamic_spec(quantization, device)
        if spec is None:
            return super().from_state(config, tensors, source, torch_dtype, device)
        with torch.device("meta"):
            model = cls(config)
            # the blocks hold 97% of the weights; the embedders and the final layer stay in float
            layers = quantize_linears(model.transformer_blocks, spec, prefix="transformer_blocks.")
        model.quantization = spec
        tensors = quantize_lazily(tensors, layers, torch_dtype or torch.float32)
        return load_into(lambda: model, tensors, source, torch_dtype, device, cls.keep_fp32)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json and the weights (float models only: a quantized one is quantized again when loaded)."""
        if self.quantization is not None:
            raise ValueError("a transformer quantized while loading is not saved: save the float model, and load it "
                             "with quantization= (quantizing takes seconds)")
        super().save_pretrained(folder)

    @classmethod
    def map_keys(cls, tensors: dict[str, Lazy]) -> dict[str, Lazy]:
        """Original-repository keys (x_embedder, blocks.N.attn.qkv, ...) map to ours; our own pass through."""
        if "x_embedder.proj.weight" in tensors:
            return apply_key_map(tensors, PIXART_ORIGINAL)
        return tensors

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        config: TransformerConfig | str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        use_ema: bool = False,
        device: str | torch.device = "cpu",
        quantization: str | DynamicSpec | None = None,
    ) -> "PixArtTransformer2DModel":
        """Load one weight file: the original PixArt-XL-2-*.pth, or the same as .safetensors, in either key layout.

        `config`: a TransformerConfig, a config.json or a folder holding one, or None to infer it from the weights.
        `quantization`: as in from_pretrained.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"weight file {path} does not exist")
        raw = lazy_tensors([path], use_ema=use_ema)
        tensors = cls.map_keys(raw)
        if config is None:
            config = infer_config(tensors, raw.get("pos_embed"), path)
        elif not isinstance(config, TransformerConfig):
            config_path = Path(config)
            config = TransformerConfig.from_json(config_path / "config.json" if config_path.is_dir() else config_path)
        return cls.from_state(config, tensors, str(path), torch_dtype, device, quantization)


def infer_config(tensors: dict[str, Lazy], pos_embed: Lazy | None, source: Path) -> TransformerConfig:
    """A config from the shapes of diffusers-named weights and the original's stored (1, N, D) position table."""
    fix = f"pass config= (a TransformerConfig or the model's config.json) to load {source}"
    if pos_embed is None or pos_embed.shape is None or "pos_embed.proj.weight" not in tensors:
        raise WeightsError(f"cannot tell the model's sample size: the file has no original `pos_embed` table; {fix}")
    dim, in_channels, p, _ = tensors["pos_embed.proj.weight"].shape
    side = math.isqrt(pos_embed.shape[1])
    if side * side != pos_embed.shape[1] or dim % 72:
        raise WeightsError(f"unusual shapes (pos_embed {tuple(pos_embed.shape)}, width {dim}); {fix}")
    sample_size = side * p
    preset = next((c for c in PRESETS.values() if c.sample_size == sample_size), TransformerConfig())
    return TransformerConfig(
        sample_size=sample_size,
        num_attention_heads=dim // 72,  # every published PixArt uses 72-wide heads
        attention_head_dim=72,
        in_channels=in_channels,
        out_channels=tensors["proj_out.weight"].shape[0] // (p * p),
        num_layers=sum(k.endswith(".scale_shift_table") and k.startswith("transformer_blocks.") for k in tensors),
        patch_size=p,
        cross_attention_dim=dim,
        caption_channels=tensors["caption_projection.linear_1.weight"].shape[1],
        interpolation_scale=preset.interpolation_scale,
        use_additional_conditions="adaln_single.emb.resolution_embedder.linear_1.weight" in tensors,
    )
