"""Whole-pipeline parity with diffusers' PixArtAlphaPipeline on the same saved folder, and our fixes of its defects."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pixart

IMAGE_TOL = 2e-3  # [0, 1] images in fp32: the bound; differences come from op order in attention/conv


def load_both(folder):
    """(pixart pipeline, diffusers pipeline) on the same saved folder, progress bars off."""
    from diffusers import PixArtAlphaPipeline as Reference

    pipes = pixart.PixArtAlphaPipeline.from_pretrained(folder), Reference.from_pretrained(folder)
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture(scope="module")
def pipes_1024(pipeline_dir_1024):
    return load_both(pipeline_dir_1024)


@pytest.fixture(scope="module")
def pipes_512(pipeline_dir_512):
    return load_both(pipeline_dir_512)


def run_both(pipes, seed=0, **kwargs):
    ours, ref = pipes
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    a = ours(generator=torch.Generator().manual_seed(seed), **kwargs).images
    b = ref(generator=torch.Generator().manual_seed(seed), **kwargs).images
    return a, b


def assert_images_close(a, b, tol=IMAGE_TOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all()
    assert np.abs(a - b).max() < tol, np.abs(a - b).max()


def test_square_default_size_with_micro_conditions_matches_diffusers(pipes_1024):
    a, b = run_both(pipes_1024, prompt="A small cactus with a happy face in the Sahara desert.")
    assert a.shape == (1, 1024, 1024, 3)
    assert a.std() > 0.01  # a real image, not a constant
    assert_images_close(a, b)


def test_non_square_request_is_binned_then_cropped_like_diffusers(pipes_1024):
    a, b = run_both(pipes_1024, prompt="crocodile in a sweater", height=700, width=1200)
    assert a.shape == (1, 700, 1200, 3)
    assert_images_close(a, b)


def test_512_model_non_square_binning_matches_diffusers(pipes_512):
    a, b = run_both(pipes_512, prompt="a red circle on a white background", height=300, width=520, num_inference_steps=3)
    assert a.shape == (1, 300, 520, 3)
    assert_images_close(a, b)


def test_binning_off_generates_exact_size_like_diffusers(pipes_512):
    a, b = run_both(pipes_512, prompt="artistic", height=256, width=128, use_resolution_binning=False)
    assert a.shape == (1, 256, 128, 3)
    assert_images_close(a, b)


def test_negative_prompt_matches_diffusers_and_changes_the_image(pipes_512):
    a, b = run_both(pipes_512, prompt="a dog that has been meditating", negative_prompt="low quality, blurry")
    assert_images_close(a, b)
    plain, _ = run_both(pipes_512, prompt="a dog that has been meditating")
    assert np.abs(plain - a).max() > 1e-3


def test_list_of_prompts_with_two_images_each_matches_diffusers(pipes_512):
    prompts = ["a boy and a girl fall in love", "crocodile in a sweater"]
    a, b = run_both(pipes_512, prompt=prompts, num_images_per_prompt=2, height=256, width=256)
    assert a.shape[0] == 4
    assert_images_close(a, b)


def test_guidance_at_most_one_skips_cfg_like_diffusers(pipes_512):
    a, b = run_both(pipes_512, prompt="artistic", guidance_scale=1.0)
    assert_images_close(a, b)


def test_prompt_embeds_input_matches_diffusers(pipes_512):
    ours, ref = pipes_512
    pe, pm, ne, nm = ours.encode_prompt("a red circle on a white background")
    r = ref.encode_prompt("a red circle on a white background")
    for x, y in zip((pe, pm, ne, nm), r):
        assert torch.allclose(x.float(), y.float(), atol=1e-5)
    kwargs = dict(prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
                  negative_prompt_attention_mask=nm, negative_prompt=None)
    a, b = run_both(pipes_512, **kwargs)
    assert_images_close(a, b)


def test_seed_walkthrough_latent_output_then_manual_decode(pipeline_dir_512, pipes_512):
    """The low-memory recipe: encode with a transformer-less pipeline, denoise text-encoder-less, decode by hand."""
    _, ref = pipes_512
    enc = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, transformer=None, vae=None)
    with torch.no_grad():
        pe, pm, ne, nm = enc.encode_prompt("cute cat")
    del enc
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(negative_prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne, prompt_attention_mask=pm,
                   negative_prompt_attention_mask=nm, num_images_per_prompt=1, output_type="latent",
                   num_inference_steps=2, generator=torch.Generator().manual_seed(3)).images
    assert latents.shape == (1, 4, 64, 64)
    del pipe.transformer
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    image = pipe.image_processor.postprocess(image, output_type="pil")[0]
    expected = ref("cute cat", num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                   output_type="np").images[0]
    assert image.size == (512, 512)
    assert np.abs(np.asarray(image, dtype=np.float32) / 255 - expected).max() < IMAGE_TOL + 1 / 255  # uint8 rounding


def test_pil_output_and_tuple_return(pipes_512):
    ours, _ = pipes_512
    (images,) = ours("artistic", num_inference_steps=1, height=256, width=256, return_dict=False,
                     generator=torch.Generator().manual_seed(0))
    assert images[0].size == (256, 256) and images[0].mode == "RGB"


@pytest.mark.parametrize("options", [{}, {"cache": "fast"}, {"guidance_interval": (0.28, 5.42)}])
def test_generation_builds_no_autograd_graph(pipes_512, options):
    """As diffusers' @torch.no_grad() __call__: the weights require grad, so a call with autograd on would keep every
    step's graph alive (memory growing with each step: 0.5 GB per step for 54 demo images, seen when a helper method
    took the decorator off __call__)."""
    ours, _ = pipes_512
    grad_seen = []
    record = lambda module, args: grad_seen.append(torch.is_grad_enabled())  # noqa: E731
    hook = ours.transformer.pos_embed.proj.register_forward_pre_hook(record)  # every step, cached or not
    try:
        latents = ours("artistic", num_inference_steps=3, height=128, width=128, use_resolution_binning=False,
                       output_type="latent", generator=torch.Generator().manual_seed(0), **options).images
    finally:
        hook.remove()
    assert any(p.requires_grad for p in ours.transformer.parameters())  # what would make a graph
    assert grad_seen and not any(grad_seen) and not latents.requires_grad


def test_one_step_sampling_works_where_diffusers_crashes(pipes_512):
    ours, _ = pipes_512
    image = ours("artistic", num_inference_steps=1, output_type="np", height=256, width=256,
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 256, 256, 3) and np.isfinite(image).all()


def test_negative_embeds_accepted_with_the_default_negative_prompt(pipes_512):
    ours, _ = pipes_512
    pe, pm, ne, nm = ours.encode_prompt("artistic")
    out = ours(prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
               negative_prompt_attention_mask=nm, num_inference_steps=1, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 4, 64, 64)


def test_size_not_multiple_of_16_without_binning_names_the_fix(pipes_512):
    ours, _ = pipes_512
    with pytest.raises(ValueError, match=r"multiples of 16.*use 256x128"):
        ours("artistic", height=264, width=136, use_resolution_binning=False, num_inference_steps=1)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "4.5", None])
def test_guidance_scale_that_is_not_a_finite_number_names_the_fix(pipes_512, scale):
    ours, _ = pipes_512
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):  # not a NaN (black) image
        ours("artistic", guidance_scale=scale, num_inference_steps=1, output_type="latent")


@pytest.mark.parametrize("kwargs, message", [
    ({"num_images_per_prompt": 0}, "num_images_per_prompt must be a positive integer, got 0"),
    ({"max_sequence_length": 100_000}, r"max_sequence_length must be a whole number of tokens from 1 to 4096"),
    ({"max_sequence_length": 0}, r"max_sequence_length must be a whole number of tokens from 1 to 4096"),
    ({"num_inference_steps": None, "timesteps": [500, 999]}, "timesteps must be strictly decreasing"),
])
def test_out_of_range_call_arguments_are_named_before_any_work(pipes_512, kwargs, message):
    ours, _ = pipes_512
    # 100k tokens of padding would first try to allocate T5 attention scores of 80 GB
    with pytest.raises(ValueError, match=message):
        ours("artistic", **{"num_inference_steps": 1, "output_type": "latent", **kwargs})


def test_latents_are_cast_to_the_vae_dtype_before_decoding(pipeline_dir_512):
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    pipe.vae.to(torch.bfloat16)
    latents = torch.randn(1, 4, 16, 16)  # fp32 latents, bf16 VAE: diffusers raises a dtype error here
    image = pipe.decode_latents(latents)
    assert image.dtype == torch.bfloat16 and image.shape == (1, 3, 128, 128)


def test_callback_on_step_end_sees_every_step_and_can_replace_latents(pipes_512):
    ours, _ = pipes_512
    seen = []

    def on_step_end(pipe, i, t, kwargs):
        seen.append((i, int(t)))
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = ours("artistic", num_inference_steps=3, output_type="latent", height=256, width=256,
               callback_on_step_end=on_step_end, generator=torch.Generator().manual_seed(0)).images
    assert [i for i, _ in seen] == [0, 1, 2]
    assert torch.count_nonzero(out) == 0  # the last replacement is what comes out


def test_list_of_generators_must_match_the_batch(pipes_512):
    ours, _ = pipes_512
    with pytest.raises(ValueError, match="generators for 2 images"):
        ours("artistic", num_images_per_prompt=2, generator=[torch.Generator()], num_inference_steps=1)


def test_calling_a_pipeline_without_transformer_explains(pipeline_dir_512):
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, transformer=None)
    with pytest.raises(ValueError, match="transformer=None"):
        pipe("artistic")


def test_diffusers_memory_calls_are_accepted_and_change_nothing(pipes_512):
    ours, _ = pipes_512
    before = run_both(pipes_512, prompt="a cat")[0]
    ours.enable_attention_slicing()
    ours.enable_xformers_memory_efficient_attention()
    np.testing.assert_array_equal(run_both(pipes_512, prompt="a cat")[0], before)  # fused attention: nothing to change
    ours.disable_attention_slicing()
    ours.disable_xformers_memory_efficient_attention()
    if not torch.cuda.is_available():  # offloading needs a GPU; sequential is model offloading, with a warning
        with pytest.raises(ValueError, match="not an available CUDA device"):
            ours.enable_sequential_cpu_offload()


def test_diffusers_calling_conventions_work(pipes_512, pipeline_dir_512, caplog):
    """The output indexes as diffusers' BaseOutput; dtype= is diffusers' newer torch_dtype; cross_attention_kwargs
    (Stable Diffusion's LoRA scale, without effect on PixArt in diffusers) is accepted with a warning."""
    ours, ref = pipes_512
    out = ours("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out[0] is out["images"] is out.images and out.to_tuple() == (out.images,) and out.keys() == ["images"]
    for mine, theirs in zip(ours.numpy_to_pil(out.images), ref.numpy_to_pil(out.images), strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    ours.maybe_free_model_hooks()  # diffusers' hook, for code that calls it
    with caplog.at_level("WARNING", logger="pixart"):
        again = ours("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
                     cross_attention_kwargs={"scale": 0.5}).images
    np.testing.assert_array_equal(again, out.images)
    assert "cross_attention_kwargs has no effect" in caplog.text
    for name in ("transformer", "vae"):  # configs read as diffusers' dicts, with diffusers' values
        config, theirs = getattr(ours, name).config, getattr(ref, name).config
        assert config["sample_size"] == theirs["sample_size"] and config.get("nope", 7) == 7
        shared = set(config) & set(theirs) - {"_class_name"}
        assert len(shared) > 10 and {k: config[k] for k in shared} == {k: theirs[k] for k in shared}, name
    assert ours.tokenizer("a cat").input_ids == ref.tokenizer("a cat").input_ids  # transformers' call defaults
    bf16 = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, dtype=torch.bfloat16)
    assert bf16.transformer.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="pass one of them"):
        pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, dtype=torch.bfloat16, torch_dtype=torch.float16)


