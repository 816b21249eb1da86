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
    ids = {p.prompt_cache.key(f"{p._encoder_id}/{p.model_dtype('text_encoder')}", "x", 120, False) for p in (a, b, c)}
    assert len(ids) == 3


def test_replacing_the_text_encoder_disables_the_cache(pipeline_dir_512, tmp_path):
    pipe = staged(pipeline_dir_512, tmp_path)
    pipe.text_encoder = pixart.T5EncoderModel.from_pretrained(pipeline_dir_512, subfolder="text_encoder")
    run(pipe)
    assert list(tmp_path.glob("*.safetensors")) == []


def test_size_bound_evicts_least_recently_used(tmp_path):
    cache = PromptCache(tmp_path, max_bytes=3 * 1200)
    embeds, mask = torch.zeros(8, 32), torch.ones(8, dtype=torch.long)  # ~1.2 kB per entry on disk
    keys = [cache.key("enc", f"prompt {i}", 120, True) for i in range(6)]
    for key in keys:
        cache.put(key, embeds, mask)
    assert cache.get(keys[0]) is None and cache.get(keys[5]) is not None
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


def test_eviction_only_ever_deletes_the_caches_own_entries(tmp_path):
    mine = tmp_path / "my_finetune.safetensors"  # a user's file in the folder they gave as the cache
    with open(mine, "wb") as f:
        f.truncate(10 * 2**20)
    cache = PromptCache(tmp_path, max_bytes=3 * 1200)
    for i in range(4):
        cache.put(cache.key("enc", f"prompt {i}", 120, True), torch.zeros(8, 32), torch.ones(8, dtype=torch.long))
    assert mine.stat().st_size == 10 * 2**20  # 10 MB over the 3.6 kB bound, and still there
    entries = [p for p in tmp_path.glob("*.safetensors") if p != mine]
    assert 1 <= len(entries) < 4 and sum(p.stat().st_size for p in entries) <= 3 * 1200


def test_a_failed_write_or_a_read_only_entry_never_costs_the_generation(tmp_path, monkeypatch, caplog):
    from safetensors import SafetensorError

    cache = PromptCache(tmp_path)
    key = cache.key("enc", "a cat", 120, True)
    cache.put(key, torch.zeros(4, 8), torch.ones(4, dtype=torch.long))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("os.utime", read_only)  # another user's cache: readable, its times not ours to set
    assert cache.get(key) is not None and (tmp_path / f"{key}.safetensors").exists()

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("pixart.prompt_cache.save_file", full_disk)
    with caplog.at_level("WARNING", logger="pixart"):
        cache.put(cache.key("enc", "a dog", 120, True), torch.zeros(4, 8), torch.ones(4, dtype=torch.long))
    assert "continuing without it" in caplog.text and not list(tmp_path.glob("*.tmp*"))


def test_entries_are_keyed_by_the_text_encoders_dtype_not_the_pipelines(pipeline_dir_512, tmp_path):
    """A bf16 T5's embeddings are never served to an fp32 T5 (the transformer's dtype is the pipeline's dtype)."""
    prompt = "a red circle on a white background"
    bf16 = staged(pipeline_dir_512, tmp_path, torch_dtype=torch.bfloat16)
    bf16.encode_prompt(prompt)
    mixed = {"transformer": torch.bfloat16, "default": torch.float32}
    cached = staged(pipeline_dir_512, tmp_path, torch_dtype=mixed).encode_prompt(prompt)[0]
    fresh = pixart.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512, torch_dtype=mixed).encode_prompt(prompt)[0]
    assert torch.equal(cached, fresh)
