"""The on-disk prompt-embedding cache: hits never load the text encoder, keys separate what must differ."""
from __future__ import annotations

import numpy as np
import torch

import pixart
from pixart.prompt_cache import PromptCache


def staged(folder, cache_dir, **kwargs):
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(folder, memory="staged", prompt_cache=cache_dir, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt="a red circle on a white background", **kwargs):
    return pipe(prompt, num_inference_steps=1, height=256, width=256, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def count_text_encoder_loads(pipe) -> list:
    loads = []
    load = pipe._loaders["text_encoder"]
    pipe._loaders["text_encoder"] = lambda: loads.append(1) or load()
    return loads


def test_a_cache_hit_never_loads_the_text_encoder_and_gives_the_same_image(pipeline_dir_512, tmp_path):
    first = staged(pipeline_dir_512, tmp_path / "cache")
    loads = count_text_encoder_loads(first)
    image = run(first)
    assert loads == [1] and len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # prompt and ""
    second = staged(pipeline_dir_512, tmp_path / "cache")  # a new process would do the same
    loads = count_text_encoder_loads(second)
    again = run(second)
    assert loads == []
    np.testing.assert_allclose(again, image, atol=1e-6)  # stored exactly; 1e-6 allows batch-size matmul order


def test_partial_hits_encode_only_the_new_prompts(pipeline_dir_512, tmp_path):
    pipe = staged(pipeline_dir_512, tmp_path / "cache")
    run(pipe)
    uncached = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    both = ["a red circle on a white background", "crocodile in a sweater"]
    ours = pipe.encode_prompt(both, clean_caption=True)  # as __call__ cleaned them: the first prompt and "" hit
    theirs = uncached.encode_prompt(both, clean_caption=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3


def test_keys_differ_by_max_length_cleaning_dtype_and_encoder(pipeline_dir_512, pipeline_dir_1024, tmp_path):
    cache = PromptCache(tmp_path)
    key = cache.key("enc", "a cat", 120, True)
    assert len({key, cache.key("enc", "a cat", 60, True), cache.key("enc", "a cat", 120, False),
                cache.key("enc2", "a cat", 120, True), cache.key("enc", "a dog", 120, True)}) == 5
    a = staged(pipeline_dir_512, tmp_path)
    b = staged(pipeline_dir_1024, tmp_path)  # another text encoder's files
    c = staged(pipeline_dir_512, tmp_path).to(torch.bfloat16)
    assert a._encoder_id != b._encoder_id
    ids = {p.prompt_cache.key(f"{p._encoder_id}/{p.dtype}", "x", 120, False) for p in (a, b, c)}
    assert len(ids) == 3


def test_replacing_the_text_encoder_disables_the_cache(pipeline_dir_512, tmp_path):
    pipe = staged(pipeline_dir_512, tmp_path)
    pipe.text_encoder = pixart.T5EncoderModel.from_pretrained(pipeline_dir_512, subfolder="text_encoder")
    run(pipe)
    assert list(tmp_path.glob("*.safetensors")) == []


def test_size_bound_evicts_least_recently_used(tmp_path):
    cache = PromptCache(tmp_path, max_bytes=3 * 1200)
    embeds, mask = torch.zeros(8, 32), torch.ones(8, dtype=torch.long)  # ~1.2 kB per entry on disk
    for i in range(6):
        cache.put(f"k{i}", embeds, mask)
    assert cache.get("k0") is None and cache.get("k5") is not None
    assert sum(p.stat().st_size for p in tmp_path.glob("*.safetensors")) <= 3 * 1200


def test_corrupted_entry_is_a_miss_and_removed(tmp_path):
    cache = PromptCache(tmp_path)
    cache.put("k", torch.zeros(4, 8), torch.ones(4, dtype=torch.long))
    (tmp_path / "k.safetensors").write_bytes(b"garbage")
    assert cache.get("k") is None and not (tmp_path / "k.safetensors").exists()


def test_unwritable_cache_folder_does_not_break_generation(pipeline_dir_512, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    pipe = staged(pipeline_dir_512, blocker / "cache")
    assert run(pipe).shape == (1, 256, 256, 3)