def test_per_component_dtypes_as_in_diffusers(pipeline_dir_512):
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, torch_dtype={"transformer": torch.bfloat16,
                                                                                     "default": torch.float32})
    assert (pipe.transformer.dtype, pipe.vae.dtype, pipe.text_encoder.dtype) == (torch.bfloat16,) + (torch.float32,) * 2
    pipe.set_progress_bar_config(disable=True)
    full = pipe("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(full).all()
    staged = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, memory="staged", torch_dtype={
        "transformer": torch.bfloat16, "default": torch.float32})  # each model loads in its dtype when it runs
    staged.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(staged("a cat", num_inference_steps=2, output_type="np",
                                         generator=torch.Generator().manual_seed(0)).images, full)
    with pytest.raises(ValueError, match="unknown components \\['unet'\\]: use text_encoder, transformer, vae"):
        pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, torch_dtype={"unet": torch.float16})
    with pytest.raises(TypeError, match="torch_dtype must be a torch.dtype or a dict of them"):
        pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, torch_dtype="bf16")


@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_a_hand_written_loop_over_pipe_scheduler_gives_the_pipelines_latents(pipes_512, scheduler):
    """diffusers users' own denoising loop (set_timesteps, scale_model_input, step) on pipe.scheduler and
    pipe.transformer: the same latents as pipe(...), the scheduler's state apart from the pipeline's."""
    ours, _ = pipes_512
    original = ours.scheduler
    ours.scheduler = getattr(pixart, scheduler).from_config(original.config)
    try:
        embeds, mask, negative, negative_mask = ours.encode_prompt("artistic")
        noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
        expected = ours(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                        negative_prompt_attention_mask=negative_mask, latents=noise, num_inference_steps=4,
                        output_type="latent").images
        sched = ours.scheduler
        sched.set_timesteps(4)
        latents = noise * sched.init_noise_sigma
        # the pipeline drops the captions' common trailing padding (masked out either way); so do we here, else
        # the rounding of a longer softmax, amplified by σ_max / α at the first step, differs by up to 4e-4
        n = int(torch.cat([negative_mask, mask]).sum(-1).max())
        with torch.no_grad():
            for t in sched.timesteps:
                x_in = sched.scale_model_input(torch.cat([latents] * 2), t)
                out = ours.transformer(x_in, encoder_hidden_states=torch.cat([negative, embeds])[:, :n],
                                       encoder_attention_mask=torch.cat([negative_mask, mask])[:, :n],
                                       timestep=t.expand(2),
                                       added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                       return_dict=False)[0]
                uncond, cond = out.chunk(2)
                eps = (uncond + 4.5 * (cond - uncond)).chunk(2, dim=1)[0]
                latents = sched.step(eps, t, latents).prev_sample
    finally:
        ours.scheduler = original
    assert torch.equal(latents, expected)


