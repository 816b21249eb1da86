"""Reuse of transformer work across denoising steps (opt-in): TeaCache-style skipping of the whole block stack.

Why TeaCache (Liu et al. 2024, arXiv 2411.19108) rather than FORA (Selvaraju et al. 2024, arXiv 2407.01425):
FORA recomputes every N-th step and reuses each block's attention and MLP outputs in between, a fixed schedule
blind to how much the input moved (most at the first and last steps) that keeps one tensor per block and branch
(28 blocks × 3 × (B, N, D), ~2.4 GB at 1024² in fp32 for a CFG batch) and still runs the rest of every block.
TeaCache decides each step from a cheap signal, the relative L1 change of the first block's timestep-modulated
input, accumulated since the last full evaluation; below a threshold it adds the block stack's last residual
(output − input) to the new input instead of running the blocks. One cached tensor, one knob, and a skipped step
costs only the patch embedding and the final layer. We use the raw relative L1 change: TeaCache's polynomial
rescaling is fitted per model, and none was published for PixArt-α. Our presets add a limit TeaCache lacks: at most
one (two for `fastest`) reused step in a row, since a residual reused a second time has drifted twice as far (on
the demo model, 9 of 20 steps skipped: 31.4 dB PSNR to the uncached images with the limit, 29.4 without).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch


class CacheSetting(NamedTuple):
    """When a step reuses the last residual: while the accumulated change stays below `threshold`, and for at most
    `max_reuse` steps in a row (None: no limit, TeaCache's own rule)."""

    threshold: float
    max_reuse: int | None = None


# Measured on the demo model (20 steps, 108 images; bench/speed.py --model demo): a residual reused once stays close,
# reused again it drifts. With the limit, `fast` skips 6 of 20 steps at 32.6 dB PSNR to the uncached images and the
# default classifier score (96.3%); TeaCache's rule alone at the same threshold skips 9 at 29.4 dB and 91.7%.
PRESETS = {"fast": CacheSetting(0.1, 1), "faster": CacheSetting(0.2, 1), "fastest": CacheSetting(0.3, 2)}


def cache_setting(cache: Any) -> CacheSetting | None:
    """The setting `cache=` asks for: a preset name, a positive threshold (no limit on reuse), a pair
    (threshold, max_reuse) or a CacheSetting; None or 0 is off. A ValueError names anything else."""
    if cache is None or (isinstance(cache, (int, float)) and not isinstance(cache, bool) and cache == 0):
        return None
    if isinstance(cache, str):
        if cache not in PRESETS:
            raise ValueError(f"cache={cache!r} is not a preset: use one of {', '.join(PRESETS)}, a threshold "
                             "such as 0.1, or None (off)")
        return PRESETS[cache]
    threshold, max_reuse = (cache, None) if not isinstance(cache, (tuple, list)) or len(cache) != 2 else cache
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < float("inf"):
        raise ValueError(f"cache must be a preset ({', '.join(PRESETS)}), a positive threshold, a pair "
                         f"(threshold, max_reuse) or None, got {cache!r}")
    if max_reuse is not None and (isinstance(max_reuse, bool) or not isinstance(max_reuse, int) or max_reuse < 1):
        raise ValueError(f"cache=(threshold, max_reuse) needs max_reuse to be a whole number of steps >= 1 (or None "
                         f"for no limit), got {max_reuse!r}")
    return CacheSetting(float(threshold), max_reuse)


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean |a − b| / mean |b|."""
    return ((a - b).abs().mean() / b.abs().mean()).item()


class StepCache:
    """Calls the transformer like its forward, skipping the blocks while the modulated input changes little.

    One instance serves one sampling run of `num_steps` calls; the first and last steps always run in full.
    """

    def __init__(self, model: Any, setting: CacheSetting, num_steps: int):
        if not hasattr(model, "run_blocks"):
            raise ValueError(f"cache= needs pixart's PixArtTransformer2DModel, not {type(model).__name__}")
        self.model, self.threshold, self.max_reuse, self.num_steps = model, *setting, num_steps
        self.step = 0
        self.reused = 0  # steps in a row that reused the residual
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
            self.reused += 1
        else:
            self.reused = 0
            out = model.run_blocks(tokens, ctx)
            self.residual = out - tokens
        self.previous, self.step = probe, self.step + 1
        return model.final(out, ctx, *x.shape[-2:])

    def _reuse(self, probe: torch.Tensor) -> bool:
        """TeaCache's rule: reuse while the change accumulated since the last full evaluation is below the threshold,
        and at most max_reuse steps in a row."""
        edge = self.step in (0, self.num_steps - 1) or self.reused == self.max_reuse
        # a batch of another size (the guidance interval halves it) has no residual to reuse
        if edge or self.previous.shape != probe.shape:
            self.accumulated = 0.0
            return False
        self.accumulated += relative_l1(probe, self.previous)
        if self.accumulated < self.threshold:
            return True
        self.accumulated = 0.0
        return False
