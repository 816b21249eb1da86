"""AutoencoderKL, the Stable Diffusion VAE PixArt-α decodes with; attribute names are diffusers' checkpoint keys."""
from __future__ import annotations

import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import VAEConfig
from ..samplers import randn_tensor
from ..weights.files import Lazy
from ..weights.loading import PretrainedModel

EPS = 1e-6  # every GroupNorm of this VAE

# Attention names of older VAE checkpoints -> ours; their weights may be 1x1-conv shaped (out, in, 1, 1).
OLD_ATTENTION = re.compile(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), logvar clamped to [-30, 20] as diffusers does."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters  # (B, 2 * latent_channels, h, w)
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std * ε, with ε drawn exactly as diffusers draws it for the same generator(s)."""
        noise = randn_tensor(self.mean.shape, generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKLOutput(NamedTuple):
    latent_dist: DiagonalGaussian


class DecoderOutput(NamedTuple):
    sample: torch.Tensor


def norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=EPS)


def norm_silu(gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.silu(gn(x), inplace=True)  # the norm's output is fresh, so SiLU can overwrite it


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 conv on the skip when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(norm_silu(self.norm2, self.conv1(norm_silu(self.norm1, x))))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))  # h is fresh: add in place


class Attention(nn.Module):
    """Single-head self-attention over all pixels, with a residual (the mid block's only attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C); a free view in channels_last
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))  # (B, HW, C)
        return x + out.transpose(1, 2).unflatten(2, (h, w))  # (B, C, H, W), channels_last strides


class Downsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 conv (diffusers' asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


# Which of a 3x3 kernel's rows (or columns) act on each of the two input rows an output row of a nearest ×2
# upsample sees: an even output row 2i sees input rows i-1 (kernel row 0) and i (rows 1 and 2); an odd one, 2i+1,
# sees i (rows 0 and 1) and i+1 (row 2).  Indexed [phase, input tap, kernel row].
PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3x3 conv, computed without the upsampled input.

    Each output pixel of the 3x3 conv over the upsampled image sees 2x2 distinct input pixels, so the four output
    phases (even/odd row × even/odd column) are four 2x2 convs over the input, each written into its interleaved
    place in the output: 16 instead of 36 multiply-adds per output channel, input channel and input pixel, the same
    result up to float rounding (measured ~2× faster on CPU). One phase at a time, so besides the output only a
    quarter of it is ever held (a 1024² fp32 decode peaked at 3.25 GB RSS instead of 3.48 GB with one conv of 4×
    the channels, which measured 5% faster). The weights are the checkpoint's 3x3 ones.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.conv.weight, self.conv.bias
        taps = PHASE_TAPS.to(weight.device)
        # kernel[a, b] = taps[a] · weight · taps[b]ᵀ over the spatial axes; summed in fp32, then cast back
        kernel = torch.einsum("apr,oirs,bqs->aboipq", taps, weight.float(), taps).to(weight.dtype)
        n, channels, h, w = x.shape
        padded = F.pad(x, (1, 1, 1, 1))
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        # (n, 2h, 2w) viewed as (h, 2, w, 2): phase (a, b) fills [:, a, :, b]; NHWC keeps channels_last
        out = x.new_empty((n, h, 2, w, 2, channels) if nhwc else (n, channels, h, 2, w, 2))
        for a in (0, 1):
            for b in (0, 1):
                # phase (a, b) is the 2x2 conv of the input padded by one, read from offset (a, b)
                phase = F.conv2d(padded[:, :, a:a + h + 1, b:b + w + 1], kernel[a, b], bias)
                if nhwc:
                    out[:, :, a, :, b] = phase.permute(0, 2, 3, 1)
                else:
                    out[:, :, :, a, :, b] = phase
                del phase
        if nhwc:
            return out.view(n, 2 * h, 2 * w, channels).permute(0, 3, 1, 2)
        return out.view(n, channels, 2 * h, 2 * w)


class Block(nn.Module):
    """`layers` resnets, then an optional down- or upsampler (diffusers' Down/UpDecoderBlock2D)."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, down: bool = False, up: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(cout)] if down else [])  # empty lists hold no keys
        self.upsamplers = nn.ModuleList([Upsample(cout)] if up else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.downsamplers, *self.upsamplers):
            x = layer(x)
        return x


class MidBlock(nn.Module):
    """resnet, attention (unless the config turns it off), resnet."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups) for _ in range(2))
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> posterior parameters (B, 2 * latent_channels, H / f, W / f)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        widths, groups = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Block(widths[max(i - 1, 0)], width, c.layers_per_block, groups, down=i < len(widths) - 1)
            for i, width in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], groups, c.mid_block_add_attention)
        self.conv_norm_out = norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(norm_silu(self.conv_norm_out, self.mid_block(x)))


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) -> image (B, 3, h * f, w * f); one more resnet per block than the encoder."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        widths, groups = c.block_out_channels[::-1], c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            Block(widths[max(i - 1, 0)], width, c.layers_per_block + 1, groups, up=i < len(widths) - 1)
            for i, width in enumerate(widths)
        )
        self.conv_norm_out = norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(norm_silu(self.conv_norm_out, x))