def _embeds(pipes):
    ours, _ = pipes
    return ours.encode_prompt("artistic")  # (1, 120, 32) T5 states of the tiny model, masks, negative ones


@pytest.mark.parametrize("case, message", [
    ("negative mask shorter", r"negative_prompt_attention_mask has shape \(1, 10\) but negative_prompt_embeds "
                              r"\(1, 120, 32\): it needs .* \(1, 120\)"),
    ("mask shorter", r"prompt_attention_mask has shape \(1, 10\) but prompt_embeds \(1, 120, 32\)"),
    ("2-D embeddings", r"prompt_embeds must be a \(batch, tokens, channels\) tensor, .* got \(120, 32\)"),
    ("mask of another batch", r"prompt_attention_mask has shape \(1, 120\) but prompt_embeds \(2, 120, 32\)"),
    ("other caption width", r"prompt_embeds have 16 channels but the transformer takes caption_channels=32"),
    ("one negative for two prompts", r"negative_prompt_embeds \(1, 120, 32\) do not pair with the prompts' "
                                     r"\(2, 120, 32\): pass one row per prompt"),
    ("shorter negative for a prompt", r"negative_prompt_embeds \(1, 10, 32\) do not pair with the prompts' \(1, 120"),
])
def test_embeddings_and_masks_that_do_not_fit_are_named_before_any_work(pipes_512, case, message):
    ours, _ = pipes_512
    e, m, ne, nm = _embeds(pipes_512)
    calls = {
        "negative mask shorter": dict(prompt_embeds=e, prompt_attention_mask=m, negative_prompt_embeds=ne,
                                      negative_prompt_attention_mask=nm[:, :10]),
        "mask shorter": dict(prompt_embeds=e, prompt_attention_mask=m[:, :10]),
        "2-D embeddings": dict(prompt_embeds=e[0], prompt_attention_mask=m),
        "mask of another batch": dict(prompt_embeds=e.repeat(2, 1, 1), prompt_attention_mask=m),
        "other caption width": dict(prompt_embeds=e[..., :16], prompt_attention_mask=m),
        "one negative for two prompts": dict(prompt=["a", "b"], negative_prompt_embeds=ne,
                                             negative_prompt_attention_mask=nm),
        "shorter negative for a prompt": dict(prompt="a", negative_prompt_embeds=ne[:, :10],
                                              negative_prompt_attention_mask=nm[:, :10]),
    }
    with pytest.raises(ValueError, match=message):  # was a tensor-size RuntimeError deep in attention
        ours(**calls[case], num_inference_steps=1, output_type="latent")


