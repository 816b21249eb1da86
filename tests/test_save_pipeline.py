"""pipe.save_pretrained: a diffusers folder that pixart and diffusers load to the same images, and its refusals."""
from __future__ import annotations

import errno
import json
import os
from collections import namedtuple
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors import safe_open

import pixart
from pixart.lora import inject_lora, lora_state_dict

IMAGE_TOL = 2e-3  # [0, 1] fp32 images against diffusers' pipeline: tests/test_pipeline.py's bound


def load(folder, **kwargs):
    pipe = pixart.PixArtAlphaPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, **kwargs) -> np.ndarray:
    return pipe("a red circle", num_inference_steps=2, width=256, height=256, output_type="np",
                generator=torch.Generator().manual_seed(5), **kwargs).images


def random_lora(pipe, seed: int = 3) -> dict[str, torch.Tensor]:
    model = pixart.PixArtTransformer2DModel(pipe.transformer.config)
    inject_lora(model, rank=2, alpha=2, targets=("to_q", "to_v", "proj_out"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return lora_state_dict(model)


def test_saved_folder_gives_the_same_images_in_pixart_and_diffusers(pipeline_dir_512, tmp_path):
    pipe = load(pipeline_dir_512)
    pipe.scheduler = pixart.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    want = generate(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    np.testing.assert_array_equal(generate(load(tmp_path / "saved")), want)
    ref = diffusers.PixArtAlphaPipeline.from_pretrained(tmp_path / "saved")
    ref.set_progress_bar_config(disable=True)
    assert type(ref.scheduler).__name__ == "EulerDiscreteScheduler"
    assert np.abs(generate(ref) - want).max() < IMAGE_TOL


def test_a_fused_lora_is_saved_merged_and_an_unfused_one_refused(pipeline_dir_512, tmp_path):
    pipe = load(pipeline_dir_512)
    base = generate(pipe)
    pipe.load_lora_weights(random_lora(pipe))
    with pytest.raises(ValueError, match="not fused: pipe.fuse_lora"):
        pipe.save_pretrained(tmp_path / "unfused")
    assert not (tmp_path / "unfused").exists()  # refused before writing anything
    pipe.fuse_lora()
    want = generate(pipe)
    assert np.abs(want - base).max() > 10 * IMAGE_TOL  # the LoRA changes the image
    pipe.save_pretrained(tmp_path / "merged")
    np.testing.assert_array_equal(generate(load(tmp_path / "merged")), want)


def test_a_staged_pipeline_saves_the_same_files_and_stays_staged(pipeline_dir_512, tmp_path):
    full, staged = load(pipeline_dir_512, memory="full"), load(pipeline_dir_512, memory="staged")
    full.save_pretrained(tmp_path / "full")
    staged.save_pretrained(tmp_path / "staged")
    assert all(staged._loaded.get(name) is None for name in ("text_encoder", "transformer", "vae"))
    files = sorted(p.relative_to(tmp_path / "full") for p in (tmp_path / "full").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "staged") for p in (tmp_path / "staged").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "full" / f).read_bytes() == (tmp_path / "staged" / f).read_bytes(), f


def test_a_component_left_out_is_recorded_and_left_out_on_loading(pipeline_dir_512, tmp_path):
    pipe = load(pipeline_dir_512, text_encoder=None)
    pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "text_encoder").exists()
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["text_encoder"] == [None, None]
    again = load(tmp_path / "saved")  # no text_encoder=None needed
    assert again.text_encoder is None and again.transformer is not None
    ref = diffusers.PixArtAlphaPipeline.from_pretrained(tmp_path / "saved")
    assert ref.text_encoder is None


def test_refusals_name_the_fix_and_write_nothing(pipeline_dir_512, tmp_path, monkeypatch):
    pipe = load(pipeline_dir_512, transformer_quantization="int8")
    with pytest.raises(ValueError, match="quantized while loading is not saved"):
        pipe.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
    pipe = load(pipeline_dir_512)
    with pytest.raises(ValueError, match="safe_serialization, variant, push_to_hub"):
        pipe.save_pretrained(tmp_path / "v", variant="fp16")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        pipe.save_pretrained(tmp_path / "file")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match="not enough disk space .* GB are free: .* nothing was written"):
        pipe.save_pretrained(tmp_path / "full-disk")
    assert not (tmp_path / "full-disk").exists()


