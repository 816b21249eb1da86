"""Memory modes: staged pipelines load each model when it runs, free it after, and give the same images."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pixart
from pixart import components


def generate(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle on a white background", num_inference_steps=2, height=256, width=256,
                output_type="np", generator=torch.Generator().manual_seed(0), **kwargs).images


def test_staged_output_equals_full_output(pipeline_dir_512):
    full = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, memory="full")
    staged = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, memory="staged")
    assert staged.memory == "staged" and all(staged._loaded.get(n) is None for n in components.MODELS)
    np.testing.assert_array_equal(generate(staged), generate(full))


def test_staged_keeps_only_the_running_model_and_loads_each_once(pipeline_dir_512, monkeypatch):
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, memory="staged")
    loads, resident_while_running = [], []
    for name, load in list(pipe._loaders.items()):
        monkeypatch.setitem(pipe._loaders, name, lambda name=name, load=load: loads.append(name) or load())
    real_running = components.running

    def spy(p, name):
        resident_while_running.append((name, sorted(n for n in components.MODELS if p._loaded.get(n) is not None)))
        return real_running(p, name)

    monkeypatch.setattr(pixart.pipeline, "running", spy)
    monkeypatch.setattr(components, "running", spy)
    generate(pipe, negative_prompt="blurry")  # prompt and negative prompt: still one text-encoder load
    assert loads == ["text_encoder", "transformer", "vae"]
    assert [n for n, resident in resident_while_running] == ["text_encoder", "transformer", "vae"]
    assert all(resident == [] for _, resident in resident_while_running)  # nothing else was resident
    assert all(pipe._loaded.get(n) is None for n in components.MODELS)  # all freed at the end


def test_auto_chooses_staged_when_the_models_do_not_fit(pipeline_dir_512, monkeypatch):
    monkeypatch.setattr(components, "available_bytes", lambda device: 1000)
    assert pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512).memory == "staged"
    monkeypatch.setattr(components, "available_bytes", lambda device: 64 * 2**30)
    assert pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512).memory == "full"


def test_staged_pipeline_follows_to_dtype_for_models_loaded_later(pipeline_dir_512):
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, memory="staged").to(torch.bfloat16)
    latents = pipe("artistic", num_inference_steps=1, height=256, width=256, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.dtype == torch.bfloat16


def test_offload_needs_cuda_and_unknown_mode_is_named(pipeline_dir_512):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, memory="offload")
    with pytest.raises(ValueError, match="memory must be one of auto, full, staged, offload"):
        pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, memory="tiny")


def test_user_supplied_models_are_never_released(pipeline_dir_512):
    transformer = pixart.PixArtTransformer2DModel.from_pretrained(pipeline_dir_512, subfolder="transformer")
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, memory="staged", transformer=transformer)
    generate(pipe)
    assert pipe.transformer is transformer


def test_images_past_1024_squared_decode_in_tiles(pipeline_dir_512, monkeypatch):
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    tiled_calls = []
    real = pipe.vae._decode_tiled
    monkeypatch.setattr(pipe.vae, "_decode_tiled", lambda *a: tiled_calls.append(a[0].shape) or real(*a))
    small = pipe.decode_latents(torch.randn(1, 4, 32, 32))
    assert tiled_calls == [] and small.shape == (1, 3, 256, 256)
    big = pipe.decode_latents(torch.randn(2, 4, 136, 136))  # 1088² > 1024²
    assert len(tiled_calls) == 2 and big.shape == (2, 3, 1088, 1088) and torch.isfinite(big).all()
    assert pipe.vae.tiling is None  # the user's setting is left as it was


def test_int8_text_encoder_through_the_pipeline_is_close_to_float(pipeline_dir_512):
    """The pipeline kwarg reaches T5's quantize-while-loading; the tiny encoder's int8 embeddings stay close."""
    float_pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, transformer=None, vae=None)
    int8_pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, transformer=None, vae=None,
                                                           text_encoder_quantization="int8")
    assert int8_pipe.text_encoder.quantization.name == "int8"
    a, _, _, _ = float_pipe.encode_prompt("a red circle on a white background")
    b, _, _, _ = int8_pipe.encode_prompt("a red circle on a white background")
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    assert cos.min() > 0.98, cos.min()


def test_seed_walkthrough_with_an_8bit_text_encoder_gives_the_one_shot_image(pipeline_dir_512):
    """The low-memory recipe of the README, step by step, equals one call of a pipeline with the same int8 T5."""
    import gc

    text_encoder = pixart.T5EncoderModel.from_pretrained(pipeline_dir_512, subfolder="text_encoder",
                                                         quantization="int8")
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, text_encoder=text_encoder, transformer=None)
    with torch.no_grad():
        pe, pm, ne, nm = pipe.encode_prompt("cute cat")
    del text_encoder, pipe
    gc.collect()
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, text_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(negative_prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne, prompt_attention_mask=pm,
                   negative_prompt_attention_mask=nm, num_images_per_prompt=1, output_type="latent",
                   num_inference_steps=2, generator=torch.Generator().manual_seed(3)).images
    del pipe.transformer
    gc.collect()
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    image = pipe.image_processor.postprocess(image, output_type="np")

    one_shot = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, text_encoder_quantization="int8")
    one_shot.set_progress_bar_config(disable=True)
    expected = one_shot("cute cat", num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                        output_type="np", clean_caption=False).images
    np.testing.assert_allclose(image, expected, atol=1e-5)


def test_enable_model_cpu_offload_needs_a_gpu(pipeline_dir_512):
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    if torch.cuda.is_available():
        pipe.enable_model_cpu_offload()
        assert pipe.memory == "offload" and pipe.device.type == "cuda" and pipe.transformer.device.type == "cpu"
    else:
        with pytest.raises(ValueError, match="not an available CUDA device"):
            pipe.enable_model_cpu_offload()


def test_decode_latents_keeps_no_autograd_graph(pipeline_dir_512):
    """decode_latents is inference: with the VAE's weights requiring grad (as loaded) it must not record the
    decoder's activations (at 1024² in fp32 that graph held 21 GB)."""
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    assert any(p.requires_grad for p in pipe.vae.parameters())
    images = pipe.decode_latents(torch.randn(1, 4, 16, 16))
    assert images.grad_fn is None and not images.requires_grad


