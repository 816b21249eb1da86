"""The opt-in denoising options: guidance_interval=(σ_lo, σ_hi) (guidance only inside the noise-level window, the
batch halved outside it) and cache=... (TeaCache-style reuse of the block stack across steps); off, both are bit-equal
to the default."""
from __future__ import annotations

import pytest
import torch

import pixart
from pixart.configs import SchedulerConfig
from pixart.denoise import guidance_window
from pixart.reuse import PRESETS, CacheSetting, cache_setting
from pixart.samplers import make_timesteps, noise_levels

PROMPT = "a red circle on a white background"
# 128x128 without binning: 64 tokens, so 20 steps of the tiny model take a fraction of a second
SMALL = dict(height=128, width=128, use_resolution_binning=False, output_type="latent")


@pytest.fixture(scope="module")
def pipe(pipeline_dir_512):
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, steps=20, **kwargs):
    return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **SMALL, **kwargs).images


def batch_sizes(pipe, **kwargs) -> list[int]:
    """The batch of every transformer call during one generation."""
    sizes = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        latents(pipe, **kwargs)
    finally:
        hook.remove()
    return sizes


def test_window_covering_every_step_equals_plain_guidance_bit_for_bit(pipe):
    assert torch.equal(latents(pipe, steps=4, guidance_interval=(0, 1e9)), latents(pipe, steps=4))


def test_window_excluding_every_step_equals_guidance_one(pipe):
    assert torch.equal(latents(pipe, steps=4, guidance_interval=(1e8, 1e9)),
                       latents(pipe, steps=4, guidance_scale=1.0))


def test_outside_the_window_the_transformer_runs_on_the_conditional_half_only(pipe):
    # PixArt's 20 default steps have σ 157, 96, ... 6.1 (9 steps), 4.5 ... 0.34 (10 steps), 0.18: the paper's
    # SD-XL window (0.28, 5.42] guides the middle 10
    sizes = batch_sizes(pipe, steps=20, num_images_per_prompt=2, guidance_interval=(0.28, 5.42))
    assert sizes == [2] * 9 + [4] * 10 + [2]
    assert batch_sizes(pipe, steps=20, num_images_per_prompt=2) == [4] * 20


def test_window_is_half_open_on_sigma():
    config = SchedulerConfig()
    t = make_timesteps(config, 20)[9]  # t = 549
    sigma = float(noise_levels(config, t.reshape(1))[0])
    assert round(sigma, 3) == 4.541
    assert guidance_window(config, (1.0, sigma))(t) and not guidance_window(config, (sigma, 10.0))(t)


@pytest.mark.parametrize("interval, message", [
    ((5.0, 1.0), "0 <= sigma_lo < sigma_hi"),
    ((-1.0, 1.0), "0 <= sigma_lo < sigma_hi"),
    ((1.0,), "a pair"),
    ("0.3,5", "a pair"),
    ((0.3, "high"), "must be finite numbers"),
    ((0.0, float("inf")), "must be finite numbers"),  # would be written as Infinity into the PNG's JSON
])
def test_bad_interval_is_a_clear_error(pipe, interval, message):
    with pytest.raises(ValueError, match=message):
        latents(pipe, steps=1, guidance_interval=interval)


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
    # 20 steps with the window (0.28, 5.42]: batch 1 for 9 steps, 2 for 10, then 1 (see above)
    _, ran = run_counting(pipe, cache=1e9, guidance_interval=(0.28, 5.42))
    assert [i for i, r in enumerate(ran) if r] == [0, 9, 19]


def test_a_reuse_limit_recomputes_after_that_many_reused_steps(pipe):
    # a threshold nothing reaches, so only the limit (and the first and last steps) makes steps run
    _, once = run_counting(pipe, steps=7, cache=(1e9, 1))
    _, twice = run_counting(pipe, steps=7, cache=(1e9, 2))
    assert once == [True, False, True, False, True, False, True]
    assert twice == [True, False, False, True, False, False, True]


def window_schedule(steps: int, window: tuple[float, float], max_reuse: int) -> list[bool]:
    """Which steps run the blocks under a window setting without a threshold, worked out from the σ of each step:
    the first and last steps and every step with σ in the window run; elsewhere a step is reused unless max_reuse
    steps in a row already were."""
    sigmas = noise_levels(SchedulerConfig(), make_timesteps(SchedulerConfig(), steps)).tolist()
    ran, in_a_row = [], 0
    for i, sigma in enumerate(sigmas):
        run = i in (0, steps - 1) or window[0] < sigma <= window[1] or in_a_row == max_reuse
        in_a_row = 0 if run else in_a_row + 1
        ran.append(run)
    return ran


