"""diffusers' scheduler-switching idiom (`pipe.scheduler = X.from_config(pipe.scheduler.config)`) with pixart's
classes and diffusers' own, against diffusers' results; the CLI's --sampler."""
from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import pixart
from pixart.cli import main
from pixart.configs import SchedulerConfig
from pixart.samplers import make_timesteps
from pixart.schedulers import sampler_by_name

NAMES = ["DPMSolverMultistepScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "LCMScheduler"]
# PixArt-α's scheduler_config.json, as diffusers saves it
PIXART_DPM = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                  prediction_type="epsilon", solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                  lower_order_final=True, timestep_spacing="linspace", final_sigmas_type="zero", steps_offset=0)
CHANGES = [{}, {"timestep_spacing": "trailing"}, {"steps_offset": 1, "timestep_spacing": "leading"}]
IMAGE_TOL = 2e-3  # [0, 1] fp32 images against diffusers' pipeline: tests/test_pipeline.py's bound


def ours_from_theirs(scheduler) -> SchedulerConfig:
    """diffusers' scheduler as our config (its config's _class_name is the class it was made from, not its own)."""
    return SchedulerConfig.from_dict({**scheduler.config, "_class_name": type(scheduler).__name__})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("changes", CHANGES)
def test_from_config_gives_what_diffusers_from_config_gives(name, changes):
    theirs = getattr(diffusers, name).from_config(diffusers.DPMSolverMultistepScheduler(**PIXART_DPM).config,
                                                  **changes)
    dpm = pixart.DPMSolverMultistepScheduler(**PIXART_DPM)
    ours = getattr(pixart, name).from_config(dpm.config, **changes)
    assert isinstance(ours, SchedulerConfig) and ours.class_name == name and isinstance(ours, getattr(pixart, name))
    assert not isinstance(ours, pixart.DDIMScheduler if name != "DDIMScheduler" else pixart.LCMScheduler)
    assert ours == ours_from_theirs(theirs)
    # the class's own defaults fill what the DPM config lacks, as in diffusers (DDIM clips, LCM's steps limit)
    if name == "DDIMScheduler":
        assert ours.clip_sample is True
    # and diffusers' from_config takes our .config: the same scheduler as from its own
    assert ours_from_theirs(getattr(diffusers, name).from_config(dpm.config, **changes)) == ours
    theirs.set_timesteps(20)
    assert torch.equal(make_timesteps(ours, 20).long(), theirs.timesteps.long())


@pytest.mark.parametrize("name", NAMES)
def test_constructor_defaults_are_diffusers_defaults(name):
    assert getattr(pixart, name)() == ours_from_theirs(getattr(diffusers, name)())
    assert pixart.EulerDiscreteScheduler(use_karras_sigmas=True) == ours_from_theirs(
        diffusers.EulerDiscreteScheduler(use_karras_sigmas=True))


def test_keys_a_config_file_leaves_out_take_the_new_class_defaults_as_in_diffusers(tmp_path):
    """diffusers' `_use_default_values`: a value the source class only defaulted is not carried to another class."""
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "DPMSolverMultistepScheduler",
                                                                "num_train_timesteps": 1000, "solver_order": 2}))
    ours = pixart.DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    theirs = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    for name in ("DDIMScheduler", "LCMScheduler", "EulerDiscreteScheduler"):
        want = ours_from_theirs(getattr(diffusers, name).from_config(theirs.config))
        assert getattr(pixart, name).from_config(ours.config) == want, name
        assert getattr(pixart, name).from_config(theirs.config) == want, name
        assert ours_from_theirs(getattr(diffusers, name).from_config(ours.config)) == want, name
    # LCM from a DDIM made with its defaults takes LCM's betas (scaled_linear 0.00085..0.012), not DDIM's
    lcm = pixart.LCMScheduler.from_config(diffusers.DDIMScheduler().config)
    assert lcm == ours_from_theirs(diffusers.LCMScheduler.from_config(diffusers.DDIMScheduler().config))
    assert lcm.beta_schedule == "scaled_linear" and lcm.clip_sample is False


