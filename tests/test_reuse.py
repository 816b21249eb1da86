"""cache=...: TeaCache-style reuse of the block stack across steps; off by default and then bit-equal."""
from __future__ import annotations

import pytest
import torch

import pixart
from pixart.reuse import PRESETS, cache_threshold

PROMPT = "a red circle on a white background"
SMALL = dict(height=128, width=128, use_resolution_binning=False, output_type="latent")


@pytest.fixture(scope="module")
def pipe(pipeline_dir_512):
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, steps=20, **kwargs):
    return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **SMALL, **kwargs).images


def run_counting(pipe, **kwargs) -> tuple[torch.Tensor, list[bool]]:
    """The latents, and for every step whether the transformer blocks ran (a counting wrapper on run_blocks)."""
    transformer, ran = pipe.transformer, []
    inner = transformer.run_blocks

    def counting(*args):
        ran[-1] = True
        return inner(*args)

    embed = transformer.embed
    transformer.run_blocks = counting
    transformer.embed = lambda *args, **kw: (ran.append(False), embed(*args, **kw))[1]  # once per step, either path
    try:
        out = latents(pipe, **kwargs)
    finally:
        del transformer.run_blocks, transformer.embed
    return out, ran


def test_cache_off_equals_the_default_bit_for_bit(pipe):
    default = latents(pipe, steps=4)
    assert torch.equal(latents(pipe, steps=4, cache=None), default)
    assert torch.equal(latents(pipe, steps=4, cache=0), default)


def test_a_threshold_skips_most_block_evaluations_and_stays_close(pipe):
    full, ran_full = run_counting(pipe)
    cached, ran = run_counting(pipe, cache=0.2)
    assert ran_full == [True] * 20
    assert sum(ran) <= 10, ran  # the tiny model's modulated input moves 3-30% per step: 7 of 20 run here
    # Reusing residuals must be far closer to the full image than simply sampling with as few steps: relative RMS
    # 5e-4 here (bound 1e-3), where sum(ran)-step sampling is off by ~9% of the latents' spread
    rms = lambda a: a.pow(2).mean().sqrt()  # noqa: E731
    assert rms(cached - full) < 1e-3 * full.std()
    assert rms(cached - full) < 0.01 * rms(latents(pipe, steps=sum(ran)) - full)


def test_first_and_last_steps_always_run_in_full(pipe):
    _, ran = run_counting(pipe, steps=6, cache=1e9)  # a threshold nothing reaches: every other step is reused
    assert ran == [True, False, False, False, False, True]


def test_a_batch_size_change_from_the_guidance_interval_recomputes(pipe):
    # 20 steps with the window (0.28, 5.42]: batch 1 for 9 steps, 2 for 10, then 1 (tests/test_guidance_interval.py)
    _, ran = run_counting(pipe, cache=1e9, guidance_interval=(0.28, 5.42))
    assert [i for i, r in enumerate(ran) if r] == [0, 9, 19]


def test_presets_and_bad_values():
    assert cache_threshold("fast") == PRESETS["fast"] and cache_threshold(0.15) == 0.15
    assert cache_threshold(None) is None and cache_threshold(0) is None
    for bad, message in (("quick", "not a preset"), (-0.1, "positive threshold"), (True, "positive threshold")):
        with pytest.raises(ValueError, match=message):
            cache_threshold(bad)
