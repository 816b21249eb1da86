"""Samplers against diffusers' schedulers: configs saved by diffusers, same timesteps, same latents at every step."""
import dataclasses
import json

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler)

from pixart.configs import SchedulerConfig
from pixart.samplers import SAMPLERS, make_timesteps, noise_schedule, randn_tensor
from pixart.steppers import sample

# PixArt-α's scheduler_config.json (DPM-Solver++ 2M) and PixArt-LCM-XL-2-1024-MS's (LCM).
PIXART_DPM = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                  prediction_type="epsilon", solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                  lower_order_final=True, timestep_spacing="linspace", final_sigmas_type="zero",
                  use_karras_sigmas=False, steps_offset=0)
PIXART_LCM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  original_inference_steps=50, timestep_scaling=10, prediction_type="epsilon", set_alpha_to_one=True,
                  steps_offset=0, clip_sample=False, timestep_spacing="leading")


def _pixart_scheduler(cls):
    """cls with PixArt's config: the LCM checkpoint's own, else PixArt's DPM config (as from_config switches)."""
    if cls is LCMScheduler:
        return LCMScheduler(**PIXART_LCM)
    return cls.from_config(DPMSolverMultistepScheduler(**PIXART_DPM).config)


CLASSES = [DPMSolverMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
           LCMScheduler]
NOISY = (EulerAncestralDiscreteScheduler, LCMScheduler)  # they add fresh noise at each step: a seeded generator
STEPS = [1, 2, 4, 14, 20, 25, 50]

# Non-default options, each run through the whole loop (class, config changes).
VARIANTS = [
    (DPMSolverMultistepScheduler, dict(timestep_spacing="leading", steps_offset=1)),
    (DPMSolverMultistepScheduler, dict(timestep_spacing="trailing")),
    (DPMSolverMultistepScheduler, dict(solver_type="heun", lower_order_final=False)),
    (DPMSolverMultistepScheduler, dict(solver_order=1)),
    (DPMSolverMultistepScheduler, dict(final_sigmas_type="sigma_min", euler_at_final=True)),
    (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
    (DPMSolverMultistepScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    (DPMSolverMultistepScheduler, dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)),
    (DPMSolverMultistepScheduler, dict(prediction_type="v_prediction")),
    (DPMSolverMultistepScheduler, dict(prediction_type="sample")),
    (DDIMScheduler, dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)),
    (DDIMScheduler, dict(timestep_spacing="trailing", clip_sample=False)),
    (DDIMScheduler, dict(prediction_type="v_prediction")),
    (DDIMScheduler, dict(prediction_type="sample", clip_sample_range=0.5)),
    (EulerDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1)),
    (EulerDiscreteScheduler, dict(timestep_spacing="trailing", final_sigmas_type="sigma_min")),
    (EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
    (EulerDiscreteScheduler, dict(prediction_type="v_prediction")),
    (EulerDiscreteScheduler, dict(prediction_type="sample")),
    (EulerAncestralDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1)),
    (EulerAncestralDiscreteScheduler, dict(timestep_spacing="trailing")),
    (EulerAncestralDiscreteScheduler, dict(prediction_type="v_prediction")),
    (LCMScheduler, dict(original_inference_steps=100, timestep_scaling=5.0)),
    (LCMScheduler, dict(set_alpha_to_one=False, clip_sample=True)),
    (LCMScheduler, dict(prediction_type="v_prediction")),
    (LCMScheduler, dict(prediction_type="sample")),
]


def _config(scheduler, tmp_path) -> SchedulerConfig:
    """The diffusers scheduler's config as saved by diffusers, read by pixart."""
    scheduler.save_config(tmp_path)
    return SchedulerConfig.from_json(tmp_path / "scheduler_config.json")