@pytest.mark.parametrize("changes, message", [
    ({"beta_end": "0.03"}, "beta_end='0.03' is a str: it must be a number"),
    ({"num_train_timesteps": 1000.0}, "num_train_timesteps=1000.0 is a float: it must be an integer"),
    ({"use_karras_sigmas": "false"}, "use_karras_sigmas='false' is a str: it must be true or false"),
    ({"beta_end": 1.5}, "beta_end=1.5: a noise variance is between 0 and 1"),
    ({"beta_start": 0.5, "beta_end": 0.01}, "beta_start=0.5: it must not exceed beta_end = 0.01"),
    ({"trained_betas": [0.1] * 10}, "it must hold num_train_timesteps = 1000 values between 0 and 1"),
    ({"sigma_min": "0.1"}, "sigma_min='0.1' is a str: it must be a number \\(not NaN\\) or None"),
])
def test_options_of_the_wrong_type_or_range_are_refused_at_once(changes, message):
    with pytest.raises(ValueError, match=message):
        pixart.EulerDiscreteScheduler.from_config(pixart.DPMSolverMultistepScheduler().config, **changes)


def test_config_reads_as_a_dict_and_by_attribute():
    config = pixart.DDIMScheduler(steps_offset=1).config
    assert config["_class_name"] == "DDIMScheduler" and config.steps_offset == 1 and config["clip_sample"] is True
    with pytest.raises(AttributeError, match="no key .solver_order."):
        config.solver_order  # noqa: B018 (DDIM has none)


def test_options_a_class_lacks_or_pixart_does_not_implement_are_clear_errors():
    with pytest.raises(TypeError, match="DDIMScheduler has no option use_karras_sigmas"):
        pixart.DDIMScheduler(use_karras_sigmas=True)
    with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver\\+\\+' is not supported"):
        pixart.DPMSolverMultistepScheduler.from_config({}, algorithm_type="sde-dpmsolver++")
    with pytest.raises(TypeError, match="takes a config dict"):
        pixart.EulerDiscreteScheduler.from_config("PixArt-alpha/PixArt-XL-2-1024-MS")


def test_from_pretrained_reads_a_pipeline_folder_scheduler(pipeline_dir_512):
    saved = SchedulerConfig.from_json(pipeline_dir_512 / "scheduler" / "scheduler_config.json")
    assert pixart.DPMSolverMultistepScheduler.from_pretrained(pipeline_dir_512, subfolder="scheduler") == saved
    euler = pixart.EulerDiscreteScheduler.from_pretrained(pipeline_dir_512, subfolder="scheduler")
    assert euler == pixart.EulerDiscreteScheduler.from_config(saved.config)
    assert euler == ours_from_theirs(diffusers.EulerDiscreteScheduler.from_pretrained(pipeline_dir_512,
                                                                                     subfolder="scheduler"))
    with pytest.raises(FileNotFoundError, match='pass subfolder="scheduler"'):
        pixart.DDIMScheduler.from_pretrained(pipeline_dir_512)


@pytest.fixture(scope="module")
def pipes(pipeline_dir_512):
    ours = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    ref = diffusers.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    return ours, ref


def generate(pipe) -> np.ndarray:
    return pipe("a red circle", num_inference_steps=3, width=256, height=256, output_type="np",
                generator=torch.Generator().manual_seed(4)).images


@pytest.mark.parametrize("name, changes", [
    ("DDIMScheduler", {}), ("EulerDiscreteScheduler", {"use_karras_sigmas": True}), ("EulerAncestralDiscreteScheduler", {}),
    # the tiny model's image hardly moves with "trailing" spacing (2e-4): "leading" moves it (0.17)
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "leading", "steps_offset": 1})])
def test_switching_the_scheduler_as_in_diffusers_gives_diffusers_images(pipes, name, changes):
    ours, ref = pipes
    default_ours, default_ref = ours.scheduler, ref.scheduler
    try:
        plain = generate(ours)
        ref.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config, **changes)
        ours.scheduler = getattr(pixart, name).from_config(ours.scheduler.config, **changes)
        want, got = generate(ref), generate(ours)
        assert np.abs(got - want).max() < IMAGE_TOL
        assert np.abs(got - plain).max() > 10 * IMAGE_TOL  # the switch changed the image
        # diffusers' own class assigned to our pipeline: the same config, the same image bit for bit
        ours.scheduler = getattr(diffusers, name).from_config(default_ours.config, **changes)
        assert isinstance(ours.scheduler, SchedulerConfig) and ours.scheduler.class_name == name
        np.testing.assert_array_equal(generate(ours), got)
    finally:
        ours.scheduler, ref.scheduler = default_ours, default_ref