def test_whole_numbers_of_any_type_a_1d_mask_and_output_type_none_work_as_in_diffusers(pipes_512):
    ours, ref = pipes_512
    e, m, _, _ = _embeds(pipes_512)
    base = dict(num_inference_steps=2, height=256, width=256, output_type="np")
    want = ours(prompt_embeds=e, prompt_attention_mask=m, generator=torch.Generator().manual_seed(0), **base).images
    odd = dict(base, num_inference_steps=np.int64(2), height=np.int64(256), width=256.0, output_type=None)
    got = ours(prompt_embeds=e, prompt_attention_mask=m[0], generator=torch.Generator().manual_seed(0), **odd).images
    assert isinstance(got, np.ndarray)  # output_type=None is diffusers' "np"
    np.testing.assert_array_equal(got, want)
    theirs = ref(prompt_embeds=e, prompt_attention_mask=m[0], generator=torch.Generator().manual_seed(0),
                 **dict(odd, height=256, width=256)).images  # (diffusers' binning cannot take NumPy sizes)
    assert_images_close(got, theirs)
    masks = ours.encode_prompt(None, prompt_embeds=e, prompt_attention_mask=m[0], num_images_per_prompt=2)[1]
    assert masks.shape == (2, 120) and torch.equal(masks[1], m[0])