def _variant(cls, changes):
    """PixArt's scheduler of cls with some options changed."""
    base = {k: v for k, v in _pixart_scheduler(cls).config.items() if k != "_use_default_values"}
    scheduler = cls.from_config({**base, **changes})
    assert all(scheduler.config[k] == v for k, v in changes.items())
    return scheduler


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear function of latents and timestep standing in for the transformer."""
    return 0.3 * torch.tanh(x) + 0.01 * t / 1000 - 0.05 * x


def diffusers_loop(scheduler, steps, x, *, timesteps=None, seeds=None, eta=0.0, edit=None):
    """diffusers' PixArt pipeline loop; returns every step's latents and the (t, model input) the model saw."""
    if timesteps is None:
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    scheduler.set_begin_index(0) if hasattr(scheduler, "set_begin_index") else None
    kwargs = {"eta": eta} if eta else {}  # DDIM's; the others take no eta
    if seeds is not None:
        kwargs["generator"] = _generators(seeds)
    latents, seen, per_step = x * scheduler.init_noise_sigma, [], []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(latents, t)
        seen.append((t, x_in))
        latents = scheduler.step(fake_model(x_in, t), t, latents, **kwargs, return_dict=False)[0]
        latents = edit(latents) if edit is not None else latents
        per_step.append(latents)
    return per_step, seen


def pixart_loop(config, steps, x, *, timesteps=None, seeds=None, eta=0.0, edit=None):
    """pixart's sample() with the same inputs, recording the same things through model_fn and the callback."""
    seen, per_step = [], []

    def model_fn(x_in, t):
        seen.append((t, x_in))
        return fake_model(x_in, t)

    def callback(i, t, latents):
        latents = edit(latents) if edit is not None else latents
        per_step.append(latents)
        return latents

    ts = make_timesteps(config, steps if timesteps is None else None, timesteps)
    generator = _generators(seeds) if seeds is not None else None
    out = sample(config, model_fn, x, ts, generator=generator, eta=eta, callback=callback)
    assert out is per_step[-1]
    return per_step, seen


def _generators(seeds):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return gens if len(gens) > 1 else gens[0]


def assert_same_run(ours, theirs, atol=1e-5, t_atol=0.0):
    """Same number of steps, same timesteps (value and dtype), same model inputs and latents at every step."""
    (our_steps, our_seen), (their_steps, their_seen) = ours, theirs
    assert len(our_steps) == len(their_steps)
    for (t, x_in), (t_ref, x_ref) in zip(our_seen, their_seen):
        assert t.dtype == t_ref.dtype and t.dim() == 0
        torch.testing.assert_close(t, t_ref, atol=t_atol, rtol=0)
        torch.testing.assert_close(x_in, x_ref, atol=atol, rtol=0)
    for i, (x, x_ref) in enumerate(zip(our_steps, their_steps)):
        assert x.dtype == x_ref.dtype
        torch.testing.assert_close(x, x_ref, atol=atol, rtol=0, msg=lambda m: f"step {i}: {m}")


def _noise(batch=1, dtype=torch.float32):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_timesteps_equal_diffusers_for_pixart_configs(cls, tmp_path):
    scheduler = _pixart_scheduler(cls)
    config = _config(scheduler, tmp_path)
    assert config.class_name == cls.__name__
    for steps in STEPS:
        scheduler.set_timesteps(steps)
        ours = make_timesteps(config, steps)
        assert ours.dtype == scheduler.timesteps.dtype
        assert torch.equal(ours, scheduler.timesteps), (steps, ours, scheduler.timesteps)


def test_dpm_20_step_timesteps_are_pixart_golden_values():
    # round(49.95·i) for i = 20..1, half to even: 499.5 → 500
    golden = [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350, 300, 250, 200, 150, 100, 50]
    assert make_timesteps(SchedulerConfig(), 20).tolist() == golden


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_noise_schedule_equals_diffusers_alphas_cumprod(cls, tmp_path):
    scheduler = _pixart_scheduler(cls)
    assert torch.equal(noise_schedule(_config(scheduler, tmp_path)), scheduler.alphas_cumprod)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("steps", [1, 2, 4, 14, 20, 25])