def test_fast_reuses_every_other_step_outside_the_noise_window_and_none_inside(pipe):
    _, ran = run_counting(pipe, cache="fast")
    assert ran == window_schedule(20, (1.8, 30.0), 1)
    # PixArt's 20 steps have σ 157, 96, 60, 39 | 26 ... 2.0 | 1.6, 1.2, 0.96, 0.72, 0.52, 0.34, 0.18
    assert [i for i, r in enumerate(ran) if not r] == [1, 3, 13, 15, 17]
    _, ran = run_counting(pipe, cache="faster")
    assert ran == window_schedule(20, (1.8, 30.0), 2)
    assert [i for i, r in enumerate(ran) if not r] == [1, 2, 13, 14, 16, 17]
    assert PRESETS["fastest"].max_reuse == 2 and PRESETS["fastest"].window is None


def test_a_window_over_every_step_runs_them_all_bit_for_bit(pipe):
    out, ran = run_counting(pipe, steps=6, cache=CacheSetting(None, 1, (0.0, 1e9)))
    assert ran == [True] * 6
    assert torch.equal(out, latents(pipe, steps=6))


def test_a_window_and_a_threshold_both_hold(pipe):
    # a threshold nothing passes: no reuse, window or not; one everything passes: the window alone decides
    _, ran = run_counting(pipe, cache=CacheSetting(1e-9, 1, (1.8, 30.0)))
    assert ran == [True] * 20
    _, ran = run_counting(pipe, cache=CacheSetting(1e9, 1, (1.8, 30.0)))
    assert ran == window_schedule(20, (1.8, 30.0), 1)


def test_presets_and_bad_values():
    assert cache_setting("fast") == PRESETS["fast"] and cache_setting(0.15) == CacheSetting(0.15, None)
    assert cache_setting((0.2, 3)) == CacheSetting(0.2, 3) and cache_setting([0.2, None]) == CacheSetting(0.2, None)
    assert cache_setting(CacheSetting(None, 1, [0, 5])) == CacheSetting(None, 1, (0.0, 5.0))
    assert cache_setting(None) is None and cache_setting(0) is None
    for bad, message in (("quick", "not a preset"), (-0.1, "positive threshold"), (True, "positive threshold"),
                         (float("nan"), "positive threshold"), (float("inf"), "positive threshold"),
                         ((0.1, 0), "max_reuse"), ((0.1, 1.5), "max_reuse"), ((0.1, True), "max_reuse"),
                         ((0.1, 1, 2), "positive threshold"), (("fast", 1), "positive threshold"),
                         (CacheSetting(None, 1, (5.0, 1.0)), "window"), (CacheSetting(None, 1, (1.0,)), "window"),
                         (CacheSetting(None, 1, (-1.0, 1.0)), "window"), (CacheSetting(0.0, 1), "positive")):
        with pytest.raises(ValueError, match=message):
            cache_setting(bad)


def caption_lengths(pipe, **kwargs) -> list[int]:
    """The caption length of every transformer call during one generation."""
    lengths = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: lengths.append(args[2].shape[1]))
    try:
        latents(pipe, steps=3, **kwargs)
    finally:
        hook.remove()
    return lengths


def test_captions_are_cut_after_the_last_real_token_with_the_same_result(pipe, monkeypatch):
    """The transformer sees the caption up to the batch's last real token (the prompt and "" of guidance: the
    prompt's tokens and EOS), not T5's 120 positions; attention gives the cut padding weight exp(-10000) = 0, so the
    latents equal the uncut ones up to float rounding: matmuls and attention over other lengths sum in another order
    (measured: 3e-4 where the largest latent of this random model is 727, 4e-7 of it; bound: 1e-5 of it, 80 float32
    epsilons)."""
    tokens = int(pipe.tokenizer([PROMPT], padding="max_length", max_length=120,
                                return_tensors="pt").attention_mask.sum())  # with EOS
    assert caption_lengths(pipe) == [tokens] * 3
    cut = latents(pipe, steps=3)
    monkeypatch.setattr(pixart.denoise, "caption_length", lambda mask: None)  # nothing cut
    assert caption_lengths(pipe) == [120] * 3
    uncut = latents(pipe, steps=3)
    assert float((uncut - cut).abs().max()) <= 1e-5 * float(uncut.abs().max())


def test_caption_length_keeps_rows_without_tokens_and_unpadded_batches():
    from pixart.denoise import caption_length

    mask = torch.zeros(3, 10, dtype=torch.long)
    mask[0, :2], mask[1, :5], mask[2, [0, 6]] = 1, 1, 1  # a hole in row 2: its last real token counts
    assert caption_length(mask) == 7
    assert caption_length(torch.ones(2, 10)) is None  # nothing to cut
    mask[2] = 0  # a row without real tokens attends evenly to all its padding: cutting would change it
    assert caption_length(mask) is None