def test_components_from_diffusers_staged_pipelines_and_from_pipe(pipes_512, pipeline_dir_512, caplog):
    ours, ref = pipes_512
    call = dict(prompt="artistic", num_inference_steps=2, height=256, width=256, output_type="np")
    want = ours(generator=torch.Generator().manual_seed(0), **call).images
    # diffusers' transformer runs as pixart's, on the same tensors (no copy), giving our images
    mixed = pixart.PixArtAlphaPipeline(**{**ours.components, "transformer": ref.transformer})
    assert isinstance(mixed.transformer, pixart.PixArtTransformer2DModel)
    assert mixed.transformer.proj_out.weight.data_ptr() == ref.transformer.proj_out.weight.data_ptr()
    np.testing.assert_array_equal(mixed(generator=torch.Generator().manual_seed(0), **call).images, want)
    # a staged pipeline's components are the models, loaded for the asker (were None until first used)
    staged = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, memory="staged")
    parts = staged.components
    assert all(parts[name] is not None for name in ("tokenizer", "text_encoder", "vae", "transformer"))
    shared = pixart.PixArtAlphaPipeline.from_pipe(staged, scheduler=pixart.DDIMScheduler.from_config(
        staged.scheduler.config))
    assert shared.transformer is parts["transformer"] and shared.scheduler.class_name == "DDIMScheduler"
    with pytest.raises(TypeError, match="unexpected keyword arguments: vea"):
        pixart.PixArtAlphaPipeline.from_pipe(staged, vea=None)
    # Stable Diffusion's keywords in copied code: ignored with a warning; torch_dtype="auto" as the CLI's auto
    with caplog.at_level("WARNING", logger="pixart"):
        auto = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, safety_checker=None, torch_dtype="auto")
    assert "safety_checker=None ignored" in caplog.text
    from pixart.hardware import default_dtype
    assert auto.transformer.dtype == default_dtype("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
def test_a_device_this_machine_lacks_is_named_up_front_and_a_failed_move_changes_nothing(pipeline_dir_512):
    message = "device 'cuda': there is no CUDA GPU here"
    for kwargs in ({"device": "cuda"}, {"device_map": "cuda"}, {"device": "cuda", "memory": "staged"}):
        with pytest.raises(ValueError, match=message):  # was torch's AssertionError, or a silent CPU (device_map)
            pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, **kwargs)
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    with pytest.raises(ValueError, match=message):
        pipe.to("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        pipe.to("gpu")
    assert pipe.device == torch.device("cpu")  # still usable
    assert pipe("artistic", num_inference_steps=1, height=256, width=256, output_type="latent").images.shape[0] == 1


@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "DDIMScheduler"])
def test_callback_on_step_end_can_read_each_steps_clean_estimate(pipes_512, scheduler):
    """"denoised" (a pixart extension; what an interrupted AUTOMATIC1111 request decodes) is the step's x_0
    estimate: far from the noisy latents early on, and at the last step (σ → 0) the latents themselves."""
    ours, _ = pipes_512
    original = ours.scheduler
    ours.scheduler = getattr(pixart, scheduler).from_config(original.config)
    seen = []
    try:
        out = ours("artistic", num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(0),
                   callback_on_step_end=lambda pipe, i, t, k: seen.append((k["latents"], k["denoised"])) or {},
                   callback_on_step_end_tensor_inputs=["latents", "denoised"]).images
    finally:
        ours.scheduler = original
    (first_latents, first_x0), (last_latents, last_x0) = seen[0], seen[-1]
    assert len(seen) == 4 and (first_latents - first_x0).abs().max() > 0.5
    torch.testing.assert_close(last_x0.to(out.dtype), out, atol=1e-5, rtol=1e-5)