def test_sampling_loop_matches_diffusers_every_step_fp32(cls, steps, tmp_path):
    scheduler = _pixart_scheduler(cls)
    config = _config(scheduler, tmp_path)
    x = _noise(batch=2)
    seeds = [7] if cls in NOISY else None
    assert_same_run(pixart_loop(config, steps, x, seeds=seeds), diffusers_loop(scheduler, steps, x, seeds=seeds))


@pytest.mark.parametrize("cls,changes", VARIANTS, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_sampling_loop_matches_diffusers_with_other_options(cls, changes, tmp_path):
    scheduler = _variant(cls, changes)
    config = _config(scheduler, tmp_path)
    assert all(getattr(config, k) == v for k, v in changes.items())
    seeds = [3] if cls in NOISY else None
    # Euler + Karras timesteps come from log σ, where numpy's and torch's float32 log may differ by an ulp
    t_atol = 1e-4 if cls is EulerDiscreteScheduler and changes.get("use_karras_sigmas") else 0.0
    for steps in (1, 4, 20):
        scheduler.set_timesteps(steps)
        torch.testing.assert_close(make_timesteps(config, steps), scheduler.timesteps, atol=t_atol, rtol=0)
        assert_same_run(pixart_loop(config, steps, _noise(), seeds=seeds),
                        diffusers_loop(scheduler, steps, _noise(), seeds=seeds), t_atol=t_atol)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_bf16_loop_is_bitwise_diffusers_bf16(cls, tmp_path):
    scheduler = _pixart_scheduler(cls)
    config = _config(scheduler, tmp_path)
    seeds = [5] if cls in NOISY else None
    x = _noise(dtype=torch.bfloat16)
    assert_same_run(pixart_loop(config, 20 if cls is not LCMScheduler else 4, x, seeds=seeds),
                    diffusers_loop(scheduler, 20 if cls is not LCMScheduler else 4, x, seeds=seeds), atol=0.0)


@pytest.mark.parametrize("cls,timesteps", [
    (DPMSolverMultistepScheduler, [999, 800, 600, 350, 120, 10]),
    (EulerDiscreteScheduler, [999.0, 750.5, 402.25, 100.0, 3.5]),
    (LCMScheduler, [999, 759, 499, 259]),
], ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_custom_timesteps_match_diffusers(cls, timesteps, tmp_path):
    scheduler = _pixart_scheduler(cls)
    config = _config(scheduler, tmp_path)
    seeds = [11] if cls in NOISY else None
    scheduler.set_timesteps(timesteps=timesteps)
    assert torch.equal(make_timesteps(config, timesteps=timesteps), scheduler.timesteps)
    assert_same_run(pixart_loop(config, None, _noise(), timesteps=timesteps, seeds=seeds),
                    diffusers_loop(scheduler, None, _noise(), timesteps=timesteps, seeds=seeds))


def test_ddim_rejects_custom_timesteps(tmp_path):
    config = _config(_pixart_scheduler(DDIMScheduler), tmp_path)
    with pytest.raises(ValueError, match="custom timesteps"):
        make_timesteps(config, timesteps=[999, 500])


def test_lcm_generator_list_draws_per_item_noise_like_diffusers(tmp_path):
    scheduler = _pixart_scheduler(LCMScheduler)
    config = _config(scheduler, tmp_path)
    x = _noise(batch=2)
    ours = pixart_loop(config, 4, x, seeds=[1, 2])
    assert_same_run(ours, diffusers_loop(scheduler, 4, x, seeds=[1, 2]))
    assert not torch.equal(ours[0][0], pixart_loop(config, 4, x, seeds=[1, 3])[0][0])  # the second seed matters


def test_ddim_eta_noise_matches_diffusers(tmp_path):
    scheduler = _pixart_scheduler(DDIMScheduler)
    config = _config(scheduler, tmp_path)
    x = _noise(batch=2)
    ours = pixart_loop(config, 10, x, seeds=[4, 9], eta=0.7)
    assert_same_run(ours, diffusers_loop(scheduler, 10, x, seeds=[4, 9], eta=0.7))
    assert not torch.allclose(ours[0][-1], pixart_loop(config, 10, x, seeds=[4, 9])[0][-1])  # eta adds noise


def test_callback_returning_a_tensor_replaces_latents_mid_run(tmp_path):
    scheduler = _pixart_scheduler(DPMSolverMultistepScheduler)
    config = _config(scheduler, tmp_path)
    edit = lambda latents: latents * 0.9 + 0.01  # noqa: E731
    ours = pixart_loop(config, 20, _noise(), edit=edit)
    assert_same_run(ours, diffusers_loop(scheduler, 20, _noise(), edit=edit))
    assert not torch.allclose(ours[0][-1], pixart_loop(config, 20, _noise())[0][-1])


def test_callback_may_abort_sampling():
    def stop(i, t, x):
        if i == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        sample(SchedulerConfig(), fake_model, _noise(), make_timesteps(SchedulerConfig(), 20), callback=stop)


def test_randn_tensor_matches_diffusers_for_single_and_listed_generators():
    from diffusers.utils.torch_utils import randn_tensor as diffusers_randn

    for seeds in ([3], [3, 4]):
        ours = randn_tensor((len(seeds), 4, 8, 8), _generators(seeds), dtype=torch.bfloat16)
        assert torch.equal(ours, diffusers_randn((len(seeds), 4, 8, 8), _generators(seeds), dtype=torch.bfloat16))
    one = [torch.Generator().manual_seed(3)]  # a list of one generator is that generator, whatever the batch
    assert torch.equal(randn_tensor((2, 4, 8, 8), one), diffusers_randn((2, 4, 8, 8), [torch.Generator().manual_seed(3)]))
    with pytest.raises(ValueError, match="generators"):
        randn_tensor((3, 4, 8, 8), _generators([1, 2]))


@pytest.mark.parametrize("bad", [0, -1, 1001])
def test_make_timesteps_rejects_step_counts_out_of_range(bad):
    with pytest.raises(ValueError, match="a whole number from 1 to num_train_timesteps"):
        make_timesteps(SchedulerConfig(), bad)


def test_make_timesteps_needs_exactly_one_of_steps_and_timesteps():
    with pytest.raises(ValueError, match="exactly one"):
        make_timesteps(SchedulerConfig())
    with pytest.raises(ValueError, match="exactly one"):
        make_timesteps(SchedulerConfig(), 4, [999, 500])


def test_lcm_rejects_more_steps_than_its_original_schedule_and_unordered_timesteps():
    config = SchedulerConfig.from_dict(dict(PIXART_LCM, _class_name="LCMScheduler"))
    with pytest.raises(ValueError, match="original_inference_steps"):
        make_timesteps(config, 51)
    with pytest.raises(ValueError, match="strictly decreasing"):
        make_timesteps(config, timesteps=[999, 999, 500])


@pytest.mark.parametrize("timesteps", [[10, 500, 900], [5000, 10], [999, -1], [999.7, 999.2]])
def test_custom_timesteps_out_of_range_or_not_decreasing_are_named(timesteps):
    with pytest.raises(ValueError, match=r"strictly decreasing whole numbers from at most 999 .*got \["):
        make_timesteps(SchedulerConfig(), timesteps=timesteps)
    assert make_timesteps(SchedulerConfig(), timesteps=[999, 500, 0]).tolist() == [999, 500, 0]


def test_unknown_scheduler_is_an_error_listing_the_supported_ones():
    config = SchedulerConfig(class_name="UniPCMultistepScheduler")
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, LCM"):
        make_timesteps(config, 20)
    with pytest.raises(ValueError, match="UniPCMultistepScheduler"):
        sample(config, fake_model, _noise(), torch.tensor([999]))
    assert set(SAMPLERS) == {c.__name__ for c in CLASSES}


@pytest.mark.parametrize("changes", [dict(algorithm_type="sde-dpmsolver++"), dict(solver_order=3),
                                     dict(thresholding=True), dict(use_exponential_sigmas=True),
                                     dict(rescale_betas_zero_snr=True), dict(prediction_type="flow_prediction")])
def test_unsupported_options_are_errors_not_silent_differences(changes, tmp_path):
    config = _config(_variant(DPMSolverMultistepScheduler, changes), tmp_path)
    with pytest.raises(ValueError, match=f"{next(iter(changes))}=.*not supported"):
        make_timesteps(config, 20)


def test_eta_is_ignored_by_deterministic_samplers_as_in_diffusers():
    ts = make_timesteps(SchedulerConfig(), 4)
    assert torch.equal(sample(SchedulerConfig(), fake_model, _noise(), ts, eta=1.0),
                       sample(SchedulerConfig(), fake_model, _noise(), ts))


@pytest.mark.parametrize("cls", [DDIMScheduler, LCMScheduler], ids=lambda c: c.__name__)
def test_a_minimal_config_takes_the_class_defaults_diffusers_takes(cls, tmp_path):
    (tmp_path / "scheduler_config.json").write_text(f'{{"_class_name": "{cls.__name__}"}}')
    config = SchedulerConfig.from_json(tmp_path / "scheduler_config.json")
    scheduler = cls.from_config({})
    scheduler.set_timesteps(4)
    assert torch.equal(make_timesteps(config, 4), scheduler.timesteps)
    assert torch.equal(noise_schedule(config), scheduler.alphas_cumprod)
    assert config.clip_sample == scheduler.config.clip_sample


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_saved_config_is_the_one_diffusers_writes_for_the_keys_we_know(cls, tmp_path):
    """Our scheduler_config.json has only the class's own keys (diffusers loads it without unused keys) and the same
    values as diffusers' own file for every key we read."""
    cls.from_config({"beta_schedule": "scaled_linear", "timestep_spacing": "trailing"}).save_config(tmp_path / "d")
    ours = SchedulerConfig.from_json(tmp_path / "d" / "scheduler_config.json")
    ours.save(tmp_path / "ours.json")
    written = json.loads((tmp_path / "ours.json").read_text())
    assert written["_class_name"] == cls.__name__
    _, unused = cls.from_config({k: v for k, v in written.items() if k != "_class_name"}, return_unused_kwargs=True)
    assert unused == {}
    theirs = json.loads((tmp_path / "d" / "scheduler_config.json").read_text())
    known = {f.name for f in dataclasses.fields(SchedulerConfig)}
    assert {k: v for k, v in theirs.items() if k in known} == {k: v for k, v in written.items() if k != "_class_name"}


# diffusers' stateful interface on our config: the loop above, written for a diffusers scheduler, run on both

@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_diffusers_style_loop_on_our_config_steps_as_diffusers(cls, dtype, tmp_path):
    scheduler = _pixart_scheduler(cls)
    config = _config(scheduler, tmp_path)
    seeds = [4] if cls in NOISY else None
    for steps in (1, 4, 20) if cls is not LCMScheduler else (1, 4, 8):
        ours = diffusers_loop(config, steps, _noise(batch=2, dtype=dtype), seeds=seeds)
        assert_same_run(ours, diffusers_loop(scheduler, steps, _noise(batch=2, dtype=dtype), seeds=seeds), atol=0.0)
        assert config.num_inference_steps == steps and config.step_index == steps
        assert torch.equal(config.timesteps, scheduler.timesteps)
    assert torch.equal(torch.as_tensor(config.init_noise_sigma), torch.as_tensor(scheduler.init_noise_sigma))


@pytest.mark.parametrize("cls,changes", [v for v in VARIANTS if v[0] is not LCMScheduler][::2],
                         ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_a_diffusers_style_loop_steps_as_diffusers_with_other_options(cls, changes, tmp_path):
    scheduler = _variant(cls, changes)
    config = _config(scheduler, tmp_path)
    t_atol = 1e-4 if cls is EulerDiscreteScheduler and changes.get("use_karras_sigmas") else 0.0
    seeds = [2] if cls in NOISY else None
    assert_same_run(diffusers_loop(config, 6, _noise(), seeds=seeds), diffusers_loop(scheduler, 6, _noise(), seeds=seeds),
                    t_atol=t_atol)


def test_ddim_step_takes_eta_with_a_generator_as_diffusers(tmp_path):
    scheduler = _pixart_scheduler(DDIMScheduler)
    config = _config(scheduler, tmp_path)
    assert_same_run(diffusers_loop(config, 5, _noise(), eta=0.7, seeds=[1]),
                    diffusers_loop(scheduler, 5, _noise(), eta=0.7, seeds=[1]))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_add_noise_equals_diffusers(cls, tmp_path):
    scheduler = _pixart_scheduler(cls)
    config = _config(scheduler, tmp_path)
    scheduler.set_timesteps(10)
    config.set_timesteps(10)
    x0, noise = _noise(batch=3), torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = scheduler.timesteps[[0, 4, 9]]
    # float32 sqrt and products in another order than diffusers' (through σ for DPM-Solver and Euler): rounding only
    torch.testing.assert_close(config.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t), atol=2e-6, rtol=1e-5)


def test_stepping_mistakes_are_named(tmp_path):
    config = _config(_pixart_scheduler(DPMSolverMultistepScheduler), tmp_path)
    x = _noise()
    assert config.timesteps.tolist() == list(range(999, -1, -1)) and config.order == 2  # as diffusers before a run
    with pytest.raises(RuntimeError, match=r"call DPMSolverMultistepScheduler.set_timesteps\(num_inference_steps\)"):
        config.step(x, 999, x)
    config.set_timesteps(2)
    with pytest.raises(ValueError, match="timestep 998 is not one of this run's timesteps"):
        config.step(x, 998, x)
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8, 8\) but sample \(1, 4, 8, 8\).*chunk\(2, dim=1\)\[0\]"):
        config.step(torch.cat([x, x], 1), 999, x)
    with pytest.raises(ValueError, match="only the default s_churn=0.0"):
        config.step(x, 999, x, s_churn=1.0)
    with pytest.raises(TypeError, match="unexpected keyword arguments churn"):
        config.step(x, 999, x, churn=1.0)
    for t in config.timesteps:
        x = config.step(fake_model(x, t), t, x).prev_sample
    with pytest.raises(RuntimeError, match="all 2 steps of this run are done: call set_timesteps again"):
        config.step(x, 0, x)
    config.set_timesteps(2)  # a new run starts over
    assert config.step_index is None and config == _config(_pixart_scheduler(DPMSolverMultistepScheduler), tmp_path)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_step_returns_diffusers_fields(cls, tmp_path):
    scheduler = _pixart_scheduler(cls)
    config = _config(scheduler, tmp_path)
    x = _noise()
    for s in (scheduler, config):
        s.set_timesteps(4)
    kwargs = {"generator": torch.Generator().manual_seed(0)} if cls in NOISY else {}
    theirs = scheduler.step(fake_model(x, scheduler.timesteps[0]), scheduler.timesteps[0], x, return_dict=False, **kwargs)
    kwargs = {"generator": torch.Generator().manual_seed(0)} if cls in NOISY else {}
    ours = config.step(fake_model(x, config.timesteps[0]), config.timesteps[0], x, return_dict=False, **kwargs)
    assert len(ours) == len(theirs)  # (prev_sample,) for DPM-Solver, (prev_sample, x_0) for the others
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=0)