def test_paths_that_cannot_take_a_pipeline_are_refused_before_writing(pipeline_dir_512, tmp_path, monkeypatch):
    pipe = load(pipeline_dir_512)
    with pytest.raises(ValueError, match="empty path"):
        pipe.save_pretrained("")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="is under .*afile, which is a file"):
        pipe.save_pretrained(tmp_path / "afile" / "sub")
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr("os.access", lambda path, mode: real_access(path, mode) and Path(path).name != "locked")
    with pytest.raises(PermissionError, match="cannot write in .*locked: save the pipeline elsewhere"):
        pipe.save_pretrained(tmp_path / "locked" / "saved")
    assert not (tmp_path / "locked" / "saved").exists()


def test_a_failure_while_writing_says_what_was_replaced_and_keeps_the_rest(pipeline_dir_512, tmp_path, monkeypatch):
    pipe = load(pipeline_dir_512)
    pipe.save_pretrained(tmp_path / "saved")
    before = {p: p.read_bytes() for p in (tmp_path / "saved").rglob("*") if p.is_file()}
    pipe.to(torch.bfloat16)  # new weights for every model

    def disk_full(folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(pipe.vae, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="replaced whole: transformer/; the rest is as it was"):
        pipe.save_pretrained(tmp_path / "saved")
    after = {p: p.read_bytes() for p in (tmp_path / "saved").rglob("*") if p.is_file()}
    assert after.keys() == before.keys()  # no stray temporary files
    changed = {p.relative_to(tmp_path / "saved").parts[0] for p in after if after[p] != before[p]}
    assert changed == {"transformer"}


def test_an_int8_text_encoder_is_saved_for_pixart_and_refused_by_diffusers(tmp_path):
    pipe = load("demo", text_encoder_quantization="int8")
    pipe.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "model_index.json").read_text())["text_encoder"] == ["pixart", "T5EncoderModel"]
    np.testing.assert_array_equal(generate(load(tmp_path / "q")), generate(pipe))
    with pytest.raises(ValueError, match="cannot be loaded"):  # rather than reading int8 weights as floats
        diffusers.PixArtAlphaPipeline.from_pretrained(tmp_path / "q")


def test_saving_over_an_earlier_save_replaces_it(pipeline_dir_512, tmp_path):
    pipe = load(pipeline_dir_512)
    pipe.save_pretrained(tmp_path / "saved")
    pipe.load_lora_weights(random_lora(pipe, seed=9))
    pipe.fuse_lora()
    pipe.save_pretrained(tmp_path / "saved")
    assert not list((tmp_path / "saved").rglob("*.tmp"))
    np.testing.assert_array_equal(generate(load(tmp_path / "saved")), generate(pipe))


def test_demo_saved_in_bf16_keeps_its_tokenizer_class_and_dtype(tmp_path):
    """The demo's tokenizer is a PreTrainedTokenizerFast (not T5's sentencepiece one): diffusers must be told so."""
    pipe = load("demo", torch_dtype=torch.bfloat16)
    pipe.save_pretrained(tmp_path / "demo")
    assert json.loads((tmp_path / "demo" / "model_index.json").read_text())["tokenizer"] == \
        json.loads((pixart.demo.MODEL / "model_index.json").read_text())["tokenizer"]
    with safe_open(tmp_path / "demo" / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # saved as the pipeline held it
    ref = diffusers.PixArtAlphaPipeline.from_pretrained(tmp_path / "demo", torch_dtype=torch.bfloat16)
    assert ref.tokenizer("a red circle").input_ids == pipe.tokenizer.encode("a red circle")
    again = load(tmp_path / "demo", torch_dtype=torch.bfloat16)
    np.testing.assert_array_equal(generate(again), generate(pipe))


def test_pipeline_config_and_scheduler_saving_as_in_diffusers(pipeline_dir_512, tmp_path):
    pipe = load(pipeline_dir_512, memory="staged")
    ref = diffusers.PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    assert pipe.name_or_path == str(ref.name_or_path) == str(pipeline_dir_512)
    assert pipe.config._name_or_path == str(pipeline_dir_512)
    for name in ("text_encoder", "vae", "transformer", "scheduler"):  # transformers 5 renames its tokenizer classes
        assert pipe.config[name] == tuple(ref.config[name]), name
    assert pipe._loaded.get("transformer") is None  # reading the config loads no model
    pipe.scheduler = pixart.EulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.scheduler.save_pretrained(tmp_path / "sched")
    theirs = diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path / "sched")
    assert theirs.config.use_karras_sigmas is True
    assert pixart.EulerDiscreteScheduler.from_pretrained(tmp_path / "sched") == pipe.scheduler