TRIM_PROBE = """
import torch
from pixart import components

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1])

kept, freed = [], []
for _ in range(4000):  # 64 KiB blocks come from the heap (below glibc's mmap threshold), pinned by 64 B ones
    freed.append(torch.empty(16384, dtype=torch.float32).fill_(1.0))
    kept.append(torch.empty(16, dtype=torch.float32))
del freed
before = rss()
components.return_freed_memory()
print(before, rss())
"""


@pytest.mark.skipif(components._LIBC is None or not os.path.exists("/proc/self/statm"),
                    reason="needs glibc's malloc_trim and Linux's /proc")
def test_released_stages_hand_fragmented_heap_memory_back(pipeline_dir_512, monkeypatch):
    """Many small blocks freed between kept ones stay in the process until malloc_trim; release() calls it.
    The effect is measured in a fresh process, whose heap holds no free blocks from earlier tests."""
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True).stdout
    before, after = (int(pages) * os.sysconf("SC_PAGE_SIZE") for pages in out.split())
    assert before - after > 64 * 2**20  # 250 MiB were freed, 160 MiB measured to leave; without the trim: 0

    calls = []
    monkeypatch.setattr(components, "return_freed_memory", lambda: calls.append(1))
    generate(pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, memory="staged"))
    assert len(calls) == 3  # after the text encoder, the transformer and the VAE


@pytest.mark.parametrize("cache", [None, "fast"])
def test_staged_models_are_freed_before_the_next_one_loads(pipeline_dir_512, monkeypatch, cache):
    """Not only dropped from the pipeline: no reference is left (the call's locals held the transformer, 2.4 GB
    in fp32 at real size, through the decoding stage), so when a model loads the previous one no longer exists."""
    import weakref

    pipe = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, memory="staged")
    made, alive_at_load = [], []
    for name, load in list(pipe._loaders.items()):
        def spy(name=name, load=load):
            alive_at_load.append((name, [ref() is not None for ref in made]))
            module = load()
            made.append(weakref.ref(module))
            return module
        monkeypatch.setitem(pipe._loaders, name, spy)
    generate(pipe, cache=cache)
    assert alive_at_load == [("text_encoder", []), ("transformer", [False]), ("vae", [False, False])]
    assert all(ref() is None for ref in made)
