"""Reuse of transformer work across denoising steps (opt-in): TeaCache-style skipping of the whole block stack.

Why TeaCache (Liu et al. 2024, arXiv 2411.19108) rather than FORA (Selvaraju et al. 2024, arXiv 2407.01425): FORA
recomputes every N-th step and reuses each block's attention and MLP outputs in between, a fixed schedule blind to
how much the input moved (most at the first and last steps) that keeps one tensor per block and branch (28 blocks ×
3 × (B, N, D), ~2.4 GB at 1024² in fp32 for a CFG batch) and still runs the rest of every block. TeaCache decides
each step from a cheap signal, the relative L1 change of the first block's timestep-modulated input, accumulated
since the last full evaluation; below a threshold it adds the block stack's last residual (output − input) to the
new input instead of running the blocks. One cached tensor, one knob, and a skipped step costs only the patch
embedding and the final layer. We use the raw relative L1 change: TeaCache's polynomial rescaling is fitted per
model, and none was published for PixArt-α. Our presets add a limit TeaCache lacks: at most one (two for `faster`
and `fastest`) reused step in a row, since a residual reused a second time has drifted twice as far (on the demo
model, 9 of 20 steps skipped: 31.4 dB PSNR to the uncached images with the limit, 29.4 without).

Where to reuse matters more than TeaCache's signal tells. On the demo model (20 steps, 108 images, PSNR to the
uncached images pooled over all of them), TeaCache's rule at threshold 0.1 reuses every other step from σ 96 down to
2.6 (6 steps) and costs 28.0 dB, but reusing 5 steps at the two ends of the schedule only (σ 96 and 39; 1.6, 0.96
and 0.52) costs 34.6 dB; every other step throughout (9) 25.9 dB; and plain sampling with 14 or 16 steps instead of
20, 28.7 and 31.9 dB. Early, at high noise, the prediction is mostly the input's own noise; late, the image is
settled and each step small. So the `fast` and `faster` presets reuse only outside a window on the noise level σ
(as the guidance interval, so it means the same for every sampler and step count): every step with σ in (1.8, 30]
runs, and outside it up to one (`faster`: two) step in a row is reused, whatever the modulated input's change says.
Not a free lunch at every step count: at 30 steps `fast` runs 22 and gives 37.9 dB, where 22 plain steps give 45.7
(DPM-Solver++ has nearly converged), while at 20 steps 15 plain steps give 28.3 dB against its 34.6.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from .denoise import check_guidance_interval


class CacheSetting(NamedTuple):
    """When a step reuses the last residual: while the accumulated change stays below `threshold` (None: whatever
    it is), for at most `max_reuse` steps in a row (None: no limit, TeaCache's own rule), and never at a step whose
    noise level σ lies in `window` = (σ_lo, σ_hi] (None: at any step)."""

    threshold: float | None
    max_reuse: int | None = None
    window: tuple[float, float] | None = None


# Measured on the demo model (20 steps, 108 images, PSNR to the uncached images pooled over all; bench/speed.py
# --model demo; classifier score 96.3% uncached): `fast` skips 5 of 20 steps at 34.6 dB (score 95.4%), `faster` 6
# at 31.4 dB (92.6%), `fastest` 12 at 22.0 dB (90.7%). On 324 images (6 seeds, the bench's default since; 95.1%
# uncached): `fast` 32.6 dB (92.9%), `faster` 29.4 dB (91.7%).
PRESETS = {"fast": CacheSetting(None, 1, (1.8, 30.0)), "faster": CacheSetting(None, 2, (1.8, 30.0)),
           "fastest": CacheSetting(0.3, 2)}


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
    if isinstance(cache, CacheSetting):
        threshold, max_reuse, window = cache
    else:
        threshold, max_reuse = (cache, None) if not isinstance(cache, (tuple, list)) or len(cache) != 2 else cache
        window = None
    if not (threshold is None and isinstance(cache, CacheSetting)) and not (
            _number(threshold) and 0 < threshold < float("inf")):
        raise ValueError(f"cache must be a preset ({', '.join(PRESETS)}), a positive threshold, a pair "
                         f"(threshold, max_reuse) or None, got {cache!r}")
    if max_reuse is not None and (isinstance(max_reuse, bool) or not isinstance(max_reuse, int) or max_reuse < 1):
        raise ValueError(f"cache=(threshold, max_reuse) needs max_reuse to be a whole number of steps >= 1 (or None "
                         f"for no limit), got {max_reuse!r}")
    window = check_guidance_interval(window, "a cache window")  # the same σ window as the guidance interval's
    return CacheSetting(None if threshold is None else float(threshold), max_reuse, window)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean |a − b| / mean |b|."""
    return ((a - b).abs().mean() / b.abs().mean()).item()


class StepCache:
    """Calls the transformer like its forward, skipping the blocks while the modulated input changes little.

    One instance serves one sampling run of `num_steps` calls; the first and last steps always run in full.
    noise_level(t) is the σ of timestep t (for a setting with a window).
    """

    def __init__(self, model: Any, setting: CacheSetting, num_steps: int,
                 noise_level: Callable[[torch.Tensor], float] | None = None):
        if not hasattr(model, "run_blocks"):
            raise ValueError(f"cache= needs pixart's PixArtTransformer2DModel, not {type(model).__name__}")
        if setting.window is not None and noise_level is None:
            raise ValueError("a cache setting with a noise-level window needs noise_level(t)")
        self.model, self.setting, self.num_steps, self.noise_level = model, setting, num_steps, noise_level
        self.step = 0
        self.reused = 0  # steps in a row that reused the residual
        self.accumulated = 0.0
        self.batch: int | None = None  # the last step's batch size
        self.previous: torch.Tensor | None = None  # the last step's modulated input of the first block
        self.residual: torch.Tensor | None = None  # output − input of the block stack at the last full evaluation

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 encoder_attention_mask: torch.Tensor | None = None, **conditions: torch.Tensor) -> torch.Tensor:
        model = self.model
        tokens, ctx = model.embed(x, timestep, encoder_hidden_states, encoder_attention_mask, **conditions)
        probe = None
        if self.setting.threshold is not None:
            first = model.transformer_blocks[0]
            probe = first.norm(tokens, *first.modulation(ctx.t6)[:2])  # (B, N, D)
        if self._reuse(probe, x.shape[0], timestep):
            out = tokens + self.residual
            self.reused += 1
        else:
            self.reused = 0
            out = model.run_blocks(tokens, ctx)
            self.residual = out - tokens
        self.previous, self.batch, self.step = probe, x.shape[0], self.step + 1
        return model.final(out, ctx, *x.shape[-2:])

    def _reuse(self, probe: torch.Tensor | None, batch: int, timestep: torch.Tensor) -> bool:
        """TeaCache's rule: reuse while the change accumulated since the last full evaluation is below the threshold,
        at most max_reuse steps in a row, and outside the noise-level window."""
        threshold, max_reuse, window = self.setting
        edge = self.step in (0, self.num_steps - 1) or self.reused == max_reuse
        # a batch of another size (the guidance interval halves it) has no residual to reuse
        if edge or batch != self.batch or (window is not None and window[0] < self.noise_level(timestep) <= window[1]):
            self.accumulated = 0.0
            return False
        if threshold is None:
            return True
        self.accumulated += relative_l1(probe, self.previous)
        if self.accumulated < threshold:
            return True
        self.accumulated = 0.0
        return False