def test_assigning_a_sampler_pixart_lacks_fails_at_once(pipes):
    ours, _ = pipes
    before = ours.scheduler
    with pytest.raises(ValueError, match="'UniPCMultistepScheduler' is not supported: use one of"):
        ours.scheduler = diffusers.UniPCMultistepScheduler.from_config(ours.scheduler.config)
    with pytest.raises(TypeError, match="got str"):
        ours.scheduler = "euler"
    assert ours.scheduler is before  # a refused assignment leaves the scheduler as it was


@pytest.mark.parametrize("name, key, karras", [
    ("euler", "EulerDiscreteScheduler", False), ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", True),
    ("euler-karras", "EulerDiscreteScheduler", True), ("DDIMScheduler", "DDIMScheduler", False),
    ("k_dpmpp_2m", "DPMSolverMultistepScheduler", False), ("Euler a", "EulerAncestralDiscreteScheduler", False),
    ("k_euler_a", "EulerAncestralDiscreteScheduler", False)])
def test_sampler_names(name, key, karras):
    assert sampler_by_name(name) == (key, karras)


@pytest.mark.parametrize("name, message", [("heun", "unknown scheduler 'heun': choose one of DPM\\+\\+ 2M, DDIM"),
                                           ("Euler a Karras", "Euler a has no Karras noise levels"),
                                           ("ddim karras", "DDIM has no Karras noise levels")])
def test_unknown_sampler_names_list_the_choices(name, message):
    with pytest.raises(ValueError, match=message):
        sampler_by_name(name)


def test_cli_sampler_flag_samples_with_it_and_records_it(pipeline_dir_512, tmp_path, capsys):
    out = tmp_path / "euler.png"
    assert main(["generate", "a red circle", "--model", str(pipeline_dir_512), "-o", str(out), "--seed", "2",
                 "--steps", "3", "--width", "128", "--height", "128", "--dtype", "fp32", "--quiet",
                 "--sampler", "Euler Karras"]) == 0, capsys.readouterr().err
    image = Image.open(out)
    assert json.loads(image.text["parameters"])["sampler"] == "Euler Karras"
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    pipe.set_progress_bar_config(disable=True)
    # the model's noise schedule with the Euler sampler and Karras levels, the other fields as they are
    pipe.scheduler = pipe.scheduler.replace(class_name="EulerDiscreteScheduler", use_karras_sigmas=True)
    want = pipe("a red circle", num_inference_steps=3, width=128, height=128,
                generator=[torch.Generator().manual_seed(2)]).images[0]
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(want))


def test_cli_sampler_named_without_karras_turns_the_model_s_karras_off(pipeline_dir_512, tmp_path):
    """AUTOMATIC1111's naming: "DPM++ 2M" is without Karras noise levels, whatever the model's config says."""
    import shutil

    folder = tmp_path / "karras-model"
    shutil.copytree(pipeline_dir_512, folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "use_karras_sigmas": True}))
    images = {}
    for name in ("DPM++ 2M", "DPM++ 2M Karras"):
        out = tmp_path / f"{name}.png"
        assert main(["generate", "a red circle", "--model", str(folder), "-o", str(out), "--seed", "2", "--steps",
                     "3", "--width", "128", "--height", "128", "--dtype", "fp32", "--quiet", "--sampler", name]) == 0
        assert json.loads(Image.open(out).text["parameters"])["sampler"] == name
        images[name] = np.asarray(Image.open(out).convert("RGB"))
    assert not np.array_equal(images["DPM++ 2M"], images["DPM++ 2M Karras"])


def test_cli_unknown_sampler_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x", "--model", "demo", "--sampler", "Heun"])
    assert exit_info.value.code == 2
    assert "unknown scheduler 'Heun': choose one of DPM++ 2M, DDIM, Euler, Euler a, LCM" in capsys.readouterr().err