class AutoencoderKL(PretrainedModel):
    """The KL-regularised VAE of Stable Diffusion with diffusers' encode / decode / forward API."""

    config_class = VAEConfig

    def __init__(self, config: VAEConfig):
        super().__init__()
        if (
            set(config.down_block_types) != {"DownEncoderBlock2D"}
            or set(config.up_block_types) != {"UpDecoderBlock2D"}
            or not len(config.down_block_types) == len(config.up_block_types) == len(config.block_out_channels)
            or config.act_fn != "silu"
        ):
            raise ValueError(
                "only the SD-style AutoencoderKL is implemented (one DownEncoderBlock2D and one UpDecoderBlock2D per "
                f"block_out_channels entry, act_fn silu); got {config.down_block_types}, {config.up_block_types}, "
                f"{config.block_out_channels}, {config.act_fn}"
            )
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None
        self.tiling: tuple[int, int] | None = None  # (tile, overlap) in latent pixels; off: decode whole
        self.slicing = False  # decode a batch one image at a time

    def enable_tiling(self, tile: int = 64, overlap: int = 16) -> None:
        """Decode large latents in overlapping tiles blended linearly: peak memory of one tile, whatever the size."""
        if not 0 <= overlap < tile:
            raise ValueError(f"tile overlap must be in [0, tile), got tile {tile}, overlap {overlap}")
        self.tiling = (tile, overlap)

    def disable_tiling(self) -> None:
        self.tiling = None

    def enable_slicing(self) -> None:
        self.slicing = True

    def disable_slicing(self) -> None:
        self.slicing = False

    @classmethod
    def map_keys(cls, tensors: dict[str, Lazy]) -> dict[str, Lazy]:
        """Accept the old attention names (query/key/value/proj_attn); every other key passes through unchanged."""
        out = {}
        for key, lazy in tensors.items():
            match = OLD_ATTENTION.fullmatch(key)
            if match:
                prefix, old, kind = match.groups()
                key = f"{prefix}.{OLD_ATTENTION_NAMES[old]}.{kind}"
                if kind == "weight":
                    lazy = Lazy(lambda lazy=lazy: lazy().flatten(1), lazy.shape[:2] if lazy.shape else None)
            out[key] = lazy
        return out

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple[DiagonalGaussian]:
        """Images in [-1, 1] (B, 3, H, W) -> the posterior over latents (not yet scaled by scaling_factor)."""
        moments = self.encoder(x.to(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        posterior = DiagonalGaussian(moments)
        return AutoencoderKLOutput(posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Unscaled latents (B, latent_channels, h, w) -> images (B, 3, 8h, 8w) in about [-1, 1], in the VAE dtype."""
        z = z.to(self.dtype)
        if self.slicing and z.shape[0] > 1:
            image = torch.cat([self._decode(one) for one in z.split(1)])
        else:
            image = self._decode(z)
        return DecoderOutput(image) if return_dict else (image,)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.tiling is not None and max(z.shape[-2:]) > self.tiling[0]:
            return self._decode_tiled(z, *self.tiling)
        return self._decode_whole(z)

    def _decode_whole(self, z: torch.Tensor) -> torch.Tensor:
        if z.device.type == "cpu":  # oneDNN's NHWC convolutions are faster on the wide 256-512² layers
            z = z.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.post_quant_conv(z) if self.post_quant_conv is not None else z)

    def _decode_tiled(self, z: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
        """Overlapping tile × tile latent windows, each decoded alone, summed with weights that ramp linearly to
        zero across the overlap (only on sides that touch another tile), then normalised by the summed weights."""
        B, _, H, W = z.shape
        f = 2 ** (len(self.config.block_out_channels) - 1)
        out = torch.zeros(B, self.config.out_channels, H * f, W * f, dtype=torch.float32, device=z.device)
        total = torch.zeros(1, 1, H * f, W * f, dtype=torch.float32, device=z.device)
        for top in _tile_starts(H, tile, overlap):
            for left in _tile_starts(W, tile, overlap):
                window = z[:, :, top : top + tile, left : left + tile]
                image = self._decode_whole(window.contiguous())
                h, w = window.shape[-2:]
                wy = _ramp(h * f, overlap * f, top > 0, top + h < H, z.device)
                wx = _ramp(w * f, overlap * f, left > 0, left + w < W, z.device)
                weight = wy[:, None] * wx[None, :]  # (h·f, w·f)
                region = (slice(None), slice(None), slice(top * f, (top + h) * f), slice(left * f, (left + w) * f))
                out[region] += image.float() * weight
                total[region] += weight
        return (out / total).to(z.dtype)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Encode, take the posterior mode (or a sample), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Window starts covering [0, size) with windows of `tile` and at least `overlap` shared between neighbours."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]  # the last window ends at the edge


def _ramp(n: int, overlap: int, rise: bool, fall: bool, device: torch.device) -> torch.Tensor:
    """Per-pixel blend weight along one axis of a tile: 1 inside, linear over the overlap toward a neighbour."""
    w = torch.ones(n, device=device)
    if overlap > 0:
        edge = torch.linspace(0, 1, overlap + 2, device=device)[1:-1]  # never exactly 0: every pixel is covered
        if rise:
            w[:overlap] = torch.minimum(w[:overlap], edge)
        if fall:
            w[-overlap:] = torch.minimum(w[-overlap:], edge.flip(0))
    return w
