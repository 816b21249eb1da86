"""guidance_interval=(σ_lo, σ_hi): classifier-free guidance only inside the noise-level window, batch halved outside."""
from __future__ import annotations

import pytest
import torch

import pixart
from pixart.configs import SchedulerConfig
from pixart.denoise import guidance_window
from pixart.samplers import make_timesteps, noise_levels

PROMPT = "a red circle on a white background"
# 128x128 without binning: 64 tokens, so 20 steps of the tiny model take a fraction of a second
SMALL = dict(height=128, width=128, use_resolution_binning=False, output_type="latent")


@pytest.fixture(scope="module")
def pipe(pipeline_dir_512):
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, steps=4, **kwargs):
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
    assert torch.equal(latents(pipe, guidance_interval=(0, 1e9)), latents(pipe))


def test_window_excluding_every_step_equals_guidance_one(pipe):
    assert torch.equal(latents(pipe, guidance_interval=(1e8, 1e9)), latents(pipe, guidance_scale=1.0))


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
    ((0.3, "high"), "must be numbers"),
])
def test_bad_interval_is_a_clear_error(pipe, interval, message):
    with pytest.raises(ValueError, match=message):
        latents(pipe, steps=1, guidance_interval=interval)
