"""Reuse of transformer work across denoising steps (opt-in): TeaCache-style skipping of the whole block stack.

Why TeaCache (Liu et al. 2024, arXiv 2411.19108) rather than FORA (Selvaraju et al. 2024, arXiv 2407.01425):
FORA recomputes every N-th step and reuses each block's attention and MLP outputs in between, a fixed schedule
blind to how much the input moved (most at the first and last steps) that keeps one tensor per block and branch
(28 blocks × 3 × (B, N, D), ~2.4 GB at 1024² in fp32 for a CFG batch) and still runs the rest of every block.
TeaCache decides each step from a cheap signal, the relative L1 change of the first block's timestep-modulated
input, accumulated since the last full evaluation; below a threshold it adds the block stack's last residual
(output − input) to the new input instead of running the blocks. One cached tensor, one knob, and a skipped step
costs only the patch embedding and the final layer. We use the raw relative L1 change: TeaCache's polynomial
rescaling is fitted per model, and none was published for PixArt-α.
"""
from __future__ import annotations

from typing import Any

import torch

# Thresholds on the accumulated relative L1 change of the modulated input (bench/speed.py measures each one)
PRESETS = {"fast": 0.1, "faster": 0.2, "fastest": 0.3}


def cache_threshold(cache: float | str | None) -> float | None:
    """The threshold `cache=` asks for: a preset name or a positive number; None or 0 is off."""
    if cache is None or (not isinstance(cache, (str, bool)) and cache == 0):
        return None
    if isinstance(cache, str):
        if cache not in PRESETS:
            raise ValueError(f"cache={cache!r} is not a preset: use one of {', '.join(PRESETS)}, a threshold "
                             "such as 0.1, or None (off)")
        return PRESETS[cache]
    if isinstance(cache, bool) or not isinstance(cache, (int, float)) or not 0 < cache < float("inf"):
        raise ValueError(f"cache must be a preset ({', '.join(PRESETS)}), a positive threshold or None, got {cache!r}")
    return float(cache)


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean |a − b| / mean |b|."""
    return ((a - b).abs().mean() / b.abs().mean()).item()


class StepCache:
    """Calls the transformer like its forward, skipping the blocks while the modulated input changes little.

    One instance serves one sampling run of `num_steps` calls; the first and last steps always run in full.
    """

    def __init__(self, model: Any, threshold: float, num_steps: int):
        if not hasattr(model, "run_blocks"):
            raise ValueError(f"cache= needs pixart's PixArtTransformer2DModel, not {type(model).__name__}")
        self.model, self.threshold, self.num_steps = model, threshold, num_steps
        self.step = 0
        self.accumulated = 0.0
        self.previous: torch.Tensor | None = None  # the last step's modulated input of the first block
        self.residual: torch.Tensor | None = None  # output − input of the block stack at the last full evaluation

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 encoder_attention_mask: torch.Tensor | None = None, **conditions: torch.Tensor) -> torch.Tensor:
        model = self.model
        tokens, ctx = model.embed(x, timestep, encoder_hidden_states, encoder_attention_mask, **conditions)
        first = model.transformer_blocks[0]
        probe = first.norm(tokens, *first.modulation(ctx.t6)[:2])  # (B, N, D)
        if self._reuse(probe):
            out = tokens + self.residual
        else:
            out = model.run_blocks(tokens, ctx)
            self.residual = out - tokens
        self.previous, self.step = probe, self.step + 1
        return model.final(out, ctx, *x.shape[-2:])

    def _reuse(self, probe: torch.Tensor) -> bool:
        """TeaCache's rule: reuse while the change accumulated since the last full evaluation is below the threshold."""
        edge = self.step in (0, self.num_steps - 1)
        # a batch of another size (the guidance interval halves it) has no residual to reuse
        if edge or self.previous.shape != probe.shape:
            self.accumulated = 0.0
            return False
        self.accumulated += relative_l1(probe, self.previous)
        if self.accumulated < self.threshold:
            return True
        self.accumulated = 0.0
        return False
